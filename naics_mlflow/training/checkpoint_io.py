"""How Lightning writes checkpoint files: whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from naics_mlflow.errors import UserError
from naics_mlflow.files import save_torch_whole


class CheckpointWriteError(UserError):
    """A checkpoint folder that cannot be written (permissions, a full disk)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint beside its target, then rename it into place
    (:func:`save_torch_whole`).

    A process killed mid-write leaves only a ``.partial`` file, and the checkpoint of the same
    name from before stays whole. Lightning's own writer renames from the system's temporary
    folder, which is a copy, not an atomic rename, when that folder is on another file system.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        target = Path(path)
        try:
            save_torch_whole(checkpoint, target)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot write checkpoint {target} ({exc.strerror or type(exc).__name__}); the "
                "checkpoints written before it are whole: free space or set dirs.checkpoints to a "
                "writable folder, then rerun to resume"
            ) from exc
