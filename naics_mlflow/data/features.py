"""Channel features: one unit vector per code (or query) and channel, what the fusion head reads.

A text's feature is its pooled backbone state (through the channel's adapter) scaled to unit
length; a channel with several texts (the examples channel's index items) has the unit mean of
its texts' features; a channel with no text has the zero vector. :class:`CodeFeatures` holds them
for every code, computed once with frozen adapters, so a head-only stage trains on lookups instead
of backbone passes; :func:`read_features` and :func:`write_features` keep them on disk between
commands, under a digest of everything they follow from (``EncoderHead.features_key``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from naics_mlflow.data.disk_cache import read_cached, write_cached
from naics_mlflow.data.tokenization import TEXT_CHANNELS, CodeTokens

logger = logging.getLogger(__name__)

# Under dirs.outputs: the channel features of every set of adapters a command has encoded with.
CHANNEL_FEATURES_CACHE = "channel_features"


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
        owner = torch.cat(
            [torch.full((len(items),), row) for row, items in enumerate(self.code_items)]
        )
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


def write_features(path: Path | None, features: CodeFeatures) -> None:
    """Cache ``features`` at ``path`` (nothing when None); which items each code reads is not
    written: it comes from the tokens the file's name digests."""
    tensors = {f"channels.{channel}": values for channel, values in features.channels.items()}
    tensors.update({f"items.{channel}": values for channel, values in features.items.items()})
    write_cached(path, tensors, "channel features")


def read_features(path: Path | None, tokens: CodeTokens, item_queries: bool) -> CodeFeatures | None:
    """The features cached at ``path`` for ``tokens``, or None when there are none, they cannot
    be read, or they lack the items' title features that ``item_queries`` asks for."""
    cached = read_cached(path, "channel features")
    if cached is None:
        return None
    channels = {channel: cached.get(f"channels.{channel}") for channel in TEXT_CHANNELS}
    wanted = ("examples", "title") if item_queries else ("examples",)
    items = {
        channel: cached[f"items.{channel}"] for channel in wanted if f"items.{channel}" in cached
    }
    codes, item_count = len(tokens.code_items), len(tokens.item_ids)
    if len(items) < len(wanted):
        return None  # computed again with the title features, and the file replaced
    if any(values is None or len(values) != codes for values in channels.values()) or any(
        len(values) != item_count for values in items.values()
    ):
        logger.warning("ignoring cached channel features %s: not one row per code and item", path)
        return None
    logger.info("channel features read from %s", path)
    code_items = [torch.from_numpy(rows) for rows in tokens.code_items]
    return CodeFeatures(channels, items, code_items)
