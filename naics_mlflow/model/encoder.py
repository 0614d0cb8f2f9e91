"""The multi-channel text encoder as it trains: one frozen backbone with one LoRA adapter per text
channel (:mod:`naics_mlflow.model.lora`), and the head of :mod:`naics_mlflow.model.head` (a
mixture of experts over the pooled channels added to a semantic skip path, and a projection onto
the Lorentz hyperboloid)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import AutoModel

from naics_mlflow.config import ModelConfig
from naics_mlflow.data.features import mean_pool, pool_by_owner
from naics_mlflow.data.pretrained import load_pretrained
from naics_mlflow.data.tokenization import (
    CHANNELS,
    ChannelTokens,
    TextRows,
    padding_groups,
    sent_to,
)
from naics_mlflow.model.head import EncoderHead, EncoderOutput
from naics_mlflow.model.lora import ChannelAdaptedBackbone
from naics_mlflow.model.merged import BertWeights, adapter_deltas, check_mergeable


def _is_trainable(name: str) -> bool:
    """All but the backbone's own weights train: its adapters, the experts, the projection."""
    return not name.startswith("backbone.") or "lora_" in name


def load_frozen_backbone(name: str, dropout: bool) -> nn.Module:
    """The pretrained backbone, frozen, in float32 and in training mode; without its own dropout
    unless ``dropout`` (``model.backbone_dropout``).

    float32 whatever the saved weights' precision: mixed precision comes from autocast, and
    adapters trained in a half-precision backbone would lose their small updates. Training mode
    because from_pretrained returns eval mode, which would silence the adapters' dropout.
    """
    # SDPA, whatever transformers would pick: the passes hand it their padding masks as its
    # kernels read them (ChannelAdaptedBackbone.forward).
    backbone = load_pretrained(AutoModel, name, dtype=torch.float32, attn_implementation="sdpa")
    backbone.requires_grad_(False)
    if not dropout:
        for layer in own_dropout_layers(backbone):
            layer.p = 0.0
    return backbone.train()


def own_dropout_layers(model: nn.Module) -> list[nn.Dropout]:
    """The backbone's own dropout layers (on hidden states, and the rate its attention takes for
    its probabilities), not its adapters' (``lora_dropout``).

    Their masks, and the attention probabilities that dropout makes backward hold, were a quarter
    of a LoRA step's time on a CPU (docs/results.md): ``model.backbone_dropout`` false sets them
    to zero.
    """
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Dropout) and not name.endswith("lora_dropout")
    ]


class MultiChannelEncoder(EncoderHead):
    """Codes' texts -> Lorentz embeddings, in two steps.

    1. :meth:`channel_features`: every channel's texts run through the frozen backbone, each with
       its channel's LoRA adapter, and are mean-pooled; a code's feature in a channel is the unit
       mean of its texts' (one title, several index items, often no cross-references: zeros).
    2. :meth:`~EncoderHead.head`: the channel features fused and projected onto the hyperboloid.

    Only the adapters, the mixture of experts and the projection train; a head-only stage trains
    the last two on :meth:`~EncoderHead.code_features`, computed once.
    """

    def __init__(self, config: ModelConfig, curvature: float) -> None:
        model = load_frozen_backbone(config.base_model_name, config.backbone_dropout)
        check_mergeable(config.base_model_name, model.config.to_dict())
        backbone = ChannelAdaptedBackbone(model, config, CHANNELS)
        # After the adapters: a seed draws the same initial weights for each as it always has.
        super().__init__(config, curvature, model.config.hidden_size)
        self.backbone = backbone
        # Refuses adapters that merging would drop, before anything trains.
        adapter_deltas(self.lora_tensors(), self.lora_scaling, CHANNELS)
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(_is_trainable(name))
        self.length_buckets = config.length_buckets

    def freeze_adapters(self) -> None:
        """Keep the adapters as they are (a head-only stage)."""
        for name, parameter in self.backbone.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(False)

    def compile_backbone(self) -> None:
        """``torch.compile`` the adapted backbone (``training.compile_backbone``): in place, so
        that parameter names, and a checkpoint's, do not change; with dynamic shapes, because
        every pass is cut to its own longest text and would otherwise compile again."""
        self.backbone.compile(dynamic=True)

    def encode_texts(self, texts: TextRows) -> torch.Tensor:
        """Pooled backbone states of texts of any channels, each with its channel's adapter:
        ``(N, L)`` tokens -> ``(N, H)``.

        The texts run as ``length_buckets`` passes of similar length, each cut to its own
        longest text, split where they pad least (:func:`padding_groups`).
        """
        device = texts.input_ids.device
        pooled = torch.empty(
            (len(texts.lengths), self.hidden_size), device=device, dtype=torch.float32
        )
        groups = padding_groups(texts.lengths, self.length_buckets)
        if not groups:
            return pooled
        # The passes' rows in one copy that does not wait for the device: a blocking copy per
        # pass would stall a GPU before each.
        order = sent_to(torch.from_numpy(np.concatenate([rows for rows, _ in groups])), device)
        passes = order.split([len(rows) for rows, _ in groups])
        for index, (_, length) in zip(passes, groups, strict=True):
            mask = texts.attention_mask[index, :length]
            hidden = self.backbone(texts.input_ids[index, :length], mask, texts.channel[index])
            pooled[index] = mean_pool(hidden, mask).float()
        return pooled

    def channel_features(self, tokens: ChannelTokens) -> dict[str, torch.Tensor]:
        """``{channel: (U, H)}``: each code's unit mean of its texts' pooled states, zeros where
        it has no text (nothing is run through the backbone for it)."""
        texts = TextRows.of(tokens)
        pooled = self.encode_texts(texts).split(texts.counts)
        return {
            channel: pool_by_owner(pooled[i], tokens.texts[channel].owner, tokens.size)
            for i, channel in enumerate(CHANNELS)
        }

    def forward(self, tokens: ChannelTokens) -> EncoderOutput:
        return self.head(self.channel_features(tokens))

    def backbone_weights(self) -> BertWeights:
        return BertWeights.of_model(self.backbone.model)

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        return {
            name: parameter.detach()
            for name, parameter in self.backbone.model.named_parameters()
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
