"""The shipped curricula on the real NAICS tree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from naics_mlflow.data.curriculum import CurriculumSampler, list_curricula, load_curriculum

CURRICULA = Path(__file__).resolve().parents[1] / "conf" / "text_curriculum"


@pytest.fixture(scope="module")
def excluded(taxonomy):
    return taxonomy.excluded_matrix()


def _sampler(taxonomy, excluded, spec):
    return CurriculumSampler(spec, taxonomy.levels, taxonomy.relation, taxonomy.distance, excluded)


@pytest.mark.parametrize("spec", list_curricula(CURRICULA), ids=lambda s: s.name)
def test_every_stage_samples_valid_triples(taxonomy, excluded, spec):
    sampler = _sampler(taxonomy, excluded, spec)
    sample = sampler.sample_epoch(seed=7)
    assert len(sample.anchors) > 0
    if spec.anchor_level is not None:
        assert np.isin(taxonomy.levels[sample.anchors], spec.anchor_level).all()
    rows = np.repeat(sample.anchors, spec.n_negatives).reshape(-1, spec.n_negatives)
    negatives = sample.negatives[sample.negative_mask]
    negative_anchors = rows[sample.negative_mask]
    assert not sampler.positive_candidates[negative_anchors, negatives].any()
    assert (negatives != negative_anchors).all()
    if spec.negative_relation is not None:
        assert np.isin(taxonomy.relation[negative_anchors, negatives], spec.negative_relation).all()
    positive_rows = np.repeat(sample.anchors, spec.n_positives).reshape(-1, spec.n_positives)
    positives = sample.positives[sample.positive_mask]
    relations = taxonomy.relation[positive_rows[sample.positive_mask], positives]
    if spec.positive_relation is not None:
        assert np.isin(relations, spec.positive_relation).all()


def test_sampling_is_deterministic_for_a_seed(taxonomy, excluded):
    spec = dataclasses.replace(load_curriculum(CURRICULA / "03_stage.yaml"), n_negatives=32)
    first = _sampler(taxonomy, excluded, spec).sample_epoch(3)
    again = _sampler(taxonomy, excluded, spec).sample_epoch(3)
    other = _sampler(taxonomy, excluded, spec).sample_epoch(4)
    assert len(first.anchors) == 2125
    assert (first.negatives == again.negatives).all() and (first.positives == again.positives).all()
    assert (first.negatives != other.negatives).any()


def test_cross_referenced_codes_come_first(taxonomy, excluded):
    spec = load_curriculum(CURRICULA / "05_stage.yaml")
    sampler = _sampler(taxonomy, excluded, spec)
    sample = sampler.sample_epoch(0)
    anchor = taxonomy.positions["541511"]
    row = int(np.flatnonzero(sample.anchors == anchor)[0])
    drawn = [taxonomy.codes[j] for j in sample.negatives[row] if j >= 0]
    # 541512 is a sibling that 541511's cross-references name; 513210 and 518210 are in other
    # sectors, which 05_stage does not admit as negatives.
    assert drawn[0] == "541512"
    assert "513210" not in drawn
