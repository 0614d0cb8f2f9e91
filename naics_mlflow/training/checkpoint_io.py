"""How Lightning writes checkpoint files: whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from naics_mlflow.errors import UserError


class CheckpointWriteError(UserError):
    """A checkpoint folder that cannot be written (permissions, a full disk)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to ``<name>.partial`` beside it, then rename it into place.

    A process killed mid-write leaves only the ``.partial`` file, and the checkpoint of the same
    name from before stays whole. Lightning's own writer renames from the system's temporary
    folder, which is a copy, not an atomic rename, when that folder is on another file system.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        target = Path(path)
        partial = target.with_name(f"{target.name}.partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, partial)
            os.replace(partial, target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise CheckpointWriteError(
                f"cannot write checkpoint {target} ({exc.strerror or type(exc).__name__}); the "
                "checkpoints written before it are whole: free space or set dirs.checkpoints to a "
                "writable folder, then rerun to resume"
            ) from exc
