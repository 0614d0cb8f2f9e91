"""Channel features: one unit vector per code (or query) and channel, what the fusion head reads.

A text's feature is its pooled backbone state (through the channel's adapter) scaled to unit
length; a channel with several texts (the examples channel's index items) has the unit mean of
its texts' features; a channel with no text has the zero vector. :class:`CodeFeatures` holds them
for every code, computed once with frozen adapters, so a head-only stage trains on lookups instead
of backbone passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from naics_mlflow.data.tokenization import TEXT_CHANNELS


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the token states over real (unpadded) tokens: (U, L, H), (U, L) -> (U, H)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pool_by_owner(vectors: Tensor, owner: Tensor, size: int) -> Tensor:
    """Unit mean of the unit-length ``vectors`` of each owner: ``(K, H)``, ``(K,)`` -> ``(size,
    H)``; an owner with no vector gets zeros.

    Unit length first, because the backbone's pooled norms differ by text (a MiniLM title's is
    about twice a description's) and would otherwise weigh some texts more than others.
    """
    units = F.normalize(vectors.float(), dim=-1)
    summed = torch.zeros((size, units.shape[-1]), device=units.device).index_add(0, owner, units)
    return F.normalize(summed, dim=-1)


@dataclass(frozen=True)
class CodeFeatures:
    """Every code's channel features and every index item's features, under fixed adapters.

    ``channels`` maps each of ``TEXT_CHANNELS`` to ``(N, H)`` (zero rows for no text);
    ``items`` maps ``examples`` (and ``title`` when items are to be read as queries, which read
    both) to ``(M, H)`` unit features of each distinct index item read by that channel's
    adapter; ``code_items`` lists each code's items. The examples feature of a code is the unit
    mean of its items' ``examples`` features.
    """

    channels: dict[str, Tensor]
    items: dict[str, Tensor]
    code_items: list[Tensor]

    def __post_init__(self) -> None:
        owner = torch.cat([torch.full((len(items),), row) for row, items in enumerate(self.code_items)])
        members = torch.cat(self.code_items)
        size = len(self.code_items)
        units = self.items["examples"]
        summed = torch.zeros((size, units.shape[-1])).index_add(0, owner, units[members])
        # Frozen dataclass: the sums are derived once, here.
        object.__setattr__(self, "_examples_sum", summed)
        object.__setattr__(self, "_examples_count", torch.bincount(owner, minlength=size))

    def of_codes(self, rows: Tensor, left_out: Tensor | None = None) -> dict[str, Tensor]:
        """Features of the codes at ``rows`` ``(U,)``; ``left_out`` ``(U,)`` names one of each
        code's items to leave out of its examples (-1 for none), so that a query drawn from a
        code's items is not in that code's texts."""
        features = {channel: self.channels[channel][rows] for channel in TEXT_CHANNELS}
        total, count = self._examples_sum[rows], self._examples_count[rows]
        if left_out is not None:
            leaving = left_out >= 0
            total = total - self.items["examples"][left_out.clamp(min=0)] * leaving.unsqueeze(1)
            count = count - leaving.long()
        # Subtracting a code's only item leaves rounding noise, not a direction: zero it.
        features["examples"] = F.normalize(total, dim=-1) * (count > 0).unsqueeze(1)
        return features

    def of_queries(self, items: Tensor) -> dict[str, Tensor]:
        """Features of index items read as free-text queries: title and examples channels.
        Needs the items' title features (``MultiChannelEncoder.code_features(item_queries=True)``).
        """
        zeros = torch.zeros((len(items), self.items["title"].shape[-1]))
        return {
            "title": self.items["title"][items],
            "description": zeros,
            "excluded": zeros,
            "examples": self.items["examples"][items],
        }
