"""Every code's texts, tokenized once per run and padded per batch.

A code has one text in each of the title, description and cross-references (``excluded``)
channels, and a list of texts in the examples channel: its index items, which the model reads one
at a time and averages (see ``MultiChannelEncoder``). A channel may hold no text for a code (most
codes have no cross-references); it then contributes nothing, instead of the embedding of an empty
string.

Tokenizing the texts takes a few seconds; doing it once (cached by tokenizer and token limits, so
the stages of a chain share it) and padding each batch only to its own longest text is what keeps
a training step at ~30 tokens per title instead of a fixed 512.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from naics_mlflow.config import TokenizationConfig
from naics_mlflow.data.taxonomy import Taxonomy

CHANNELS = ("title", "description", "excluded", "examples")
"""The four texts of a code, each encoded with its own LoRA adapter, in this order."""

SEMANTIC_CHANNELS = ("title", "description", "examples")
"""The channels that say what a code *is*; their unit mean is the fusion's skip path (see
``MultiChannelEncoder``). The cross-references are left out: they name other industries."""

TEXT_CHANNELS = ("title", "description", "excluded")
"""The channels with one text per code; ``examples`` holds a list of index items."""

# A free-text query (a business description) fills the channels a code's short texts use: it reads
# like a title and like one index item, and is cut at the index items' token limit in both.
# Training pairs index items with their codes through exactly this mapping (see
# ``NaicsDataModule``), so the adapters learn it.
QUERY_CHANNELS = ("title", "examples")


class TextBatch(NamedTuple):
    """K texts of one channel, padded to the longest, and whose each one is."""

    input_ids: torch.Tensor  # (K, L) long
    attention_mask: torch.Tensor  # (K, L) long
    owner: torch.Tensor  # (K,) long: the code (or query) of each text, in [0, size)


@dataclass(frozen=True)
class ChannelTokens:
    """The texts of ``size`` codes or queries, per channel. A code owns any number of texts in a
    channel (one title, several index items, no cross-references).

    ``lengths`` holds each text's number of real tokens per channel on the host, wherever the
    tensors are: a step plans its passes by length (:func:`padding_groups`), and reading the
    lengths back from a GPU would wait for all the work queued there before it.
    """

    size: int
    texts: dict[str, TextBatch]
    lengths: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.lengths:
            lengths = {c: b.attention_mask.sum(dim=1).cpu().numpy() for c, b in self.texts.items()}
            object.__setattr__(self, "lengths", lengths)

    def to(self, device: torch.device | str) -> ChannelTokens:
        """On ``device``, through :func:`sent_to`: Lightning copies a batch's own tensors to a
        GPU without waiting for it, but cannot tell this object's copies so."""
        device = torch.device(device)
        return ChannelTokens(
            self.size,
            {c: TextBatch(*(sent_to(t, device) for t in b)) for c, b in self.texts.items()},
            self.lengths,
        )


def sent_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a GPU through pinned memory, a copy that does
    not wait for the work queued on the GPU. A blocking copy waits for all of it, and a
    non-blocking one from pageable memory can too, through CUDA's staging buffer."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class TextRows(NamedTuple):
    """Every channel's texts of a :class:`ChannelTokens` as one batch, channel after channel in
    ``CHANNELS`` order, padded to the longest of all: what one backbone pass with one adapter per
    channel reads."""

    input_ids: torch.Tensor  # (N, L) long
    attention_mask: torch.Tensor  # (N, L) long
    channel: torch.Tensor  # (N,) long: each text's channel, an index into CHANNELS
    counts: list[int]  # texts per channel, in CHANNELS order
    lengths: np.ndarray  # (N,) int64 on the host: each text's real tokens

    @classmethod
    def of(cls, tokens: ChannelTokens) -> TextRows:
        batches = [tokens.texts[c] for c in CHANNELS]
        width = max(batch.input_ids.shape[1] for batch in batches)
        counts = [len(batch.owner) for batch in batches]
        device = batches[0].owner.device

        def widened(matrix: torch.Tensor) -> torch.Tensor:
            # Any token id will do where the attention mask is zero: it is never attended to.
            return F.pad(matrix, (0, width - matrix.shape[1]))

        return cls(
            input_ids=torch.cat([widened(b.input_ids) for b in batches]),
            attention_mask=torch.cat([widened(b.attention_mask) for b in batches]),
            # Filled on the device: a tensor of the counts copied there would wait for its queue.
            channel=torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(counts)]),
            counts=counts,
            lengths=np.concatenate([tokens.lengths[c] for c in CHANNELS]).astype(np.int64),
        )


