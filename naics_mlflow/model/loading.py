"""Building a trained model from a checkpoint: what a stage starts from and what ``embed``,
``search``, ``evaluate`` and the served model use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from naics_mlflow.config import Config, merge
from naics_mlflow.model.checkpoint import CheckpointError, check_compatible, read_checkpoint
from naics_mlflow.model.module import NaicsEmbedder


def load_trainable_weights(module: NaicsEmbedder, path: Path) -> None:
    """Initialise ``module``'s adapters, experts and projection from a checkpoint's weights."""
    _load_state(module, check_compatible(path, module.config), path)


def _load_state(module: NaicsEmbedder, checkpoint: dict[str, Any], path: Path) -> None:
    saved = {k.removeprefix("encoder."): v for k, v in checkpoint["state_dict"].items()}
    expected = module.encoder.trainable_state_dict()
    for name in sorted(set(saved) | set(expected)):
        if name not in saved or name not in expected or saved[name].shape != expected[name].shape:
            raise CheckpointError(
                f"{path} does not fit this model at '{name}'; use the configuration it was "
                "trained with"
            )
    module.encoder.load_state_dict(saved, strict=False)


def load_embedder(path: Path, backbone_location: str | None = None) -> NaicsEmbedder:
    """The trained model in a checkpoint, built from the configuration saved with it, in eval
    mode: what ``embed``, ``search``, ``evaluate`` and the served model use.

    ``backbone_location`` loads the same backbone from another place (the copy a served model
    carries) instead of the name the checkpoint records.
    """
    checkpoint = read_checkpoint(path)
    tree = checkpoint["hyper_parameters"]["config"]
    if backbone_location is not None:
        tree = merge(tree, {"model": {"base_model_name": backbone_location}})
    config = Config.from_dict(tree, f"the config saved in {path}")
    module = NaicsEmbedder(config.to_dict())
    _load_state(module, checkpoint, path)
    return module.eval()
