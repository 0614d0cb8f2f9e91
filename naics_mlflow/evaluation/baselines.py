"""Text-to-code retrieval baselines reported next to the trained model.

Each ranks the six-digit codes for each free-text query and is scored by ``score_retrieval``,
which goes through the same ``metrics.ranking_metrics`` as the model, so the numbers compare:

- BM25 (:class:`~naics_mlflow.evaluation.lexical.LexicalIndex` alone): lexical overlap with each
  code's title, description and examples (training index items and cross-referenced
  activities), the bar any learned model must clear on queries that reuse the taxonomy's words.
- :class:`UntrainedBackbone`, two ways. ``embedding_distances``: the model as built before any
  training, which reads the same channels as the trained one (title, description, the mean of the
  index items) through the pretrained backbone and ranks by its cosine similarity; what training
  adds. ``nearest_item_scores``: the code of the nearest example by the backbone's cosine (kNN),
  the strongest cheap baseline on phrasings the examples already cover.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from naics_mlflow.config import Config
from naics_mlflow.data.features import CHANNEL_FEATURES_CACHE
from naics_mlflow.data.pretrained import load_tokenizer
from naics_mlflow.data.taxonomy import Taxonomy
from naics_mlflow.data.tokenization import CHANNELS, query_ids, tokenize_codes
from naics_mlflow.evaluation.metrics import ranking_metrics
from naics_mlflow.evaluation.retrieval import IndexItems, query_batches
from naics_mlflow.model.lorentz import pairwise_distance
from naics_mlflow.model.module import NaicsEmbedder


class UntrainedBackbone:
    """The model of ``config`` before any training, on ``device``, every code and index item
    embedded once (or its features read from ``outputs_dir``, where a head-only stage of the same
    backbone left them), reading queries as the trained model does: cut at ``query_max_length``
    tokens."""

    def __init__(
        self,
        config: Config,
        taxonomy: Taxonomy,
        device: torch.device,
        query_max_length: int,
        outputs_dir: Path | None = None,
    ) -> None:
        self.module = NaicsEmbedder(config.to_dict()).eval().to(device)
        self.tokenizer = load_tokenizer(config.model.base_model_name)
        self.config = config
        tokens = tokenize_codes(taxonomy, self.tokenizer, config.data_loader.tokenization)
        cache_dir = None if outputs_dir is None else outputs_dir / CHANNEL_FEATURES_CACHE
        self.features = self.module.encoder.code_features(tokens, cache_dir=cache_dir)
        self.embeddings = self.module.encoder.embed_codes(self.features, np.arange(taxonomy.size))
        self.items = IndexItems.of_national_industries(self.features, taxonomy).to(device)
        self.size = taxonomy.size
        self.backbone = self.module.encoder.merged_backbone()
        self.query_max_length = query_max_length

    def _query_features(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        size = (len(texts), self.module.encoder.hidden_size)
        features = {c: torch.empty(size, device=self.module.device) for c in CHANNELS}
        encoder = self.module.encoder
        ids = query_ids(list(texts), self.tokenizer, self.query_max_length).ids
        for rows, batch in query_batches(encoder, self.backbone, ids, self.tokenizer.pad_token_id):
            for channel, values in batch.items():
                features[channel][rows] = values
        return features

    @torch.no_grad()
    def embedding_distances(self, texts: Sequence[str], rows: np.ndarray) -> torch.Tensor:
        """``(Q, C)`` Lorentz distances of the untrained model's queries to the codes at
        ``rows``."""
        queries = self.module.encoder.head(self._query_features(texts)).embeddings
        curvature = self.config.loss.curvature
        return pairwise_distance(queries, self.embeddings[torch.from_numpy(rows)], curvature)

    @torch.no_grad()
    def nearest_item_scores(self, texts: Sequence[str], rows: np.ndarray) -> torch.Tensor:
        """``(Q, C)``: for each code at ``rows``, the backbone's cosine of the query with the
        nearest of the code's own index items, floored at 0 (a code without items scores 0)."""
        queries = self._query_features(texts)["examples"]
        return self.items.nearest_similarity(queries, self.size)[:, torch.from_numpy(rows)]


def score_retrieval(
    scores: np.ndarray | torch.Tensor, true_codes: Sequence[str], candidate_codes: Sequence[str]
) -> dict[str, float]:
    """``retrieval_metrics``' keys (top1, top5, mrr, prefix2/3/4_accuracy) for scores, higher is
    better.

    Negated scores are a distance with the same order, so ranking, tie handling and prefixes are
    exactly those of the model's metrics.

    Args:
        scores: ``(Q, C)`` similarities, higher is better.
        true_codes: ``Q`` codes.
        candidate_codes: ``C`` distinct codes, the columns of ``scores``.
    """
    distances = -torch.as_tensor(scores)
    return ranking_metrics([distances], true_codes, candidate_codes)
