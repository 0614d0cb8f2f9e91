"""Initialising a stage's model from a checkpoint's weights (what ``--from-checkpoint`` starts a
stage from). Commands that only use a trained model load it with
:mod:`naics_mlflow.model.trained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from naics_mlflow.model.checkpoint import check_compatible, check_fits

if TYPE_CHECKING:
    from naics_mlflow.model.module import NaicsEmbedder


def load_trainable_weights(module: NaicsEmbedder, path: Path) -> None:
    """Initialise ``module``'s adapters, experts and projection from a checkpoint's weights."""
    checkpoint = check_compatible(path, module.config)
    saved = {k.removeprefix("encoder."): v for k, v in checkpoint["state_dict"].items()}
    expected = module.encoder.trainable_state_dict()
    check_fits(path, saved, {name: tensor.shape for name, tensor in expected.items()})
    module.encoder.load_state_dict(saved, strict=False)
