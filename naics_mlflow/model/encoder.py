"""The multi-channel text encoder: one frozen backbone, one LoRA adapter per text channel, a
mixture of experts over the pooled channels added to a semantic skip path, and a projection onto
the Lorentz hyperboloid."""

from __future__ import annotations

import copy
import itertools
from typing import NamedTuple

import numpy as np
import peft
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from naics_mlflow.config import ModelConfig
from naics_mlflow.data.features import CodeFeatures, pool_by_owner
from naics_mlflow.data.pretrained import BackboneError, load_pretrained
from naics_mlflow.data.tokenization import (
    CHANNELS,
    QUERY_CHANNELS,
    SEMANTIC_CHANNELS,
    TEXT_CHANNELS,
    ChannelTokens,
    CodeTokens,
    TextBatch,
    pad,
)
from naics_mlflow.model.lorentz import LorentzProjection
from naics_mlflow.model.moe import MixtureOfExperts


def _is_trainable(name: str) -> bool:
    """All but the backbone's own weights train: its adapters, the experts, the projection."""
    return not name.startswith("backbone.") or "lora_" in name


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over real (unpadded) tokens: (U, L, H), (U, L) -> (U, H)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


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


def unit_features(
    backbone: MergedBackbone, channel: str, sequences: list[np.ndarray | None], pad_token_id: int
) -> torch.Tensor:
    """``(len(sequences), H)`` unit features of one channel's texts on the CPU, zeros for None.

    Each distinct text runs once (a third of the titles and descriptions repeat a parent's or a
    child's), in batches of similar length, so that padding stays small.
    """
    slot_of: dict[bytes, int] = {}
    distinct: list[np.ndarray] = []
    rows, slots = [], []
    for row, sequence in enumerate(sequences):
        if sequence is None:
            continue
        slot = slot_of.setdefault(sequence.tobytes(), len(distinct))
        if slot == len(distinct):
            distinct.append(sequence)
        rows.append(row)
        slots.append(slot)
    features = torch.zeros((len(sequences), backbone.hidden_size))
    features[rows] = _encode_distinct(backbone, channel, distinct, pad_token_id)[slots]
    return features


def _encode_distinct(
    backbone: MergedBackbone, channel: str, sequences: list[np.ndarray], pad_token_id: int
) -> torch.Tensor:
    """``(len(sequences), H)`` unit features, encoded shortest first in batches of
    ``FEATURE_BATCH_SIZE``."""
    device = backbone.device
    features = torch.zeros((len(sequences), backbone.hidden_size))
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), FEATURE_BATCH_SIZE):
        chunk = order[start : start + FEATURE_BATCH_SIZE]
        texts = pad([sequences[i] for i in chunk], list(range(len(chunk))), pad_token_id)
        pooled = backbone(
            texts.input_ids.to(device), texts.attention_mask.to(device), [(channel, len(chunk))]
        )
        features[chunk] = F.normalize(pooled, dim=-1).cpu()
    return features


class EncoderOutput(NamedTuple):
    embeddings: torch.Tensor  # (U, D+1) float32 points on the hyperboloid
    expert_utilisation: torch.Tensor  # (E,) share of routing slots per expert
    mean_gate_probability: torch.Tensor  # (E,) mean gate probability per expert


# Texts per backbone pass when features are computed without gradients.
FEATURE_BATCH_SIZE = 256


