"""What a ``--from-checkpoint`` reference names: a checkpoint file, a ``runs:/`` or ``models:/``
URI, or a stage name.

A file is read where it is. Only a URI or a stage name needs the tracking store
(:mod:`naics_mlflow.tracking`), and so MLflow's import, about 1 s of a command on 2 cores: a
`search` or `embed` given a file goes without it, and a path to nothing is refused at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from naics_mlflow.errors import UserError


class CheckpointReferenceError(UserError):
    """A ``--from-checkpoint`` reference that names no usable checkpoint."""


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path  # a local checkpoint file
    run_id: str | None  # the run that logged it, when the reference named one


def is_uri(reference: str) -> bool:
    """Whether ``reference`` is an artifact URI (``runs:/``, ``models:/``, ``s3://`` ...)."""
    return "://" in reference or reference.startswith(("runs:/", "models:/"))


def resolve_checkpoint(
    reference: str,
    download_dir: Path,
    comparable: Callable[[str], Mapping[str, str]] | None = None,
) -> ResolvedCheckpoint:
    """The checkpoint a ``--from-checkpoint`` reference names: a path to a ``.ckpt`` file, a
    ``runs:/<id>/ckpt`` or other artifact URI (``models:/<name>/<version>``, a registered model,
    holds its checkpoint), or a stage name (its best run in the store among those whose tags
    equal ``comparable(stage)``); the last two downloaded into ``download_dir``."""
    if not is_uri(reference):
        path = Path(reference)
        if path.is_file():
            return ResolvedCheckpoint(path, None)
        if path.suffix == ".ckpt" or len(path.parts) > 1:
            if path.is_dir():
                raise CheckpointReferenceError(
                    f"{reference} is a folder; give a checkpoint file in it, a stage name or a "
                    "runs:/<run_id>/ckpt URI"
                )
            raise CheckpointReferenceError(f"checkpoint file {reference} does not exist")
    from naics_mlflow.tracking.discovery import resolve_tracked_checkpoint

    return resolve_tracked_checkpoint(reference, download_dir, comparable)
