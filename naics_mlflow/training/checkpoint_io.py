"""How Lightning writes checkpoint files: whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


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
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.partial")
        torch.save(checkpoint, partial)
        os.replace(partial, target)