def _in_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` itself when it is already ``dtype`` or not floating point (token ids, position
    indices), else a frozen copy in ``dtype``, of the same kind (parameter or buffer)."""
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    converted = tensor.detach().to(dtype)
    return (
        nn.Parameter(converted, requires_grad=False)
        if isinstance(tensor, nn.Parameter)
        else converted
    )


class ChannelLinear(nn.Module):
    """A LoRA-adapted linear layer for encoding without gradients: each channel's adapter merged
    into its own copy of the weight (``W + scaling * B @ A``, stacked ``(C, out, in)``), and the
    base layer's bias; each group of a batch's rows reads its channel's weight.

    Merging takes the adapter's dropout, two thin products and the addition out of every call,
    and lets the texts of several channels share one backbone pass: every other weight of the
    backbone is the same for all channels, and reading those weights from memory is what a pass
    over a few short texts costs on a CPU.
    """

    def __init__(
        self, layer: peft.tuners.lora.Linear, channels: tuple[str, ...], dtype: torch.dtype
    ) -> None:
        super().__init__()
        base = layer.get_base_layer()
        weights = [base.weight + layer.get_delta_weight(channel) for channel in channels]
        self.register_buffer("weights", torch.stack(weights).to(dtype), persistent=False)
        self.bias = None if base.bias is None else base.bias.to(dtype)
        # (channel index, row count) of each group of rows, in batch order; set per call.
        self.groups: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.groups) == 1:
            return F.linear(x, self.weights[self.groups[0][0]], self.bias)
        parts = x.split([count for _, count in self.groups])
        return torch.cat(
            [
                F.linear(part, self.weights[channel], self.bias)
                for (channel, _), part in zip(self.groups, parts, strict=True)
            ]
        )


class MergedBackbone(nn.Module):
    """The backbone as it is now, with every channel's adapter merged (:class:`ChannelLinear`),
    in eval mode: what encoding without gradients runs (features of codes and items, queries).

    A snapshot: it holds the merged weights as they were when it was built, so rebuild it after
    the adapters change. In float32 it shares the frozen weights with the training backbone (no
    copy) and its pooled states equal :meth:`MultiChannelEncoder.encode_texts`' in eval mode to
    float rounding (``tests/test_inference.py``). In bfloat16 it holds its own half-size copy of
    every weight (the training backbone stays float32): on a CPU with AMX or AVX512-BF16 the
    long texts of all codes then encode in under half the time, at a cosine of
    about 0.9999 with float32's (docs/results.md has what it does to retrieval).
    """

    def __init__(
        self,
        backbone: peft.PeftModel,
        channels: tuple[str, ...],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.channels = channels
        frozen = itertools.chain(backbone.parameters(), backbone.buffers())
        shared = {id(t): _in_dtype(t, dtype) for t in frozen}
        model = copy.deepcopy(backbone.get_base_model(), shared)
        self.linears = []
        with torch.no_grad():
            for name, module in backbone.get_base_model().named_modules():
                if not isinstance(module, peft.tuners.lora.LoraLayer):
                    continue
                if not isinstance(module, peft.tuners.lora.Linear):
                    raise BackboneError(
                        f"cannot merge the adapter of {name} ({type(module).__name__}): "
                        "model.lora.target_modules must name linear layers"
                    )
                merged = ChannelLinear(module, channels, dtype)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, merged)
                self.linears.append(merged)
        self.model = model.eval()
        self.hidden_size = model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: list[tuple[str, int]]
    ) -> torch.Tensor:
        """Pooled states ``(K, H)`` of ``K`` texts whose consecutive groups of rows are read by
        the channels ``groups`` names: ``[("title", Q), ("examples", Q)]`` for Q queries."""
        indexed = [(self.channels.index(channel), count) for channel, count in groups]
        for linear in self.linears:
            linear.groups = indexed
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)
        # Pooled in float32: a bfloat16 sum over a long text's tokens would lose digits.
        return mean_pool(hidden.last_hidden_state.float(), attention_mask)


class MultiChannelEncoder(nn.Module):
    """Codes' texts -> Lorentz embeddings, in two steps.

    1. :meth:`channel_features`: each channel's texts run through the frozen backbone with the
       channel's own LoRA adapter and are mean-pooled; a code's feature in a channel is the unit
       mean of its texts' (one title, several index items, often no cross-references: zeros).
    2. :meth:`head`: ``normalize(sum of the title, description and examples features) +
       MoE(all four)``, projected onto the hyperboloid.

    The experts' output layer and the projection's bias start at zero and its weight orthogonal.
    An untrained model therefore places codes and queries by the pretrained backbone's own
    sentence similarity (all at radius 1, so distance ranks like cosine, when ``embedding_dim`` is
    at least the backbone's hidden size) and training starts from there, instead of from a random
    mixing of the channels that a few minutes of training cannot undo. Only the adapters, the
    mixture of experts and the projection train; a head-only stage trains the last two on
    :meth:`code_features`, computed once.
    """

    def __init__(self, config: ModelConfig, curvature: float) -> None:
        super().__init__()
        backbone = load_frozen_backbone(config.base_model_name)
        lora = lora_config(config)
        try:
            self.backbone = peft.get_peft_model(backbone, copy.deepcopy(lora), CHANNELS[0])
        except ValueError as exc:
            raise BackboneError(
                f"model.lora.target_modules {config.lora.target_modules} do not match modules "
                f"of backbone '{config.base_model_name}' ({exc})"
            ) from exc
        for channel in CHANNELS[1:]:
            self.backbone.add_adapter(channel, copy.deepcopy(lora))
        hidden = backbone.config.hidden_size
        self.fusion = MixtureOfExperts(
            input_dim=len(CHANNELS) * hidden,
            output_dim=hidden,
            num_experts=config.moe.num_experts,
            top_k=config.moe.top_k,
            hidden_dim=config.moe.hidden_dim,
        )
        nn.init.zeros_(self.fusion.w2)
        nn.init.zeros_(self.fusion.b2)
        self.projection = LorentzProjection(hidden, config.embedding_dim, curvature)
        nn.init.orthogonal_(self.projection.linear.weight)
        nn.init.zeros_(self.projection.linear.bias)
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(_is_trainable(name))
        self._adapter_parameters = [p for n, p in self.backbone.named_parameters() if "lora_" in n]
        self.hidden_size = hidden
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

    def head(self, features: dict[str, torch.Tensor]) -> EncoderOutput:
        """Channel features ``{channel: (U, H)}`` -> points on the hyperboloid."""
        semantic = F.normalize(sum(features[c].float() for c in SEMANTIC_CHANNELS), dim=-1)
        fused = self.fusion(torch.cat([features[c] for c in CHANNELS], dim=-1))
        return EncoderOutput(
            embeddings=self.projection(semantic + fused.output),
            expert_utilisation=fused.expert_utilisation,
            mean_gate_probability=fused.mean_gate_probability,
        )

    def forward(self, tokens: ChannelTokens) -> EncoderOutput:
        return self.head(self.channel_features(tokens))

    def merged_backbone(self, dtype: torch.dtype = torch.float32) -> MergedBackbone:
        """The backbone with the adapters as they are now merged, for encoding without
        gradients, its weights in ``dtype`` (see :class:`MergedBackbone`)."""
        return MergedBackbone(self.backbone, CHANNELS, dtype)

    @torch.no_grad()
    def code_features(
        self, tokens: CodeTokens, item_queries: bool = False, dtype: torch.dtype = torch.float32
    ) -> CodeFeatures:
        """Every code's and index item's features with the adapters as they are now, without
        gradients, on the CPU; each distinct text of a channel runs once, through
        :meth:`merged_backbone` with its weights in ``dtype``.

        ``item_queries`` also reads every index item through the title adapter, as a query is
        read, which a stage needs only when it trains on items as queries from these features
        (a head-only stage): that pass is a third of the work, so embedding codes skips it. While
        the title and examples adapters are both still the identity (LoRA's B starts at zero),
        it is the examples pass and is not repeated.
        """
        backbone = self.merged_backbone(dtype)
        pad_id = tokens.pad_token_id
        channels = {
            channel: unit_features(backbone, channel, tokens.ids[channel], pad_id)
            for channel in TEXT_CHANNELS
        }
        items = {"examples": unit_features(backbone, "examples", tokens.item_ids, pad_id)}
        if item_queries:
            items["title"] = (
                items["examples"]
                if self._is_identity("title") and self._is_identity("examples")
                else unit_features(backbone, "title", tokens.item_ids, pad_id)
            )
        code_items = [torch.from_numpy(rows) for rows in tokens.code_items]
        return CodeFeatures(channels, items, code_items)

    @torch.no_grad()
    def query_features(
        self, backbone: MergedBackbone, queries: TextBatch
    ) -> dict[str, torch.Tensor]:
        """``{channel: (Q, H)}`` of free-text queries (one text each): the unit features of each
        query read by every one of ``QUERY_CHANNELS`` in a single pass of ``backbone``, zeros in
        the other channels; what :meth:`channel_features` gives their query tokens."""
        count = len(queries.input_ids)
        repeats = len(QUERY_CHANNELS)
        pooled = backbone(
            queries.input_ids.repeat(repeats, 1),
            queries.attention_mask.repeat(repeats, 1),
            [(channel, count) for channel in QUERY_CHANNELS],
        )
        read = dict(zip(QUERY_CHANNELS, F.normalize(pooled, dim=-1).split(count), strict=True))
        zeros = torch.zeros((count, self.hidden_size), device=pooled.device)
        return {channel: read.get(channel, zeros) for channel in CHANNELS}

    def _is_identity(self, channel: str) -> bool:
        """Whether a channel's adapter changes nothing: every LoRA B matrix is zero."""
        return all(
            not parameter.any()
            for name, parameter in self.backbone.named_parameters()
            if f"lora_B.{channel}." in name
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: the frozen backbone is rebuilt from its name on load."""
        return {name: t for name, t in self.state_dict().items() if _is_trainable(name)}
