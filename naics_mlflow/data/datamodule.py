"""The Lightning data module: curriculum triples per epoch, batched as the unique codes to encode.

A training item is ``(anchor, positive, the anchor's sampled negatives)``. A batch gathers every
code its items mention, so each distinct code is encoded once per step, and carries local indices
into that set for the loss.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from naics_mlflow.config import Config
from naics_mlflow.data.build import build_data, is_built
from naics_mlflow.data.census import CensusRelease, resolve_raw_dir
from naics_mlflow.data.curriculum import CurriculumSampler, CurriculumSpec, EpochSample
from naics_mlflow.data.taxonomy import Taxonomy, load_taxonomy
from naics_mlflow.data.tokenization import CodeTokens, tokenize_codes, tokenize_queries
from naics_mlflow.model.encoder import load_tokenizer

logger = logging.getLogger(__name__)

# Validation negatives are drawn once from this offset of the training seed, apart from the seeds
# that training epochs use (seed + epoch).
_VALIDATION_SEED_OFFSET = 1_000_003


def in_batch_negatives(
    anchors: np.ndarray, positives: np.ndarray, positive_candidates: np.ndarray
) -> np.ndarray:
    """(B, B) bool: True where item j's positive may act as a negative for anchor i.

    It may not when it is anchor i itself, anchor i's own positive, or any positive of anchor i
    in this curriculum (``positive_candidates``, (N, N) bool).
    """
    other = positives[None, :]
    return ~(
        positive_candidates[anchors[:, None], other]
        | (other == anchors[:, None])
        | (other == positives[:, None])
    )


class TripletItems:
    """Flat training or validation items: ``anchor[t]``, ``positive[t]``, ``negatives[t]``, and
    ``queries[t]``, one of the anchor's training index items ("" when it has none), which the
    model learns to place at the anchor as if a user had typed it."""

    def __init__(self, anchor: np.ndarray, positive: np.ndarray, negatives: np.ndarray) -> None:
        self.anchor, self.positive, self.negatives = anchor, positive, negatives
        self.queries: list[str] = [""] * len(anchor)

    def draw_queries(self, examples: list[list[str]], seed: int) -> None:
        """Pick each item's query among its anchor's training index items."""
        rng = np.random.default_rng(seed)
        self.queries = [
            examples[anchor][rng.integers(len(examples[anchor]))] if examples[anchor] else ""
            for anchor in self.anchor.tolist()
        ]

    def __len__(self) -> int:
        return len(self.anchor)

    def __getitem__(self, index: int) -> int:
        return index

    @classmethod
    def from_sample(cls, sample: EpochSample, keep_pair: np.ndarray | None = None) -> TripletItems:
        """One item per valid (anchor, positive) of the sample; ``keep_pair`` (M, P) bool
        further selects pairs (to separate the validation pairs from training)."""
        keep = sample.positive_mask if keep_pair is None else sample.positive_mask & keep_pair
        rows, columns = np.nonzero(keep)
        return cls(sample.anchors[rows], sample.positives[rows, columns], sample.negatives[rows])


class NaicsDataModule(L.LightningDataModule):
    def __init__(
        self,
        config: Config,
        curriculum: CurriculumSpec,
        release: CensusRelease,
        raw_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.curriculum = curriculum
        self.release = release
        self.raw_dir = resolve_raw_dir(raw_dir, config.dirs.raw)
        self.data_dir = Path(config.dirs.data)
        self.taxonomy: Taxonomy | None = None
        self.sampler: CurriculumSampler
        self.tokens: CodeTokens
        self._validation_items: TripletItems
        self._validation_pair_keys: np.ndarray  # anchor * N + positive of each validation item

    def prepare_data(self) -> None:
        if not is_built(self.data_dir):
            build_data(self.raw_dir, self.data_dir, self.release)

    def setup(self, stage: str | None = None) -> None:
        if self.taxonomy is not None:
            return
        self.taxonomy = load_taxonomy(self.data_dir)
        self.sampler = CurriculumSampler(
            self.curriculum,
            self.taxonomy.levels,
            self.taxonomy.relation,
            self.taxonomy.distance,
            self.taxonomy.excluded_matrix(),
        )
        self.tokenizer = load_tokenizer(self.config.model.base_model_name)
        self.tokens = tokenize_codes(
            self.taxonomy, self.tokenizer, self.config.data_loader.tokenization
        )
        seed = self.config.training.seed
        validation_sample = self.sampler.sample_epoch(seed + _VALIDATION_SEED_OFFSET)
        rng = np.random.default_rng(seed)
        validation_pairs = (
            rng.random(validation_sample.positives.shape) < self.config.data_loader.val_split
        )
        self._validation_items = TripletItems.from_sample(validation_sample, validation_pairs)
        self._validation_items.draw_queries(self.taxonomy.examples, seed)
        self._validation_pair_keys = self._pair_keys(
            self._validation_items.anchor, self._validation_items.positive
        )
        logger.info(
            "curriculum %s: %d anchors, %d validation pairs",
            self.curriculum.name,
            len(self.sampler.eligible_anchors),
            len(self._validation_items),
        )

    def training_items(self, epoch: int) -> TripletItems:
        """The epoch's items: a fresh draw seeded by ``seed + epoch``, validation pairs removed."""
        sample = self.sampler.sample_epoch(self.config.training.seed + epoch)
        keys = self._pair_keys(sample.anchors[:, None], sample.positives)
        items = TripletItems.from_sample(sample, ~np.isin(keys, self._validation_pair_keys))
        items.draw_queries(self.taxonomy.examples, self.config.training.seed + epoch)
        return items

    def _pair_keys(self, anchors: np.ndarray, positives: np.ndarray) -> np.ndarray:
        """One integer per (anchor, positive) pair, for vectorised membership tests."""
        return anchors.astype(np.int64) * self.taxonomy.size + positives

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        items = self.training_items(epoch)
        generator = torch.Generator().manual_seed(self.config.training.seed + epoch)
        return self._loader(items, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._validation_items, shuffle=False)

    def _loader(self, items: TripletItems, shuffle: bool, generator=None) -> DataLoader:
        return DataLoader(
            items,
            batch_size=self.config.data_loader.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.config.data_loader.num_workers,
            collate_fn=lambda indices: self.collate(items, np.asarray(indices)),
        )

    def collate(self, items: TripletItems, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Tokens of the unique codes in the batch and local indices into them.

        Keys: ``rows`` (U,) code rows; ``tokens`` per channel; ``anchor``, ``positive`` (B,) and
        ``negatives`` (B, K) local indices (padding points at 0 and is masked by
        ``negative_valid``); ``anchor_rows`` (B,) and ``negative_rows`` (B, K, -1 for padding)
        code rows; ``in_batch_negatives`` (B, B) bool; when ``loss.query_weight`` > 0,
        ``query_tokens`` per channel for the items that have a query and ``query_items`` (Q,)
        their positions in the batch.
        """
        anchors = items.anchor[indices]
        positives = items.positive[indices]
        negatives = items.negatives[indices]
        valid = negatives >= 0
        rows = np.unique(np.concatenate([anchors, positives, negatives[valid]]))
        local = np.zeros(self.taxonomy.size, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        batch = {
            "rows": torch.from_numpy(rows.astype(np.int64)),
            "tokens": self.tokens.batch(rows),
            "anchor": torch.from_numpy(local[anchors]),
            "positive": torch.from_numpy(local[positives]),
            "negatives": torch.from_numpy(np.where(valid, local[negatives], 0)),
            "negative_valid": torch.from_numpy(valid),
            "anchor_rows": torch.from_numpy(anchors.astype(np.int64)),
            "negative_rows": torch.from_numpy(negatives.astype(np.int64)),
            "in_batch_negatives": torch.from_numpy(
                in_batch_negatives(anchors, positives, self.sampler.positive_candidates)
            ),
        }
        queries = [items.queries[i] for i in indices.tolist()]
        with_query = [i for i, text in enumerate(queries) if text]
        if self.config.loss.query_weight > 0 and with_query:
            batch["query_tokens"] = tokenize_queries(
                [queries[i] for i in with_query],
                self.tokenizer,
                self.config.data_loader.tokenization,
            )
            batch["query_items"] = torch.tensor(with_query, dtype=torch.long)
        return batch
