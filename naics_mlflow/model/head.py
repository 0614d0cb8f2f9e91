"""What the multi-channel encoder is without its trainable backbone: the head that turns channel
features into points on the hyperboloid, and the passes without gradients that compute those
features from the backbone with every adapter merged.

Two encoders share it and differ only in where the backbone's weights and the adapters' LoRA
tensors come from: :class:`~naics_mlflow.model.encoder.MultiChannelEncoder` (training: LoRA
adapters on the transformers model) and :class:`~naics_mlflow.model.trained.TrainedEncoder`
(``embed``, ``search``, ``evaluate``, the served model: read from a checkpoint and the backbone's
files, without importing transformers' model classes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from naics_mlflow.config import ModelConfig
from naics_mlflow.data.disk_cache import source_digest
from naics_mlflow.data.features import CodeFeatures, read_features, write_features
from naics_mlflow.data.tokenization import (
    CHANNELS,
    QUERY_CHANNELS,
    SEMANTIC_CHANNELS,
    TEXT_CHANNELS,
    CodeTokens,
    TextBatch,
)
from naics_mlflow.model.lorentz import LorentzProjection
from naics_mlflow.model.merged import (
    AdapterDeltas,
    BertWeights,
    MergedBackbone,
    adapter_deltas,
    unit_features,
)
from naics_mlflow.model.moe import MixtureOfExperts

# Codes per pass of the head when embedding the whole taxonomy without gradients.
EMBED_BATCH_SIZE = 1024


class EncoderOutput(NamedTuple):
    embeddings: torch.Tensor  # (U, D+1) float32 points on the hyperboloid
    expert_utilisation: torch.Tensor  # (E,) share of routing slots per expert
    mean_gate_probability: torch.Tensor  # (E,) mean gate probability per expert


class EncoderHead(nn.Module):
    """The head, ``normalize(sum of the title, description and examples features) + MoE(all
    four)`` projected onto the hyperboloid (:meth:`head`), and every code's and query's channel
    features computed without gradients through :meth:`merged_backbone`.

    The experts' output layer and the projection's bias start at zero and its weight orthogonal.
    An untrained model therefore places codes and queries by the pretrained backbone's own
    sentence similarity (all at radius 1, so distance ranks like cosine, when ``embedding_dim`` is
    at least the backbone's hidden size) and training starts from there, instead of from a random
    mixing of the channels that a few minutes of training cannot undo.

    Subclasses say where the backbone's weights (:meth:`backbone_weights`) and the adapters' LoRA
    tensors (:meth:`lora_tensors`) come from.
    """

    def __init__(self, config: ModelConfig, curvature: float, hidden_size: int) -> None:
        super().__init__()
        self.fusion = MixtureOfExperts(
            input_dim=len(CHANNELS) * hidden_size,
            output_dim=hidden_size,
            num_experts=config.moe.num_experts,
            top_k=config.moe.top_k,
            hidden_dim=config.moe.hidden_dim,
        )
        nn.init.zeros_(self.fusion.w2)
        nn.init.zeros_(self.fusion.b2)
        self.projection = LorentzProjection(hidden_size, config.embedding_dim, curvature)
        nn.init.orthogonal_(self.projection.linear.weight)
        nn.init.zeros_(self.projection.linear.bias)
        self.hidden_size = hidden_size
        self.base_model_name = config.base_model_name
        self.lora_scaling = config.lora.scaling

    def backbone_weights(self) -> BertWeights:
        """The frozen backbone's own weights."""
        raise NotImplementedError

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """Every channel's LoRA tensors, named as in the backbone (``lora_A.<channel>.weight``)."""
        raise NotImplementedError

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes, named as a checkpoint names it (less ``encoder.``)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.projection.linear.weight.device

    def head(self, features: dict[str, torch.Tensor]) -> EncoderOutput:
        """Channel features ``{channel: (U, H)}`` -> points on the hyperboloid."""
        semantic = F.normalize(sum(features[c].float() for c in SEMANTIC_CHANNELS), dim=-1)
        fused = self.fusion(torch.cat([features[c] for c in CHANNELS], dim=-1))
        return EncoderOutput(
            embeddings=self.projection(semantic + fused.output),
            expert_utilisation=fused.expert_utilisation,
            mean_gate_probability=fused.mean_gate_probability,
        )

    @torch.no_grad()
    def embed_codes(self, features: CodeFeatures, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), D+1) embeddings of codes from their channel features, in eval mode."""
        was_training = self.training
        self.eval()
        rows = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        chunks = []
        for chunk in rows.split(EMBED_BATCH_SIZE):
            features_of = {c: t.to(self.device) for c, t in features.of_codes(chunk).items()}
            chunks.append(self.head(features_of).embeddings)
        self.train(was_training)
        return torch.cat(chunks)

    def adapter_deltas(self) -> AdapterDeltas:
        """Each channel's adapter as the weights it adds to the backbone's, as they are now."""
        return adapter_deltas(self.lora_tensors(), self.lora_scaling, CHANNELS)

    def merged_backbone(self, dtype: torch.dtype = torch.float32) -> MergedBackbone:
        """The backbone with the adapters as they are now merged, for encoding without
        gradients, its weights in ``dtype`` (see :class:`MergedBackbone`)."""
        return MergedBackbone(self.backbone_weights(), self.adapter_deltas(), CHANNELS, dtype)

    def features_key(self, tokens: CodeTokens, dtype: torch.dtype) -> str:
        """A digest of everything :meth:`code_features` follow from: the backbone's name, what
        each channel's adapter adds to the weights it adapts, the tokens, the dtype and the
        source of the code that encodes.

        Adapters that add nothing (LoRA's B still zero) digest alike whatever their A, so an
        untrained model, a head-only stage, the model it trains and that model read back from
        its checkpoint share their features.
        """
        digest = hashlib.sha256()
        source = source_digest(EncoderHead, MergedBackbone, CodeFeatures)
        for part in (self.base_model_name, str(dtype), tokens.digest(), source):
            digest.update(part.encode() + b"|")
        deltas = self.adapter_deltas()
        for path in sorted(deltas[CHANNELS[0]]):
            for channel in CHANNELS:
                delta = deltas[channel][path]
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
        the other channels; what the training encoder's ``channel_features`` gives their query
        tokens. Channels that read alike (``backbone.reading``) read the queries once."""
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
