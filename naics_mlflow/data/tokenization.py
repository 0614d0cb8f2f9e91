"""Every code's four text channels, tokenized once per run and padded per batch.

Tokenizing the 2,125 x 4 texts takes a second or two; doing it once (cached by tokenizer and token
limits, so the stages of a chain share it) and padding each batch only to its own longest text is
what keeps a training step at ~30 tokens per title instead of a fixed 512.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from naics_mlflow.config import TokenizationConfig
from naics_mlflow.data.taxonomy import Taxonomy
from naics_mlflow.model import CHANNELS
from naics_mlflow.model.encoder import ChannelTokens


def channel_texts(taxonomy: Taxonomy) -> dict[str, list[str]]:
    """The text of each channel for every code, in taxonomy order."""
    return {
        "title": taxonomy.titles,
        "description": taxonomy.descriptions,
        "excluded": [" ".join(sentences) for sentences in taxonomy.excluded],
        "examples": ["; ".join(items) for items in taxonomy.examples],
    }


def max_lengths(config: TokenizationConfig) -> dict[str, int]:
    return {
        "title": config.title_max_length,
        "description": config.description_max_length,
        "excluded": config.excluded_max_length,
        "examples": config.examples_max_length,
    }


@dataclass(frozen=True)
class CodeTokens:
    """Unpadded token ids of every code's channels; :meth:`batch` pads a selection."""

    ids: dict[str, list[np.ndarray]]  # channel -> N arrays of token ids (with special tokens)
    pad_token_id: int

    def batch(self, rows: np.ndarray | torch.Tensor) -> ChannelTokens:
        """``(input_ids, attention_mask)`` per channel for the codes at ``rows``, each (U, L)
        where L is the longest of those codes' texts in that channel."""
        rows = np.asarray(rows)
        tokens = {}
        for channel in CHANNELS:
            sequences = [self.ids[channel][row] for row in rows]
            length = max(len(seq) for seq in sequences)
            input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
            for i, seq in enumerate(sequences):
                input_ids[i, : len(seq)] = torch.from_numpy(seq)
                attention_mask[i, : len(seq)] = 1
            tokens[channel] = (input_ids, attention_mask)
        return tokens


# A free-text query (a business description) fills the channels a code's short texts use: it reads
# like a title and like an index item. Training pairs index items with their codes through exactly
# this mapping (see ``NaicsDataModule``), so the adapters learn it.
QUERY_CHANNELS = ("title", "examples")

_CACHE: dict[tuple, CodeTokens] = {}


def _tokenize(
    texts: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, limits: dict[str, int]
) -> CodeTokens:
    ids = {
        channel: [
            np.asarray(seq, dtype=np.int64)
            for seq in tokenizer(texts[channel], truncation=True, max_length=limits[channel])[
                "input_ids"
            ]
        ]
        for channel in CHANNELS
    }
    return CodeTokens(ids=ids, pad_token_id=tokenizer.pad_token_id)


def tokenize_codes(
    taxonomy: Taxonomy, tokenizer: PreTrainedTokenizerBase, config: TokenizationConfig
) -> CodeTokens:
    """Tokenize all codes' channels, truncated to the configured per-channel limits."""
    limits = max_lengths(config)
    key = (tokenizer.name_or_path, len(tokenizer), tuple(limits.items()), tuple(taxonomy.codes))
    if key not in _CACHE:
        _CACHE[key] = _tokenize(channel_texts(taxonomy), tokenizer, limits)
    return _CACHE[key]


def tokenize_queries(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, config: TokenizationConfig
) -> ChannelTokens:
    """Queries as channel tokens: the text in :data:`QUERY_CHANNELS`, the other channels empty."""
    empty = [""] * len(texts)
    by_channel = {channel: texts if channel in QUERY_CHANNELS else empty for channel in CHANNELS}
    return _tokenize(by_channel, tokenizer, max_lengths(config)).batch(np.arange(len(texts)))


def truncated_queries(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, config: TokenizationConfig
) -> list[bool]:
    """For each query, whether it is longer than the query channels read (only its beginning is
    used); a second tokenizer pass, so only ``search`` pays for it, not training."""
    limits = max_lengths(config)
    limit = max(limits[channel] for channel in QUERY_CHANNELS)
    return [len(ids) > limit for ids in tokenizer(texts)["input_ids"]]