def padding_groups(lengths: np.ndarray, count: int) -> list[tuple[np.ndarray, int]]:
    """Texts of ``lengths`` as at most ``count`` groups of similar length that, each padded to
    its own longest text, hold the fewest tokens: ``[(indices, longest), ...]``, shortest first.

    The groups are runs of the texts sorted by length, split by dynamic programming over the
    distinct lengths (at most a channel's token limit, so a few hundred thousand additions).
    Splitting into equal counts instead pads twice as much: a step's texts are mostly short
    index items and titles, with a long tail of descriptions (docs/results.md).
    """
    if len(lengths) == 0:
        return []
    order = np.argsort(lengths, kind="stable")
    values, first = np.unique(lengths[order], return_index=True)
    ends = np.append(first[1:], len(lengths))  # rows up to each distinct length's last
    groups = min(count, len(values))
    # cost[i, j]: the rows of distinct lengths i..j as one group, padded to length j.
    starts = np.append(0, ends[:-1])
    cost = (ends[None, :] - starts[:, None]) * values[None, :].astype(np.float64)
    cost[np.tril_indices(len(values), -1)] = np.inf
    best = cost[0].copy()  # best[j]: distinct lengths 0..j in the groups so far
    splits = []
    for _ in range(groups - 1):
        total = np.append(0.0, best[:-1])[:, None] + cost  # the last group starts at i
        splits.append(total.argmin(axis=0))
        best = total.min(axis=0)
    bounds = [len(values)]
    for split in reversed(splits):
        if bounds[-1] == 0:  # fewer groups padded as little
            break
        bounds.append(int(split[bounds[-1] - 1]))
    bounds = sorted({0, *bounds})
    return [
        (order[starts[i] : ends[j - 1]], int(values[j - 1])) for i, j in itertools.pairwise(bounds)
    ]


def pad(sequences: list[np.ndarray], owners: list[int], pad_token_id: int) -> TextBatch:
    """Pad token id arrays to the longest of them; no sequences give a (0, 0) batch.

    Filled through one mask of the real tokens, not text by text: a LoRA stage's batch pads
    about ten thousand texts, which one by one took most of its collation (docs/results.md).
    """
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    real = np.arange(lengths.max(initial=0)) < lengths[:, None]
    input_ids = np.full(real.shape, pad_token_id, dtype=np.int64)
    if sequences:
        input_ids[real] = np.concatenate(sequences)  # row-major order: each text's tokens in turn
    return TextBatch(
        torch.from_numpy(input_ids),
        torch.from_numpy(real.astype(np.int64)),
        torch.tensor(owners, dtype=torch.long),
    )


