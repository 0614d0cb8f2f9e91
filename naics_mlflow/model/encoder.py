"""The multi-channel text encoder: one frozen backbone, one LoRA adapter per text channel, a
mixture of experts over the pooled channels added to a semantic skip path, and a projection onto
the Lorentz hyperboloid."""

from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path
from typing import NamedTuple

import peft
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from naics_mlflow.config import ModelConfig
from naics_mlflow.data.disk_cache import source_digest
from naics_mlflow.data.features import (
    CodeFeatures,
    mean_pool,
    pool_by_owner,
    read_features,
    write_features,
)
from naics_mlflow.data.pretrained import BackboneError, load_pretrained
from naics_mlflow.data.tokenization import (
    CHANNELS,
    QUERY_CHANNELS,
    SEMANTIC_CHANNELS,
    TEXT_CHANNELS,
    ChannelTokens,
    CodeTokens,
    TextBatch,
)
from naics_mlflow.model.lorentz import LorentzProjection
from naics_mlflow.model.merged import (
    MergedBackbone,
    check_adapters,
    check_mergeable,
    unit_features,
)
from naics_mlflow.model.moe import MixtureOfExperts


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


class EncoderOutput(NamedTuple):
    embeddings: torch.Tensor  # (U, D+1) float32 points on the hyperboloid
    expert_utilisation: torch.Tensor  # (E,) share of routing slots per expert
    mean_gate_probability: torch.Tensor  # (E,) mean gate probability per expert


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
        check_mergeable(config.base_model_name, backbone.config)
        lora = lora_config(config)
        try:
            # peft asks the backbone `is_gradient_checkpointing`, which transformers 5 marks
            # deprecated; the warning would greet every command that builds a model.
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
                )
                self.backbone = peft.get_peft_model(backbone, copy.deepcopy(lora), CHANNELS[0])
        except ValueError as exc:
            raise BackboneError(
                f"model.lora.target_modules {config.lora.target_modules} do not match modules "
                f"of backbone '{config.base_model_name}' ({exc})"
            ) from exc
        for channel in CHANNELS[1:]:
            self.backbone.add_adapter(channel, copy.deepcopy(lora))
        check_adapters(self.backbone)
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
        self.base_model_name = config.base_model_name
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

    def features_key(self, tokens: CodeTokens, dtype: torch.dtype) -> str:
        """A digest of everything :meth:`code_features` follow from: the backbone's name, what
        each channel's adapter adds to the weights it adapts, the tokens, the dtype and the
        source of the code that encodes.

        Adapters that add nothing (LoRA's B still zero) digest alike whatever their A, so an
        untrained model, a head-only stage and the model it trains share their features.
        """
        digest = hashlib.sha256()
        source = source_digest(MultiChannelEncoder, MergedBackbone, CodeFeatures)
        for part in (self.base_model_name, str(dtype), tokens.digest(), source):
            digest.update(part.encode() + b"|")
        for module in self.backbone.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for channel in CHANNELS:
                    delta = module.get_delta_weight(channel).detach()
                    # A zero delta may hold -0.0 where another holds 0.0: same function.
                    digest.update(delta.float().cpu().numpy().tobytes() if delta.any() else b"0")
        return digest.hexdigest()[:24]

    @torch.no_grad()
    def code_features(
        self,
        tokens: CodeTokens,
        item_queries: bool = False,
        dtype: torch.dtype = torch.float32,
        cache_dir: Path | None = None,
    ) -> CodeFeatures:
        """Every code's and index item's features with the adapters as they are now, without
        gradients, on the CPU; each distinct text of a channel runs once, through
        :meth:`merged_backbone` with its weights in ``dtype``.

        ``item_queries`` also reads every index item through the title adapter, as a query is
        read, which a stage needs only when it trains on items as queries from these features
        (a head-only stage): that pass is a third of the work, so embedding codes skips it. While
        the title and examples adapters read alike (both still the identity, as LoRA's B starts
        at zero), it is the examples pass and is not repeated.

        With ``cache_dir``, features an earlier call left there under :meth:`features_key` are
        read instead, and computed ones written there. Float32 features of the same adapters
        stand in for bfloat16 ones: they are what bfloat16 approximates, so a model trained
        head-only, whose stage computed them in float32, never runs its backbone again.
        """
        paths: dict[torch.dtype, Path] = {}
        if cache_dir is not None:
            paths = {
                readable: cache_dir / f"{self.features_key(tokens, readable)}.pt"
                for readable in dict.fromkeys([torch.float32, dtype])
            }
        for path in paths.values():
            cached = read_features(path, tokens, item_queries)
            if cached is not None:
                return cached
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
                if backbone.reading["title"] == backbone.reading["examples"]
                else unit_features(backbone, "title", tokens.item_ids, pad_id)
            )
        code_items = [torch.from_numpy(rows) for rows in tokens.code_items]
        features = CodeFeatures(channels, items, code_items)
        write_features(paths.get(dtype), features)
        return features

    @torch.no_grad()
    def query_features(
        self, backbone: MergedBackbone, queries: TextBatch
    ) -> dict[str, torch.Tensor]:
        """``{channel: (Q, H)}`` of free-text queries (one text each): the unit features of each
        query read by every one of ``QUERY_CHANNELS`` in a single pass of ``backbone``, zeros in
        the other channels; what :meth:`channel_features` gives their query tokens. Channels
        that read alike (``backbone.reading``) read the queries once."""
        count = len(queries.input_ids)
        readings = list(dict.fromkeys(backbone.reading[channel] for channel in QUERY_CHANNELS))
        pooled = backbone(
            queries.input_ids.repeat(len(readings), 1),
            queries.attention_mask.repeat(len(readings), 1),
            [(reading, count) for reading in readings],
        )
        read = dict(zip(readings, F.normalize(pooled, dim=-1).split(count), strict=True))
        zeros = torch.zeros((count, self.hidden_size), device=pooled.device)
        return {
            channel: read[backbone.reading[channel]] if channel in QUERY_CHANNELS else zeros
            for channel in CHANNELS
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
