"""Place free text in the taxonomy: embed queries with a trained model and rank codes by Lorentz
distance. Used by ``search``, ``evaluate`` and the served MLflow model."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from naics_mlflow.data.taxonomy import MAX_LEVEL, MIN_LEVEL, Taxonomy
from naics_mlflow.data.tokenization import tokenize_codes, tokenize_queries, truncated_queries
from naics_mlflow.errors import UserError
from naics_mlflow.model.encoder import load_tokenizer
from naics_mlflow.model.lorentz import pairwise_distance
from naics_mlflow.model.module import NaicsEmbedder

logger = logging.getLogger(__name__)

MAX_TOP_K = 100
# Queries per forward pass; short texts, so a few hundred fit easily.
QUERY_BATCH_SIZE = 256


class QueryError(UserError):
    """A search request that cannot be answered as asked."""


@dataclass(frozen=True)
class Match:
    code: str
    title: str
    level: int
    distance: float


def check_request(texts: list[str], top_k: int, level: int | None) -> None:
    """Reject empty texts and out-of-range ``top_k`` / ``level`` before any model work."""
    for position, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise QueryError(f"query {position + 1} is empty; give a business description")
    if not 1 <= top_k <= MAX_TOP_K:
        raise QueryError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    if level is not None and not MIN_LEVEL <= level <= MAX_LEVEL:
        raise QueryError(f"level must be between {MIN_LEVEL} and {MAX_LEVEL}, got {level}")


@dataclass
class SearchEngine:
    """A trained model with every code embedded once, ready to answer queries."""

    embedder: NaicsEmbedder
    tokenizer: PreTrainedTokenizerBase
    codes: list[str]
    titles: list[str]
    levels: np.ndarray  # (N,)
    code_embeddings: torch.Tensor  # (N, D+1)

    @classmethod
    def build(cls, embedder: NaicsEmbedder, taxonomy: Taxonomy) -> SearchEngine:
        tokenizer = load_tokenizer(embedder.config.model.base_model_name)
        tokens = tokenize_codes(taxonomy, tokenizer, embedder.config.data_loader.tokenization)
        embeddings = embedder.embed_codes(tokens, np.arange(taxonomy.size))
        return cls(
            embedder, tokenizer, taxonomy.codes, taxonomy.titles, taxonomy.levels, embeddings
        )

    @torch.no_grad()
    def embed_queries(self, texts: list[str]) -> torch.Tensor:
        """(Q, D+1) Lorentz embeddings of free-text queries; says in one line how many texts were
        cut at the token limit (only their beginning is used)."""
        self.embedder.eval()
        config = self.embedder.config.data_loader.tokenization
        chunks = []
        truncated_count = 0
        for start in range(0, len(texts), QUERY_BATCH_SIZE):
            chunk = texts[start : start + QUERY_BATCH_SIZE]
            tokens = tokenize_queries(chunk, self.tokenizer, config)
            truncated_count += sum(truncated_queries(chunk, self.tokenizer, config))
            device_tokens = {
                channel: tuple(t.to(self.embedder.device) for t in pair)
                for channel, pair in tokens.items()
            }
            chunks.append(self.embedder(device_tokens).embeddings)
        if truncated_count:
            logger.warning(
                "%d of %d queries are longer than the model reads (%d tokens); their beginning "
                "is used",
                truncated_count,
                len(texts),
                max(config.title_max_length, config.examples_max_length),
            )
        return torch.cat(chunks)

    def candidates(self, level: int | None) -> np.ndarray:
        """Rows of the codes a query may match: one level, or all."""
        if level is None:
            return np.arange(len(self.codes))
        return np.flatnonzero(self.levels == level)

    def search(
        self, texts: list[str], top_k: int = 5, level: int | None = MAX_LEVEL
    ) -> list[list[Match]]:
        """The ``top_k`` closest codes (at ``level``, or any level for None) for each text."""
        check_request(texts, top_k, level)
        rows = self.candidates(level)
        queries = self.embed_queries(texts)
        curvature = self.embedder.config.loss.curvature
        distances = pairwise_distance(queries, self.code_embeddings[rows], curvature)
        nearest = distances.topk(min(top_k, len(rows)), dim=1, largest=False)
        return [
            [
                Match(
                    self.codes[rows[j]],
                    self.titles[rows[j]],
                    int(self.levels[rows[j]]),
                    float(distance),
                )
                for distance, j in zip(values.tolist(), indices.tolist(), strict=True)
            ]
            for values, indices in zip(nearest.values, nearest.indices, strict=True)
        ]
