"""A trained model read from its checkpoint, for ``embed``, ``search``, ``evaluate`` and the served
model: the head's weights and the adapters' LoRA tensors from the checkpoint, the backbone's
weights from its own files.

Nothing here imports Lightning or transformers' model classes, which training needs and a
search does not: on 2 cores they cost a command about 6 s of imports (docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from naics_mlflow.config import Config, ModelConfig, merge
from naics_mlflow.data.tokenization import CHANNELS
from naics_mlflow.model.checkpoint import check_fits, read_checkpoint
from naics_mlflow.model.head import EncoderHead
from naics_mlflow.model.merged import LAYER_LINEARS, BertWeights, is_lora_target

# Where the training encoder's state dict holds the backbone's own modules (named as peft's
# wrapper named them, see naics_mlflow.model.lora).
BACKBONE_PREFIX = "backbone.base_model.model."


def _adapted_layers(config: ModelConfig, weights: BertWeights) -> dict[str, tuple[int, int]]:
    """``{path: (out, in)}`` of the backbone's linear layers that ``model.lora.target_modules``
    names (:func:`is_lora_target`)."""
    hidden = weights.config["hidden_size"]
    layers: dict[str, tuple[int, int]] = {"pooler.dense": (hidden, hidden)}
    for layer in range(weights.config["num_hidden_layers"]):
        for linear in LAYER_LINEARS:
            path = f"encoder.layer.{layer}.{linear}"
            layers[path] = tuple(weights.tensors[f"{path}.weight"].shape)
    return {
        path: shape
        for path, shape in layers.items()
        if is_lora_target(path, config.lora.target_modules)
    }


class TrainedEncoder(EncoderHead):
    """The encoder of a checkpoint, in eval mode: the same head and merged backbone as the
    training encoder's, built from the checkpoint's weights (``trained``, named as
    ``MultiChannelEncoder.trainable_state_dict`` names them) and the backbone's ``weights``."""

    def __init__(
        self,
        config: ModelConfig,
        curvature: float,
        weights: BertWeights,
        trained: dict[str, torch.Tensor],
        path: Path,
    ) -> None:
        super().__init__(config, curvature, weights.config["hidden_size"])
        head = self.state_dict()
        expected = {name: tensor.shape for name, tensor in head.items()}
        rank = config.lora.r
        for layer, (out_features, in_features) in _adapted_layers(config, weights).items():
            for channel in CHANNELS:
                name = f"{BACKBONE_PREFIX}{layer}.lora_{{}}.{channel}.weight"
                expected[name.format("A")] = torch.Size((rank, in_features))
                expected[name.format("B")] = torch.Size((out_features, rank))
        check_fits(path, trained, expected)
        self.load_state_dict({name: trained[name] for name in head})
        self._weights = weights
        self._trained = trained
        self._lora = {
            name.removeprefix(BACKBONE_PREFIX): tensor
            for name, tensor in trained.items()
            if name.startswith(BACKBONE_PREFIX)
        }
        self.eval()

    def backbone_weights(self) -> BertWeights:
        return self._weights

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        return self._lora

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self._trained


@dataclass(frozen=True)
class TrainedEmbedder:
    """A trained model: the configuration it was trained with and its encoder."""

    config: Config
    encoder: TrainedEncoder

    @property
    def device(self) -> torch.device:
        return self.encoder.device


def load_embedder(
    path: Path, device: torch.device, backbone_location: str | None = None
) -> TrainedEmbedder:
    """The trained model in a checkpoint, built from the configuration saved with it, its weights
    on ``device`` (see :func:`~naics_mlflow.model.merged.inference_device`).

    ``backbone_location`` loads the same backbone from another place (the copy a served model
    carries) instead of the name the checkpoint records.
    """
    checkpoint = read_checkpoint(path)
    tree = checkpoint["hyper_parameters"]["config"]
    if backbone_location is not None:
        tree = merge(tree, {"model": {"base_model_name": backbone_location}})
    config = Config.from_dict(tree, f"the config saved in {path}")
    weights = BertWeights.read(config.model.base_model_name).to(device)
    trained = {
        name.removeprefix("encoder."): tensor.to(device)
        for name, tensor in checkpoint["state_dict"].items()
    }
    encoder = TrainedEncoder(config.model, config.loss.curvature, weights, trained, path)
    return TrainedEmbedder(config, encoder.to(device))
