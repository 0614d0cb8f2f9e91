"""The multi-channel text encoder as it trains: one frozen backbone with one peft LoRA adapter per
text channel, and the head of :mod:`naics_mlflow.model.head` (a mixture of experts over the pooled
channels added to a semantic skip path, and a projection onto the Lorentz hyperboloid)."""

from __future__ import annotations

import copy
import warnings

import peft
import torch
from torch import nn
from transformers import AutoModel

from naics_mlflow.config import ModelConfig
from naics_mlflow.data.features import mean_pool, pool_by_owner
from naics_mlflow.data.pretrained import BackboneError, load_pretrained
from naics_mlflow.data.tokenization import CHANNELS, ChannelTokens, TextBatch
from naics_mlflow.model.head import EncoderHead, EncoderOutput
from naics_mlflow.model.merged import BertWeights, adapter_deltas, check_mergeable


def _is_trainable(name: str) -> bool:
    """All but the backbone's own weights train: its adapters, the experts, the projection."""
    return not name.startswith("backbone.") or "lora_" in name


def load_frozen_backbone(name: str) -> nn.Module:
    """The pretrained backbone, frozen, in float32 and in training mode.

    float32 whatever the saved weights' precision: mixed precision comes from autocast, and
    adapters trained in a half-precision backbone would lose their small updates. Training mode
    because from_pretrained returns eval mode, which would silence the adapters' dropout.
    """
    backbone = load_pretrained(AutoModel, name, dtype=torch.float32)
    backbone.requires_grad_(False)
    return backbone.train()


def lora_config(config: ModelConfig) -> peft.LoraConfig:
    """The LoRA adapter every channel gets, from ``model.lora``."""
    return peft.LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        bias="none",
    )


def _with_adapters(backbone: nn.Module, config: ModelConfig) -> peft.PeftModel:
    """``backbone`` with one LoRA adapter per channel, ``model.lora``."""
    lora = lora_config(config)
    try:
        # peft asks the backbone `is_gradient_checkpointing`, which transformers 5 marks
        # deprecated; the warning would greet every command that builds a model.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
            )
            adapted = peft.get_peft_model(backbone, copy.deepcopy(lora), CHANNELS[0])
    except ValueError as exc:
        raise BackboneError(
            f"model.lora.target_modules {config.lora.target_modules} do not match modules "
            f"of backbone '{config.base_model_name}' ({exc})"
        ) from exc
    for channel in CHANNELS[1:]:
        adapted.add_adapter(channel, copy.deepcopy(lora))
    return adapted


class MultiChannelEncoder(EncoderHead):
    """Codes' texts -> Lorentz embeddings, in two steps.

    1. :meth:`channel_features`: each channel's texts run through the frozen backbone with the
       channel's own LoRA adapter and are mean-pooled; a code's feature in a channel is the unit
       mean of its texts' (one title, several index items, often no cross-references: zeros).
    2. :meth:`~EncoderHead.head`: the channel features fused and projected onto the hyperboloid.

    Only the adapters, the mixture of experts and the projection train; a head-only stage trains
    the last two on :meth:`~EncoderHead.code_features`, computed once.
    """

    def __init__(self, config: ModelConfig, curvature: float) -> None:
        backbone = load_frozen_backbone(config.base_model_name)
        check_mergeable(config.base_model_name, backbone.config.to_dict())
        adapted = _with_adapters(backbone, config)
        # After the adapters: a seed draws the same initial weights for each as it always has.
        super().__init__(config, curvature, backbone.config.hidden_size)
        self.backbone = adapted
        # Refuses adapters that merging would drop, before anything trains.
        adapter_deltas(self.lora_tensors(), self.lora_scaling, CHANNELS)
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(_is_trainable(name))
        self._adapter_parameters = [p for n, p in self.backbone.named_parameters() if "lora_" in n]
        self.length_buckets = config.length_buckets

    def freeze_adapters(self) -> None:
        """Keep the adapters as they are (a head-only stage)."""
        self._adapter_parameters = []
        for name, parameter in self.backbone.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(False)

    def _activate(self, channel: str) -> None:
        self.backbone.set_adapter(channel)
        # peft's set_adapter freezes the other adapters, but their outputs from earlier channels in
        # this step are still in the graph: autograd drops gradients of leaves that stop requiring
        # them before backward, so every adapter stays trainable.
        for parameter in self._adapter_parameters:
            parameter.requires_grad_(True)

    def encode_texts(self, channel: str, texts: TextBatch) -> torch.Tensor:
        """Pooled backbone states of one channel's texts with its adapter: (K, L) -> (K, H).

        With ``length_buckets`` > 1 the texts run as that many groups of similar length, each
        cut to its own longest text, so short titles are not padded to the longest one.
        """
        self._activate(channel)
        input_ids, attention_mask = texts.input_ids, texts.attention_mask
        if self.length_buckets == 1:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            return mean_pool(hidden.last_hidden_state, attention_mask)
        lengths = attention_mask.sum(dim=1)
        order = lengths.argsort()
        pooled = []
        for group in order.tensor_split(self.length_buckets):
            if len(group) == 0:
                continue
            length = int(lengths[group].max())
            ids, mask = input_ids[group, :length], attention_mask[group, :length]
            hidden = self.backbone(input_ids=ids, attention_mask=mask)
            pooled.append(mean_pool(hidden.last_hidden_state, mask))
        return torch.cat(pooled)[order.argsort()]

    def channel_features(self, tokens: ChannelTokens) -> dict[str, torch.Tensor]:
        """``{channel: (U, H)}``: each code's unit mean of its texts' pooled states, zeros where
        it has no text (nothing is run through the backbone for it)."""
        features = {}
        for channel in CHANNELS:
            texts = tokens.texts[channel]
            if len(texts.owner) == 0:
                features[channel] = torch.zeros(
                    (tokens.size, self.hidden_size), device=texts.owner.device
                )
            else:
                pooled = self.encode_texts(channel, texts)
                features[channel] = pool_by_owner(pooled, texts.owner, tokens.size)
        return features

    def forward(self, tokens: ChannelTokens) -> EncoderOutput:
        return self.head(self.channel_features(tokens))

    def backbone_weights(self) -> BertWeights:
        return BertWeights.of_model(self.backbone.get_base_model())

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        return {
            name: parameter.detach()
            for name, parameter in self.backbone.get_base_model().named_parameters()
            if ".lora_" in name
        }

    def cast_frozen_linears(self, dtype: torch.dtype) -> None:
        """Store the frozen backbone's linear layers (every one but the adapters) in ``dtype``,
        the autocast dtype of mixed-precision training.

        Autocast caches its cast of a weight only for weights that train, so each frozen weight
        and bias was cast again at every call: every layer of every channel's pass, every step,
        each a copy that a GPU launches. Cast once, the products are the same (autocast rounds
        the same way), and so are the loss and the gradients, bit for bit
        (``tests/test_training_stage.py``). Embeddings, LayerNorms and adapters stay float32, and
        checkpoints never hold the frozen weights.
        """
        for name, module in self.backbone.named_modules():
            if isinstance(module, nn.Linear) and "lora_" not in name:
                module.to(dtype)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: the frozen backbone is rebuilt from its name on load."""
        return {name: t for name, t in self.state_dict().items() if _is_trainable(name)}