def length_batches(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Indices of sequences of ``lengths``, shortest first, in batches that hold at most
    ``budget`` tokens once padded to their longest (a longer sequence runs alone)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batch: list[int] = []
    for index in order:
        if batch and (len(batch) + 1) * lengths[index] > budget:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def channel_texts(taxonomy: Taxonomy) -> dict[str, list[str]]:
    """The text of each single-text channel for every code, in taxonomy order ('' for none)."""
    return {
        "title": taxonomy.titles,
        "description": taxonomy.descriptions,
        "excluded": [" ".join(sentences) for sentences in taxonomy.excluded],
    }


def max_lengths(config: TokenizationConfig) -> dict[str, int]:
    """Token limit per channel; the examples limit applies to each index item."""
    return {
        "title": config.title_max_length,
        "description": config.description_max_length,
        "excluded": config.excluded_max_length,
        "examples": config.examples_max_length,
    }


@dataclass(frozen=True)
class CodeTokens:
    """Unpadded token ids of every code's texts; :meth:`batch` pads a selection.

    Index items are stored once each (``item_ids``): a six-digit code's items are also its
    ancestors' examples.
    """

    ids: dict[str, list[np.ndarray | None]]  # TEXT_CHANNELS -> N arrays, None for no text
    item_ids: list[np.ndarray]  # the distinct index items' token ids
    item_texts: list[str]  # and their texts
    code_items: list[np.ndarray]  # N arrays of indices into item_ids: each code's examples
    pad_token_id: int

    def batch(
        self, rows: np.ndarray | torch.Tensor, examples: list[np.ndarray] | None = None
    ) -> ChannelTokens:
        """Tokens of the codes at ``rows``; ``examples`` gives the items each one reads (indices
        into ``item_ids``), all of its items by default."""
        rows = np.asarray(rows)
        examples = [self.code_items[row] for row in rows] if examples is None else examples
        texts = {}
        for channel in TEXT_CHANNELS:
            owners = [i for i, row in enumerate(rows) if self.ids[channel][row] is not None]
            sequences = [self.ids[channel][rows[i]] for i in owners]
            texts[channel] = pad(sequences, owners, self.pad_token_id)
        owners = [i for i, items in enumerate(examples) for _ in items]
        sequences = [self.item_ids[item] for items in examples for item in items]
        texts["examples"] = pad(sequences, owners, self.pad_token_id)
        return ChannelTokens(len(rows), texts)

    def digest(self) -> str:
        """A digest of every token id and of which items each code reads: equal digests, equal
        inputs to the backbone."""
        digest = hashlib.sha256()
        for sequences in [*self.ids.values(), self.item_ids, self.code_items]:
            for sequence in sequences:
                # Each sequence's length first (-1: no text), so that no two lists read alike.
                length = -1 if sequence is None else len(sequence)
                digest.update(np.int64(length).tobytes())
                if sequence is not None:
                    digest.update(np.ascontiguousarray(sequence, np.int64).tobytes())
        digest.update(str(self.pad_token_id).encode())
        return digest.hexdigest()[:24]

    def subset(self, rows: np.ndarray) -> CodeTokens:
        """The tokens of the codes at ``rows`` only, with only the items they read."""
        items = np.unique(np.concatenate([self.code_items[row] for row in rows]))
        return CodeTokens(
            ids={channel: [ids[row] for row in rows] for channel, ids in self.ids.items()},
            item_ids=[self.item_ids[item] for item in items],
            item_texts=[self.item_texts[item] for item in items],
            code_items=[np.searchsorted(items, self.code_items[row]) for row in rows],
            pad_token_id=self.pad_token_id,
        )


_CACHE: dict[tuple, CodeTokens] = {}


def _token_ids(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[np.ndarray]:
    # Neither mask nor token types is kept: building them as Python lists was a third of the
    # time it took to tokenize every code's texts (0.36 of 1.18 s, docs/results.md).
    encoded = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in encoded]


def tokenize_codes(
    taxonomy: Taxonomy, tokenizer: PreTrainedTokenizerBase, config: TokenizationConfig
) -> CodeTokens:
    """Tokenize all codes' texts, truncated to the configured per-channel limits."""
    limits = max_lengths(config)
    key = (tokenizer.name_or_path, len(tokenizer), tuple(limits.items()), tuple(taxonomy.codes))
    if key in _CACHE:
        return _CACHE[key]
    ids: dict[str, list[np.ndarray | None]] = {}
    for channel, texts in channel_texts(taxonomy).items():
        present = [i for i, text in enumerate(texts) if text]
        column: list[np.ndarray | None] = [None] * len(texts)
        for i, seq in zip(
            present,
            _token_ids([texts[i] for i in present], tokenizer, limits[channel]),
            strict=True,
        ):
            column[i] = seq
        ids[channel] = column
    item_index: dict[str, int] = {}
    code_items = [
        np.asarray(
            [item_index.setdefault(text, len(item_index)) for text in dict.fromkeys(items)],
            np.int64,
        )
        for items in taxonomy.examples
    ]
    item_texts = list(item_index)
    _CACHE[key] = CodeTokens(
        ids=ids,
        item_ids=_token_ids(item_texts, tokenizer, limits["examples"]),
        item_texts=item_texts,
        code_items=code_items,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _CACHE[key]


def query_tokens(ids: list[np.ndarray], pad_token_id: int) -> ChannelTokens:
    """Queries as channel tokens: each one's ids as the title and as the one index item of the
    examples channel; the description and cross-references channels hold nothing."""
    query = pad(ids, list(range(len(ids))), pad_token_id)
    empty = pad([], [], pad_token_id)
    return ChannelTokens(
        len(ids), {channel: query if channel in QUERY_CHANNELS else empty for channel in CHANNELS}
    )


class QueryIds(NamedTuple):
    ids: list[np.ndarray]  # each query's token ids, cut at the limit
    cut: list[bool]  # whether each query was longer than the limit (only its beginning is read)


def query_ids(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> QueryIds:
    """Token ids of free-text queries, cut at ``max_length`` tokens, and which were cut.

    One tokenizer pass gives both: what a query holds past the limit comes back as further rows
    of it (overflow). Tokenizing once more, uncut, to see which were long cost ``search`` about
    0.07 ms a query (docs/results.md), and made the tokenizer warn about a query longer than the
    backbone's 512 positions that was never going to be read whole.
    """
    if not texts:
        return QueryIds([], [])  # the tokenizer refuses an empty list
    encoded = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        return_overflowing_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids: list[np.ndarray | None] = [None] * len(texts)
    cut = [False] * len(texts)
    for row, query in zip(encoded["input_ids"], encoded["overflow_to_sample_mapping"], strict=True):
        if ids[query] is None:
            ids[query] = np.asarray(row, dtype=np.int64)
        else:
            cut[query] = True
    return QueryIds(ids, cut)


def tokenize_queries(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, config: TokenizationConfig
) -> ChannelTokens:
    """Free-text queries as :func:`query_tokens` of their :func:`query_ids`."""
    ids = query_ids(texts, tokenizer, config.examples_max_length).ids
    return query_tokens(ids, tokenizer.pad_token_id)
