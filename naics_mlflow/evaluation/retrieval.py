"""Place free text in the taxonomy: embed queries with a trained model and rank codes by Lorentz
distance, plus the lexical signal for national industries. Used by ``search``, ``evaluate`` and
the served MLflow model.

A query's score for a six-digit code is ``-d_H(query, code) / temperature + lexical_weight *
tfidf(query, code)``: the model's own logit (its training turns distances into probabilities at
``loss.temperature``) plus the TF-IDF cosine of :mod:`naics_mlflow.evaluation.lexical`, weighted
by ``search.lexical_weight`` (chosen on the dev split; 0 ranks by the embedding alone). Codes of
levels 2-5 have no index items of their own, so they are ranked by the embedding alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

import naics_mlflow
from naics_mlflow.config import TokenizationConfig
from naics_mlflow.data.pretrained import load_tokenizer
from naics_mlflow.data.taxonomy import MAX_LEVEL, MIN_LEVEL, Taxonomy
from naics_mlflow.data.tokenization import (
    QUERY_CHANNELS,
    TextBatch,
    length_batches,
    pad,
    query_ids,
    tokenize_codes,
    truncated_queries,
)
from naics_mlflow.errors import UserError
from naics_mlflow.evaluation.lexical import LexicalIndex, code_documents, six_digit_rows
from naics_mlflow.model.checkpoint import weights_digest
from naics_mlflow.model.encoder import MergedBackbone, MultiChannelEncoder
from naics_mlflow.model.lorentz import pairwise_distance
from naics_mlflow.model.merged import pass_tokens
from naics_mlflow.model.module import NaicsEmbedder

logger = logging.getLogger(__name__)

MAX_TOP_K = 100
# Under dirs.outputs: the codes' embeddings of each model that a command has built an engine of.
CODE_EMBEDDINGS_CACHE = "code_embeddings"


class QueryError(UserError):
    """A search request that cannot be answered as asked."""


@dataclass(frozen=True)
class Match:
    code: str
    title: str
    level: int
    distance: float  # Lorentz distance from the query
    score: float  # what the ranking sorts by, higher first


def hybrid_scores(
    distance: torch.Tensor, lexical: torch.Tensor | None, temperature: float, weight: float
) -> torch.Tensor:
    """``(Q, C)`` ``-distance / temperature + weight * lexical``; the embedding alone without
    ``lexical``."""
    logits = -distance / temperature
    return logits if lexical is None else logits + weight * lexical.to(logits.device)


def check_request(texts: list[str], top_k: int, level: int | None) -> None:
    """Reject empty texts and out-of-range ``top_k`` / ``level`` before any model work."""
    for position, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise QueryError(f"query {position + 1} is empty; give a business description")
    if not 1 <= top_k <= MAX_TOP_K:
        raise QueryError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    if level is not None and not MIN_LEVEL <= level <= MAX_LEVEL:
        raise QueryError(f"level must be between {MIN_LEVEL} and {MAX_LEVEL}, got {level}")


def query_batches(
    encoder: MultiChannelEncoder,
    backbone: MergedBackbone,
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizationConfig,
    texts: list[str],
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """The channel features of free-text queries, batch by batch, with the positions of the
    queries each batch holds.

    Queries run shortest first, each batch one pass of the merged ``backbone`` for every query
    channel, of at most :func:`pass_tokens` tokens: many queries cost little padding and few
    passes.
    """
    ids = query_ids(texts, tokenizer, config)
    device = backbone.device
    budget = pass_tokens(device) // len(QUERY_CHANNELS)
    for rows in length_batches([len(sequence) for sequence in ids], budget):
        batch = pad([ids[i] for i in rows], list(range(len(rows))), tokenizer.pad_token_id)
        yield rows, encoder.query_features(backbone, TextBatch(*(t.to(device) for t in batch)))


def code_embeddings_key(embedder: NaicsEmbedder, taxonomy: Taxonomy, backbone_dtype: str) -> str:
    """A digest of everything the codes' embeddings follow from: the trained weights, the
    configuration saved with them (backbone name, token limits), every code's texts, the dtype
    of the backbone and this package's version (the encoding code)."""
    digest = hashlib.sha256()
    digest.update(weights_digest(embedder.encoder.trainable_state_dict()).encode())
    texts = [taxonomy.codes, taxonomy.titles, taxonomy.descriptions, taxonomy.excluded]
    payload = [embedder.config.to_dict(), texts, taxonomy.examples, backbone_dtype]
    digest.update(json.dumps([*payload, naics_mlflow.__version__], sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _read_cached(path: Path | None, size: int) -> torch.Tensor | None:
    """The cached embeddings at ``path``, or None when there are none or they cannot be read
    (then they are computed again and the file replaced)."""
    if path is None or not path.is_file():
        return None
    try:
        embeddings = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        logger.warning("ignoring unreadable cached code embeddings %s (%s)", path, exc)
        return None
    if not isinstance(embeddings, torch.Tensor) or len(embeddings) != size:
        logger.warning("ignoring cached code embeddings %s: not one row per code", path)
        return None
    logger.info("code embeddings read from %s", path)
    return embeddings


def _write_cached(path: Path | None, embeddings: torch.Tensor) -> None:
    """Write through a temporary file, so that a build stopped half-way leaves no cache. A folder
    that cannot be written costs the next command the embedding again, not this one its answer."""
    if path is None:
        return
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(embeddings.cpu(), partial)
        partial.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # nothing may have been written
            partial.unlink(missing_ok=True)
        logger.warning(
            "could not cache the code embeddings in %s (%s); set dirs.outputs to a writable "
            "folder to skip embedding them next time",
            path.parent,
            exc,
        )


@dataclass
class SearchEngine:
    """A trained model with every code embedded once, its adapters merged for queries, and the
    lexical index of the national industries, ready to answer queries."""

    embedder: NaicsEmbedder
    tokenizer: PreTrainedTokenizerBase
    codes: list[str]
    titles: list[str]
    levels: np.ndarray  # (N,)
    code_embeddings: torch.Tensor  # (N, D+1)
    lexical: LexicalIndex  # over the six-digit codes, in row order
    lexical_weight: float
    backbone_dtype: str = "float32"  # search.backbone_dtype: the merged backbone's weights
    backbone: MergedBackbone = field(init=False)  # the embedder's, adapters merged, for queries

    def __post_init__(self) -> None:
        self.backbone = self.embedder.encoder.merged_backbone(getattr(torch, self.backbone_dtype))

    @classmethod
    def build(
        cls,
        embedder: NaicsEmbedder,
        taxonomy: Taxonomy,
        lexical_weight: float,
        backbone_dtype: str = "float32",
        cache_dir: Path | None = None,
    ) -> SearchEngine:
        """The engine of a trained model; every code is embedded now, or read from ``cache_dir``
        when an earlier build of the same model, texts and dtype left it there."""
        tokenizer = load_tokenizer(embedder.config.model.base_model_name)
        cache = None
        if cache_dir is not None:
            key = code_embeddings_key(embedder, taxonomy, backbone_dtype)
            cache = cache_dir / f"{key}.pt"
        embeddings = _read_cached(cache, taxonomy.size)
        if embeddings is not None:
            embeddings = embeddings.to(embedder.device)
        else:
            started = time.perf_counter()
            config = embedder.config.data_loader.tokenization
            tokens = tokenize_codes(taxonomy, tokenizer, config)
            features = embedder.encoder.code_features(tokens, dtype=getattr(torch, backbone_dtype))
            embeddings = embedder.embed_codes(features, np.arange(taxonomy.size))
            logger.info(
                "embedded %d codes in %.1f s (%s backbone)",
                taxonomy.size,
                time.perf_counter() - started,
                backbone_dtype,
            )
            _write_cached(cache, embeddings)
        lexical = LexicalIndex(code_documents(taxonomy, six_digit_rows(taxonomy)))
        return cls(
            embedder,
            tokenizer,
            taxonomy.codes,
            taxonomy.titles,
            taxonomy.levels,
            embeddings,
            lexical,
            lexical_weight,
            backbone_dtype,
        )

    @torch.no_grad()
    def embed_queries(self, texts: list[str]) -> torch.Tensor:
        """(Q, D+1) Lorentz embeddings of free-text queries; says in one line how many texts were
        cut at the token limit (only their beginning is used).

        See :func:`query_batches`.
        """
        config = self.embedder.config.data_loader.tokenization
        truncated_count = sum(truncated_queries(texts, self.tokenizer, config))
        if truncated_count:
            logger.warning(
                "%d of %d queries are longer than the model reads (%d tokens); their beginning "
                "is used",
                truncated_count,
                len(texts),
                config.examples_max_length,
            )
        encoder = self.embedder.encoder
        embeddings = torch.empty((len(texts), self.code_embeddings.shape[1]))
        for rows, features in query_batches(encoder, self.backbone, self.tokenizer, config, texts):
            embeddings[rows] = encoder.head(features).embeddings.cpu()
        return embeddings.to(self.embedder.device)

    def candidates(self, level: int | None) -> np.ndarray:
        """Rows of the codes a query may match: one level, or all."""
        if level is None:
            return np.arange(len(self.codes))
        return np.flatnonzero(self.levels == level)

    def distances(self, queries: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """(Q, len(rows)) Lorentz distances of embedded queries to the codes at ``rows``.

        Computed to every code, then selected: gathering the candidates' embeddings first would
        copy them at every query, which costs a single query more than the extra distances."""
        curvature = self.embedder.config.loss.curvature
        return pairwise_distance(queries, self.code_embeddings, curvature)[:, rows]

    def scores(self, texts: list[str], distances: torch.Tensor, level: int | None) -> torch.Tensor:
        """(Q, C) ranking scores from the distances to the candidates of ``level``: hybrid for
        the national industries, the embedding's alone for any other level."""
        lexical = None
        if level == MAX_LEVEL and self.lexical_weight > 0:
            lexical = torch.from_numpy(self.lexical.scores(texts))
        temperature = self.embedder.config.loss.temperature
        return hybrid_scores(distances, lexical, temperature, self.lexical_weight)

    def search(
        self, texts: list[str], top_k: int = 5, level: int | None = MAX_LEVEL
    ) -> list[list[Match]]:
        """The ``top_k`` best codes (at ``level``, or any level for None) for each text."""
        check_request(texts, top_k, level)
        rows = self.candidates(level)
        distances = self.distances(self.embed_queries(texts), rows)
        best = self.scores(texts, distances, level).topk(min(top_k, len(rows)), dim=1)
        return [
            [
                Match(
                    self.codes[rows[j]],
                    self.titles[rows[j]],
                    int(self.levels[rows[j]]),
                    float(distances[q, j]),
                    float(score),
                )
                for score, j in zip(values.tolist(), indices.tolist(), strict=True)
            ]
            for q, (values, indices) in enumerate(zip(best.values, best.indices, strict=True))
        ]
