"""What ``val_loss`` measures, fixed so that runs can be compared by it.

``--from-checkpoint <stage>`` picks the run of that stage with the lowest ``val_loss``, so every
run on the same data and curriculum must be scored on the same items against the same candidates,
whatever its batch size, validation limit, loss weights or seed. :class:`ValidationSet` holds
them: at most ``VALIDATION_PAIRS`` of the curriculum's validation pairs, drawn with
``VALIDATION_SEED``, each with its ``VALIDATION_NEGATIVES`` best-ranked sampled negatives.
``val_loss`` is their InfoNCE at ``VALIDATION_TEMPERATURE`` (see ``NaicsEmbedder``); what the
training objective gives on validation batches is logged as ``val/objective``.

:func:`validation_protocol` names this set-up; runs are tagged with it (and with the data's
digest), and discovery compares only runs that share both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from naics_mlflow.data.curriculum import CurriculumSpec

# Bump when the measure changes, so older runs stop competing with newer ones.
VALIDATION_PROTOCOL_VERSION = 2
VALIDATION_SEED = 1_000_003
VALIDATION_PAIRS = 128
VALIDATION_NEGATIVES = 8
# One tree edge is about one unit of hyperbolic distance (loss.tree_scale), so a positive and its
# negatives lie units apart once the hierarchy terms have trained. At 0.1 (version 1) such logit
# gaps of tens saturated the softmax: val_loss fell below 0.001 half-way through the quick start
# and then chose among later epochs by noise. At 1 it keeps falling while the tree improves.
VALIDATION_TEMPERATURE = 1.0


@dataclass(frozen=True)
class ValidationSet:
    """``anchor`` and ``positive`` ``(V,)`` code rows; ``negatives`` ``(V, K)``, -1 for padding."""

    anchor: np.ndarray
    positive: np.ndarray
    negatives: np.ndarray

    @classmethod
    def from_pairs(
        cls, anchor: np.ndarray, positive: np.ndarray, negatives: np.ndarray
    ) -> ValidationSet:
        """The fixed subset of a curriculum's validation pairs that ``val_loss`` scores."""
        order = np.random.default_rng(VALIDATION_SEED).permutation(len(anchor))
        chosen = np.sort(order[:VALIDATION_PAIRS])
        return cls(
            anchor[chosen], positive[chosen], negatives[chosen, :VALIDATION_NEGATIVES].copy()
        )

    def negative_mask(self, rows: np.ndarray) -> np.ndarray:
        """``(V, len(rows))`` bool: True where ``rows[m]`` is one of pair ``v``'s negatives.
        ``rows`` is sorted and holds every negative (as :attr:`rows` does)."""
        mask = np.zeros((len(self.anchor), len(rows)), dtype=bool)
        pair, slot = np.nonzero(self.negatives >= 0)
        mask[pair, np.searchsorted(rows, self.negatives[pair, slot])] = True
        return mask

    @property
    def rows(self) -> np.ndarray:
        """Every code the set mentions, sorted."""
        valid = self.negatives[self.negatives >= 0]
        return np.unique(np.concatenate([self.anchor, self.positive, valid]))


def validation_protocol(curriculum: CurriculumSpec, val_split: float) -> str:
    """A short name of how a stage of ``curriculum`` computes ``val_loss`` (the data aside)."""
    spec = {
        field.name: getattr(curriculum, field.name)
        for field in dataclasses.fields(curriculum)
        if field.name not in {"name", "description"}
    }
    payload = {
        "version": VALIDATION_PROTOCOL_VERSION,
        "curriculum": spec,
        "val_split": val_split,
        "seed": VALIDATION_SEED,
        "pairs": VALIDATION_PAIRS,
        "negatives": VALIDATION_NEGATIVES,
        "temperature": VALIDATION_TEMPERATURE,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
