"""Reading checkpoint files safely and checking they fit a configuration.

Kept free of Lightning and transformers, so that a bad ``--from-checkpoint`` is reported before
the training stack is imported.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from naics_mlflow.config import Config
from naics_mlflow.data.tokenization import CHANNELS
from naics_mlflow.errors import UserError, first_line
from naics_mlflow.files import save_torch_whole

# 2: the fusion has a semantic skip path, so format-1 weights mean something else.
# 3: the fusion reads unit channel features (zeros for a channel without text) and the examples
# channel is the mean of its index items, so format-2 weights mean something else.
CHECKPOINT_FORMAT = 3


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or that belongs to another model."""


def _require_archive(path: Path) -> None:
    """Refuse a file that is not a zip archive, as ``torch.save`` has written since PyTorch 1.6:
    torch would read it as a bare pickle stream, whose errors on arbitrary bytes are arbitrary
    exceptions (a ``KeyError`` for a text file). A missing file is left to ``torch.load``."""
    if path.is_file() and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable checkpoint (not a PyTorch checkpoint archive)"
        )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file without executing code from it (``weights_only``)."""
    _require_archive(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only reader refuses anything it cannot read; only a checkpoint archive
        # that it refuses holds more than weights.
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{path} holds Python objects besides weights, and loading them could run code; "
                "pass --trust-checkpoint only if you trust where it came from"
            ) from exc
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(exc)})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(exc)})") from exc
    if not isinstance(checkpoint, dict) or "naics_embedder" not in checkpoint:
        raise CheckpointError(f"{path}: not a naics-embedder checkpoint")
    written_format = checkpoint["naics_embedder"].get("format")
    if written_format != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {written_format}, this naics-embedder reads format "
            f"{CHECKPOINT_FORMAT}; train it again, or use the naics-embedder version that wrote it"
        )
    return checkpoint


def weights_only_copy(path: Path, folder: Path) -> Path:
    """A copy of a checkpoint the user trusts, in ``folder``, that loads with ``weights_only``.

    The one place a checkpoint is fully unpickled, which can run code from it: only for
    ``--trust-checkpoint``. The copy keeps the tensors of the state dict, the saved settings as
    plain data and the format record, so everything after this reads it safely.
    """
    _require_archive(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(exc)})") from exc
    if not isinstance(checkpoint, dict) or "naics_embedder" not in checkpoint:
        raise CheckpointError(f"{path}: not a naics-embedder checkpoint")
    plain = {
        "state_dict": {
            name: tensor
            for name, tensor in checkpoint.get("state_dict", {}).items()
            if isinstance(tensor, torch.Tensor)
        },
        "hyper_parameters": json.loads(json.dumps(checkpoint.get("hyper_parameters"), default=str)),
        "naics_embedder": json.loads(json.dumps(checkpoint["naics_embedder"], default=str)),
    }
    copy = folder / f"weights-only-{path.name}"
    try:
        save_torch_whole(plain, copy)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write the weights-only copy of {path} to {folder} ({exc.strerror}); free "
            "space there (the system's temporary folder, or TMPDIR)"
        ) from exc
    read_checkpoint(copy)
    return copy


# Model settings a checkpoint's weights depend on: any difference makes them unusable.
_SHAPE_KEYS = (
    ("base_model_name",),
    ("embedding_dim",),
    ("lora", "r"),
    ("lora", "target_modules"),
    ("moe", "num_experts"),
    ("moe", "hidden_dim"),
)


def check_compatible(path: Path, config: Config) -> dict[str, Any]:
    """Read ``path`` and check it was trained with this backbone, channels and layer sizes;
    returns the checkpoint. Raises :class:`CheckpointError` naming the first difference."""
    checkpoint = read_checkpoint(path)
    if list(checkpoint["naics_embedder"]["channels"]) != list(CHANNELS):
        raise CheckpointError(
            f"{path} has channels {checkpoint['naics_embedder']['channels']}, "
            f"this model has {list(CHANNELS)}"
        )
    difference = shape_difference(
        checkpoint["hyper_parameters"]["config"]["model"], config.to_dict()["model"]
    )
    if difference is not None:
        dotted, saved, current = difference
        raise CheckpointError(
            f"{path} was trained with {dotted}={saved}, this run has {current}; "
            f"set {dotted}={saved} or pick another checkpoint"
        )
    return checkpoint


def shape_difference(
    saved_model: dict[str, Any], current_model: dict[str, Any]
) -> tuple[str, Any, Any] | None:
    """The first setting (dotted, saved value, current value) in which two ``model`` sections
    differ such that weights trained under one do not fit the other; None when they fit."""
    for keys in _SHAPE_KEYS:
        saved, current = saved_model, current_model
        for key in keys:
            saved, current = saved[key], current[key]
        if saved != current:
            return "model." + ".".join(keys), saved, current
    return None


def check_fits(path: Path, saved: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    """Raise :class:`CheckpointError` naming the first weight that the checkpoint at ``path``
    lacks, has in excess or holds in another shape than the model it is loaded into
    (``expected``: names and shapes, as ``saved`` names them)."""
    for name in sorted(set(saved) | set(expected)):
        if name not in saved or name not in expected or saved[name].shape != expected[name]:
            raise CheckpointError(
                f"{path} does not fit this model at '{name}'; use the configuration it was "
                "trained with"
            )


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A short digest of trainable weights (names without the ``encoder.`` prefix), recorded on a
    stage run that starts from a checkpoint so the weights it started from can be checked."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.removeprefix("encoder.").encode())
        digest.update(state[name].detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]
