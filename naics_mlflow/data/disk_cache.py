"""Tensors that one command computes and later commands read back: written whole or not at all,
read or ignored, never trusted half-way.

A cache only saves time, so neither reading nor writing one may fail a command: a file that
cannot be read is computed again and replaced, a folder that cannot be written costs the next
command the computation again. Each says so in one warning that names the file and what it held.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import pickle
import zipfile
from pathlib import Path

import torch

from naics_mlflow.files import save_torch_whole

logger = logging.getLogger(__name__)


def source_digest(*defined: object) -> str:
    """A digest of the source files that define ``defined`` (classes, functions): part of a
    cache's key, so that what one checkout cached is never read back by edited code, even
    within one version of the package."""
    digest = hashlib.sha256()
    for path in sorted({inspect.getsourcefile(thing) for thing in defined}):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def read_cached(path: Path | None, what: str) -> dict[str, torch.Tensor] | None:
    """The tensors saved at ``path``, or None when there is no such file or it cannot be read."""
    if path is None or not path.is_file():
        return None
    # torch reads a file that is not its zip archive as a bare pickle stream, whose errors on
    # arbitrary bytes are arbitrary exceptions.
    if not zipfile.is_zipfile(path):
        logger.warning("ignoring unreadable cached %s %s (not a PyTorch archive)", what, path)
        return None
    try:
        cached = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        logger.warning("ignoring unreadable cached %s %s (%s)", what, path, exc)
        return None
    if not isinstance(cached, dict) or not all(
        isinstance(value, torch.Tensor) for value in cached.values()
    ):
        logger.warning("ignoring cached %s %s: not a file of named tensors", what, path)
        return None
    return cached


def write_cached(path: Path | None, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Save ``tensors`` at ``path`` whole or not at all (:func:`save_torch_whole`); a file system
    that refuses it costs one warning, not the command."""
    if path is None:
        return
    try:
        save_torch_whole({name: tensor.cpu() for name, tensor in tensors.items()}, path)
    except OSError as exc:
        logger.warning(
            "could not cache the %s in %s (%s); free space there or set dirs.outputs to a "
            "writable folder to skip computing them next time",
            what,
            path.parent,
            exc.strerror or exc,
        )
