"""The Lightning data module: curriculum triples per epoch, batched as the unique codes to encode.

A training item is ``(anchor, positive, the anchor's sampled negatives)``. A batch gathers every
code its items mention, so each distinct code is encoded once per step, and carries local indices
into that set for the loss, and the tree distances and parent links among those codes for the
hierarchy terms. Every six-digit code in the batch that has examples (training index items, and
activities that cross-references classify there) also brings one of them as a free-text query, which
the model learns to place at that code rather than at the batch's other six-digit codes (see
``NaicsEmbedder``); that item is left out of the code's own examples in the same step, so the query
never finds its own words.

A batch carries the codes' texts as tokens, or, in a head-only stage, their precomputed channel
features (:attr:`NaicsDataModule.code_features`, set when the stage starts).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from naics_mlflow.config import Config
from naics_mlflow.data.build import ensure_built
from naics_mlflow.data.census import CensusRelease, resolve_raw_dir
from naics_mlflow.data.curriculum import (
    CurriculumError,
    CurriculumSampler,
    CurriculumSpec,
    EpochSample,
)
from naics_mlflow.data.features import CodeFeatures
from naics_mlflow.data.pretrained import load_tokenizer
from naics_mlflow.data.taxonomy import MAX_LEVEL, Taxonomy, load_taxonomy, submatrix
from naics_mlflow.data.tokenization import CodeTokens, query_tokens, tokenize_codes
from naics_mlflow.data.validation import VALIDATION_SEED, ValidationSet

logger = logging.getLogger(__name__)


class TripletItems:
    """Flat training or validation items: ``anchor[t]``, ``positive[t]``, ``negatives[t]``;
    ``query_seed`` decides which index item each batch's codes bring as queries."""

    def __init__(
        self, anchor: np.ndarray, positive: np.ndarray, negatives: np.ndarray, query_seed: int
    ) -> None:
        self.anchor, self.positive, self.negatives = anchor, positive, negatives
        self.query_seed = query_seed

    def __len__(self) -> int:
        return len(self.anchor)

    def __getitem__(self, index: int) -> int:
        return index

    def shard(self, rank: int, world_size: int, seed: int) -> TripletItems:
        """This rank's share when ``world_size`` processes train together.

        Anchors are dealt to ranks in a random order seeded by ``seed``, so no anchor is on two
        ranks; each rank then keeps as many items as the smallest share, because every rank must
        run the same number of steps (they meet in collective operations at each one).
        """
        anchors = np.unique(self.anchor)
        owner = np.empty(anchors.max() + 1, dtype=np.int64)
        owner[np.random.default_rng(seed).permutation(anchors)] = (
            np.arange(len(anchors)) % world_size
        )
        item_owner = owner[self.anchor]
        share = np.bincount(item_owner, minlength=world_size).min()
        kept = np.flatnonzero(item_owner == rank)[:share]
        return TripletItems(
            self.anchor[kept], self.positive[kept], self.negatives[kept], self.query_seed
        )

    @classmethod
    def from_sample(
        cls, sample: EpochSample, query_seed: int, keep_pair: np.ndarray | None = None
    ) -> TripletItems:
        """One item per valid (anchor, positive) of the sample; ``keep_pair`` (M, P) bool
        further selects pairs (to separate the validation pairs from training)."""
        keep = sample.positive_mask if keep_pair is None else sample.positive_mask & keep_pair
        rows, columns = np.nonzero(keep)
        return cls(
            sample.anchors[rows],
            sample.positives[rows, columns],
            sample.negatives[rows],
            query_seed,
        )


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
        # Every code's channel features, in a head-only stage (set by the stage's callback).
        self.code_features: CodeFeatures | None = None
        self._validation_items: TripletItems
        self.validation_set: ValidationSet  # what val_loss scores, the same for every run
        self._always_in: np.ndarray  # rows every batch holds (see setup)
        self._query_item_counts: np.ndarray  # (N,) items a code may bring as a query
        self._validation_pair_keys: np.ndarray  # anchor * N + positive of each validation item

    def prepare_data(self) -> None:
        ensure_built(self.raw_dir, self.data_dir, self.release)

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
        self._query_item_counts = np.where(
            self.taxonomy.levels == MAX_LEVEL, [len(items) for items in self.tokens.code_items], 0
        )
        # Codes every batch holds besides its items' own (data_loader.all_codes_in_batch).
        self._always_in = (
            np.arange(self.taxonomy.size)
            if self.config.data_loader.all_codes_in_batch
            else np.empty(0, dtype=np.int64)
        )
        # A fixed seed, not training.seed: every run on the same data and curriculum validates
        # on the same pairs (see data/validation.py).
        validation_sample = self.sampler.sample_epoch(VALIDATION_SEED)
        rng = np.random.default_rng(VALIDATION_SEED)
        validation_pairs = (
            rng.random(validation_sample.positives.shape) < self.config.data_loader.val_split
        )
        self._validation_items = TripletItems.from_sample(
            validation_sample, VALIDATION_SEED, validation_pairs
        )
        items = self._validation_items
        if len(items) == 0:
            # Without validation there is no val_loss to choose the best checkpoint by.
            raise CurriculumError(
                f"curriculum {self.curriculum.name} leaves no validation pairs at "
                f"data_loader.val_split={self.config.data_loader.val_split:g} "
                f"({validation_sample.positive_mask.sum()} pairs in all); raise val_split"
            )
        self.validation_set = ValidationSet.from_pairs(
            items.anchor, items.positive, items.negatives
        )
        self._validation_pair_keys = self._pair_keys(
            self._validation_items.anchor, self._validation_items.positive
        )
        logger.info(
            "curriculum %s: %d anchors, %d validation pairs",
            self.curriculum.name,
            len(self.sampler.eligible_anchors),
            len(self._validation_items),
        )

    def training_items(self, epoch: int, rank: int = 0, world_size: int = 1) -> TripletItems:
        """The epoch's items: a fresh draw seeded by ``seed + epoch``, validation pairs removed,
        and this rank's share of them when several processes train."""
        seed = self.config.training.seed + epoch
        sample = self.sampler.sample_epoch(seed)
        keys = self._pair_keys(sample.anchors[:, None], sample.positives)
        items = TripletItems.from_sample(sample, seed, ~np.isin(keys, self._validation_pair_keys))
        return items if world_size == 1 else items.shard(rank, world_size, seed)

    def _pair_keys(self, anchors: np.ndarray, positives: np.ndarray) -> np.ndarray:
        """One integer per (anchor, positive) pair, for vectorised membership tests."""
        return anchors.astype(np.int64) * self.taxonomy.size + positives

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        items = self.training_items(epoch, self.trainer.global_rank, self.trainer.world_size)
        return self._loader(items, self.epoch_order(items, epoch))

    def epoch_order(self, items: TripletItems, epoch: int) -> list[int]:
        """The order in which ``epoch`` takes ``items``: its batches are consecutive runs of it.

        Drawn here, not by the loader: its iterator draws from the loader's generator each time
        it starts, Lightning starts a reloaded loader's twice, and with workers the first has
        already fetched ahead, so the order would follow num_workers."""
        generator = torch.Generator().manual_seed(self.config.training.seed + epoch)
        return torch.randperm(len(items), generator=generator).tolist()

    def validation_items(self, rank: int = 0, world_size: int = 1) -> TripletItems:
        """The validation items, drawn once per stage; this rank's share when several train."""
        items = self._validation_items
        return items if world_size == 1 else items.shard(rank, world_size, VALIDATION_SEED)

    def val_dataloader(self) -> DataLoader:
        items = self.validation_items(self.trainer.global_rank, self.trainer.world_size)
        return self._loader(items, list(range(len(items))))

    def _loader(self, items: TripletItems, order: list[int]) -> DataLoader:
        """Batches of ``items`` taken in ``order``."""
        return DataLoader(
            items,
            batch_size=self.config.data_loader.batch_size,
            sampler=order,
            num_workers=self.config.data_loader.num_workers,
            collate_fn=lambda indices: self.collate(items, np.asarray(indices)),
        )

    def collate(self, items: TripletItems, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """The unique codes of a batch, their texts, and local indices into them.

        Keys: ``rows`` (U,) code rows, the pool the contrastive loss draws negatives from (each
        anchor's sampled negatives are in it); ``tokens`` (or ``features`` in a head-only stage);
        ``anchor``, ``positive`` (B,) local indices and ``anchor_rows``, ``positive_rows`` (B,)
        code rows; ``tree_distance`` (U, U) and ``parent`` (U,) local index of each code's
        parent, -1 when it is not in the batch. When ``loss.query_weight`` > 0 and some six-digit
        code has training index items: ``query_tokens`` (or ``query_features``) of one item of
        each such code, ``query_targets`` (Q,) the local index of its code and
        ``query_negatives`` (Q, U) bool, True at the batch's other six-digit codes (the
        candidates a search ranks; with ``data_loader.all_codes_in_batch`` the batch holds every
        code).
        """
        taxonomy = self.taxonomy
        anchors = items.anchor[indices]
        positives = items.positive[indices]
        negatives = items.negatives[indices]
        rows = np.unique(
            np.concatenate([anchors, positives, negatives[negatives >= 0], self._always_in])
        )
        local = np.full(taxonomy.size, -1, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        parents = taxonomy.parents[rows]
        batch = {
            "rows": torch.from_numpy(rows.astype(np.int64)),
            "anchor": torch.from_numpy(local[anchors]),
            "positive": torch.from_numpy(local[positives]),
            "anchor_rows": torch.from_numpy(anchors.astype(np.int64)),
            "positive_rows": torch.from_numpy(positives.astype(np.int64)),
            "tree_distance": torch.from_numpy(submatrix(taxonomy.distance, rows)),
            "parent": torch.from_numpy(np.where(parents >= 0, local[parents], -1)),
        }
        # Seeded by the batch's first item, so a batch brings the same queries every time.
        rng = np.random.default_rng((items.query_seed, int(indices[0])))
        query_items = self._query_items(rows, rng)
        targets = np.flatnonzero(query_items >= 0)
        if self.code_features is not None:
            batch["features"] = self.code_features.of_codes(
                batch["rows"], torch.from_numpy(query_items)
            )
        else:
            batch["tokens"] = self.tokens.batch(rows, self._examples_read(rows, query_items, rng))
        if len(targets):
            chosen = query_items[targets]
            if self.code_features is not None:
                batch["query_features"] = self.code_features.of_queries(torch.from_numpy(chosen))
            else:
                batch["query_tokens"] = query_tokens(
                    [self.tokens.item_ids[item] for item in chosen], self.tokens.pad_token_id
                )
            six_digit = taxonomy.levels[rows] == MAX_LEVEL
            batch["query_targets"] = torch.from_numpy(targets)
            batch["query_negatives"] = torch.from_numpy(
                six_digit[None, :] & (np.arange(len(rows))[None, :] != targets[:, None])
            )
        return batch

    def _query_items(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(U,) one example (an index into ``tokens.item_ids``) of each six-digit
        code that has one, -1 elsewhere or when ``loss.query_weight`` is 0.

        Only six-digit codes: a higher code's examples are its descendants' items, whose own
        six-digit code may be in the batch and would then count as a negative.
        """
        chosen = np.full(len(rows), -1, dtype=np.int64)
        if self.config.loss.query_weight == 0:
            return chosen
        counts = self._query_item_counts[rows]
        bringing = np.flatnonzero(counts)
        # One draw for all, which numpy takes as it took one draw a code in row order: the same
        # items, in 0.3 ms instead of 3.6 for a batch of every code.
        picks = rng.integers(counts[bringing])
        code_items = self.tokens.code_items
        chosen[bringing] = [
            code_items[row][pick] for row, pick in zip(rows[bringing], picks, strict=True)
        ]
        return chosen

    def _examples_read(
        self, rows: np.ndarray, query_items: np.ndarray, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """The index items each code's examples channel reads in this step: up to
        ``data_loader.examples_per_code`` of its items drawn at random, never the item it brings
        as a query."""
        limit = self.config.data_loader.examples_per_code
        read = []
        for row, query_item in zip(rows, query_items, strict=True):
            pool = self.tokens.code_items[row]
            pool = pool[pool != query_item] if query_item >= 0 else pool
            read.append(pool if len(pool) <= limit else rng.choice(pool, limit, replace=False))
        return read
