"""One LoRA adapter per text channel on the frozen backbone, trained on passes that mix the
channels' texts: each text (row of a pass) goes through its own channel's adapter.

An adapted linear layer computes ``W x + b + scaling * B_c A_c dropout(x)`` for a row of channel
``c``, LoRA as peft computes it. peft activates one adapter for the whole model, so the four
channels took four passes of the backbone a step, and each of the hundreds of small kernels of a
pass is a launch the host makes one by one (what bound the GPU step, docs/results.md). Here the
channels' adapters are stacked into one of rank ``C * r``, and a mask keeps each row's own
channel's ``r`` columns of ``A x``: two products per layer for all channels, at C times the cost
of LoRA's products, which are a few percent of a layer's.

The modules are named as peft named them (``base_model.model.<path>.lora_A.<channel>.weight``,
the adapted layer's own weight under ``base_layer``), so checkpoints of either load in both and
:func:`~naics_mlflow.model.merged.adapter_deltas` reads them alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from naics_mlflow.config import ModelConfig
from naics_mlflow.data.pretrained import BackboneError
from naics_mlflow.model.attention import shape_agnostic_attention
from naics_mlflow.model.merged import is_lora_target


class RowChannels:
    """Which channel each row of the current pass belongs to, as the mask the adapted layers
    multiply ``A x`` by: ``(N, C * r)``, ``scaling`` in the row's channel's ``r`` columns and
    zeros elsewhere. Shared by every adapted layer of one backbone."""

    def __init__(self, channels: int, rank: int, scaling: float) -> None:
        self.channels, self.rank, self.scaling = channels, rank, scaling
        self._masks: dict[torch.dtype, torch.Tensor] = {}

    def set(self, channel_of_row: torch.Tensor) -> None:
        """``(N,)`` long channel indices of the next pass's rows."""
        # A comparison, not F.one_hot, which checks its input's range by reading it back: on a
        # GPU a wait for everything queued before each pass.
        channels = torch.arange(self.channels, device=channel_of_row.device)
        one_hot = (channel_of_row[:, None] == channels).float() * self.scaling
        self._masks = {torch.float32: one_hot.repeat_interleave(self.rank, dim=1)}

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask in ``dtype`` (autocast's, under mixed precision), cast once a pass."""
        if dtype not in self._masks:
            self._masks[dtype] = self._masks[torch.float32].to(dtype)
        return self._masks[dtype]


class ChannelLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) with one LoRA adapter per channel; each row of
    its input, ``(N, L, in)`` token states or ``(N, in)`` (BERT's pooler), takes the adapter
    that ``rows`` gives it."""

    def __init__(self, base_layer: nn.Linear, rank: int, dropout: float, rows: RowChannels):
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.rows = rows

    def add_channel(self, channel: str) -> None:
        """A new adapter that adds nothing yet: A drawn like an ``nn.Linear``'s weight, B zero.

        Both layers are built as peft builds them, each drawing its default initialisation, so a
        seed gives the same A matrices, and the same draws to whatever is built after, as when
        training ran peft's adapters.
        """
        in_features, out_features = self.base_layer.in_features, self.base_layer.out_features
        device = self.base_layer.weight.device
        self.lora_A[channel] = nn.Linear(in_features, self.rank, bias=False, device=device)
        self.lora_B[channel] = nn.Linear(self.rank, out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A[channel].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[channel].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked_a = torch.cat([a.weight for a in self.lora_A.values()])  # (C*r, in)
        stacked_b = torch.cat([b.weight for b in self.lora_B.values()], dim=1)  # (out, C*r)
        low_rank = F.linear(self.lora_dropout(x), stacked_a)
        mask = self.rows.mask(low_rank.dtype)
        low_rank = low_rank * mask.view(len(mask), *[1] * (low_rank.dim() - 2), -1)
        return self.base_layer(x) + F.linear(low_rank, stacked_b)


def adapted_paths(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Paths of ``model``'s layers that ``target_modules`` names (:func:`is_lora_target`); each
    must be a linear layer."""
    paths = [path for path, _ in model.named_modules() if is_lora_target(path, target_modules)]
    for path in paths:
        if not isinstance(model.get_submodule(path), nn.Linear):
            raise BackboneError(
                f"model.lora.target_modules adapts {path}, which is not a linear layer; name "
                "linear layers of the encoder's layers (query, key, value, dense)"
            )
    return paths


class ChannelAdaptedBackbone(nn.Module):
    """The frozen backbone with ``model.lora``'s adapters, one per channel, on the layers
    ``model.lora.target_modules`` names. ``forward`` runs one pass whose rows each name their
    channel."""

    def __init__(self, model: nn.Module, config: ModelConfig, channels: tuple[str, ...]) -> None:
        super().__init__()
        paths = adapted_paths(model, list(config.lora.target_modules))
        if not paths:
            raise BackboneError(
                f"model.lora.target_modules {config.lora.target_modules} do not match linear "
                f"layers of backbone '{config.base_model_name}'"
            )
        self.rows = RowChannels(len(channels), config.lora.r, config.lora.scaling)
        self.channels = channels
        adapted = {}
        for path in paths:
            parent, _, name = path.rpartition(".")
            owner = model.get_submodule(parent)
            adapted[path] = ChannelLoRALinear(
                getattr(owner, name), config.lora.r, config.lora.dropout, self.rows
            )
            setattr(owner, name, adapted[path])
        # Channel by channel over every layer: the order of peft's draws (see add_channel).
        for channel in channels:
            for layer in adapted.values():
                layer.add_channel(channel)
        # Named as peft's wrapper named the model it adapts; see the module's docstring.
        self.base_model = nn.Module()
        self.base_model.model = model

    @property
    def model(self) -> nn.Module:
        """The backbone itself, its adapted layers in place."""
        return self.base_model.model

    @property
    def config(self):
        return self.model.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, channel_of_row: torch.Tensor
    ) -> torch.Tensor:
        """Last hidden states ``(N, L, H)`` of ``N`` texts, each through the adapter of its
        channel (``channel_of_row``: ``(N,)`` indices into ``channels``)."""
        self.rows.set(channel_of_row)
        # The padding mask as SDPA reads it, (N, 1, 1, L): given 2-D, transformers first asks
        # whether any token is padded, which reads the mask back, on a GPU a wait for all the
        # work queued before the pass.
        attend = attention_mask.bool()[:, None, None, :]
        with shape_agnostic_attention():
            return self.model(input_ids=input_ids, attention_mask=attend).last_hidden_state
