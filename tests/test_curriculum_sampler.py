"""Curriculum specs, chain files and the sampler, on small synthetic trees (no Census files)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from naics_mlflow.data.curriculum import (
    ChainSpec,
    ChainStage,
    CurriculumError,
    CurriculumSampler,
    CurriculumSpec,
    list_curricula,
    load_chain,
    load_curriculum,
)
from naics_mlflow.training.plan import plan_chain

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "text_curriculum"

# Relation id by the two depths below the lowest common ancestor, shallower first.
RELATION_BY_DEPTHS = {
    (0, 0): 0,
    (0, 1): 1,
    (1, 1): 2,
    (0, 2): 3,
    (0, 3): 4,
    (1, 2): 5,
    (0, 4): 6,
    (2, 2): 7,
    (1, 3): 8,
    (1, 4): 9,
    (2, 3): 10,
    (3, 3): 11,
    (2, 4): 12,
    (3, 4): 13,
    (4, 4): 14,
}
UNRELATED = 15


def ragged_tree(fanout: tuple[int, ...], ragged: bool = True) -> list[int]:
    """Parent row of each node (-1 for sectors), parents before children.

    ``fanout[0]`` sectors; a node at level L gets ``fanout[L - 1]`` children, or with ``ragged``
    between 1 and that many (so some nodes are only children, as in NAICS).
    """
    parents = [-1] * fanout[0]
    level_nodes = list(range(fanout[0]))
    for width in fanout[1:]:
        next_nodes = []
        for k, node in enumerate(level_nodes):
            for _ in range(1 + k % width if ragged else width):
                next_nodes.append(len(parents))
                parents.append(node)
        level_nodes = next_nodes
    return parents


def tree_arrays(parents: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """levels (N,) int8, relation (N, N) int8 and distance (N, N) int8 from parent pointers.

    Brute force over all pairs: the lowest common ancestor's depth is the length of the shared
    prefix of the two root paths (sectors at depth 1 under a virtual root).
    """
    n = len(parents)
    depth = np.zeros(n, dtype=int)
    path = np.full((n, 5), -1)  # path[i, d - 1]: the ancestor of i at depth d, i itself last
    for i, parent in enumerate(parents):
        if parent >= 0:
            path[i] = path[parent]
        depth[i] = 1 if parent < 0 else depth[parent] + 1
        path[i, depth[i] - 1] = i
    shared = np.zeros((n, n), dtype=int)
    for column in path.T:
        shared += (column[:, None] == column[None, :]) & (column[:, None] >= 0)
    below_a = depth[:, None] - shared
    below_b = depth[None, :] - shared
    table = np.full((6, 6), UNRELATED)
    for (da, db), relation_id in RELATION_BY_DEPTHS.items():
        table[da, db] = table[db, da] = relation_id
    relation = np.where(shared == 0, UNRELATED, table[below_a, below_b])
    return (
        (depth + 1).astype(np.int8),
        relation.astype(np.int8),
        (below_a + below_b).astype(np.int8),
    )


SMALL_TREE = tree_arrays(ragged_tree((3, 3, 3, 2, 3)))
NO_EXCLUSIONS = np.zeros_like(SMALL_TREE[1], dtype=bool)


def sampler_for(spec: CurriculumSpec, excluded: np.ndarray | None = None) -> CurriculumSampler:
    levels, relation, distance = SMALL_TREE
    return CurriculumSampler(
        spec, levels, relation, distance, NO_EXCLUSIONS if excluded is None else excluded
    )


def allowed(values: list[int] | None, value: int) -> bool:
    return values is None or value in values


def oracle(spec: CurriculumSpec, anchor: int) -> tuple[set[int], set[int]]:
    """The positive and negative candidates of ``anchor``, straight from docs/curriculum.md."""
    levels, relation, distance = SMALL_TREE
    others = [j for j in range(len(levels)) if j != anchor]
    positives = {
        j
        for j in others
        if allowed(spec.positive_level, levels[j])
        and allowed(spec.positive_relation, relation[anchor, j])
        and allowed(spec.positive_distance, distance[anchor, j])
    }
    if not positives:
        return positives, set()
    closest_relation = min(int(relation[anchor, j]) for j in positives)
    closest_distance = min(int(distance[anchor, j]) for j in positives)
    negatives = {
        j
        for j in others
        if j not in positives
        and distance[anchor, j] > closest_distance
        and allowed(spec.negative_level, levels[j])
        and allowed(spec.negative_relation, relation[anchor, j])
        and allowed(spec.negative_distance, distance[anchor, j])
        and allowed(spec.relation_margin, relation[anchor, j] - closest_relation)
        and allowed(spec.distance_margin, distance[anchor, j] - closest_distance)
    }
    return positives, negatives


MIXED_SPEC = CurriculumSpec(
    name="mixed",
    anchor_level=[4, 5, 6],
    positive_relation=[1, 2],
    negative_relation=[3, 5, 7, 8, 10, 15],
    relation_margin=[2, 4, 6, 9, 14],
    distance_margin=[1, 2, 3, 5],
    n_positives=3,
    n_negatives=80,  # more than the tree's codes, so every negative candidate is drawn
)


def test_tree_helper_matches_hand_checked_pairs() -> None:
    levels, relation, distance = SMALL_TREE
    # Rows 0-2 are sectors; 3 is the only subsector of sector 0, 4 and 5 those of sector 1.
    assert levels[:6].tolist() == [2, 2, 2, 3, 3, 3]
    assert (relation[0, 1], distance[0, 1]) == (UNRELATED, 2)
    assert (relation[0, 3], distance[0, 3]) == (1, 1)
    assert (relation[4, 5], distance[4, 5]) == (2, 2)
    assert (relation[0, 4], distance[0, 4]) == (UNRELATED, 3)
    assert (relation == relation.T).all() and (distance == distance.T).all()


def test_same_seed_same_sample_and_seeds_differ() -> None:
    sampler = sampler_for(MIXED_SPEC)
    first, again, other = (sampler.sample_epoch(s) for s in (7, 7, 8))
    assert np.array_equal(first.anchors, again.anchors)
    assert np.array_equal(first.positives, again.positives)
    assert np.array_equal(first.negatives, again.negatives)
    assert not np.array_equal(first.negatives, other.negatives)
    assert not np.array_equal(first.positives, other.positives)


def test_sampled_triples_follow_the_filters_and_margins() -> None:
    sampler = sampler_for(MIXED_SPEC)
    sample = sampler.sample_epoch(3)
    levels = SMALL_TREE[0]
    assert sample.anchors.dtype == np.int32 and sample.negatives.dtype == np.int32
    for row, anchor in enumerate(sample.anchors):
        positives, negatives = oracle(MIXED_SPEC, int(anchor))
        assert levels[anchor] in MIXED_SPEC.anchor_level and positives and negatives
        drawn_pos = sample.positives[row][sample.positive_mask[row]].tolist()
        drawn_neg = sample.negatives[row][sample.negative_mask[row]].tolist()
        assert set(drawn_pos) <= positives and len(set(drawn_pos)) == len(drawn_pos)
        assert set(drawn_neg) == negatives and len(drawn_neg) == len(negatives)
        assert not set(drawn_neg) & positives
        assert len(drawn_pos) == min(MIXED_SPEC.n_positives, len(positives))


# A code without siblings has a positive (its parent) but no negative (siblings only).
SIBLINGS_ONLY = CurriculumSpec(name="siblings", positive_relation=[1], negative_relation=[2])


@pytest.mark.parametrize("spec", [MIXED_SPEC, SIBLINGS_ONLY], ids=["mixed", "siblings"])
def test_eligible_anchors_are_exactly_those_with_both_candidates(spec: CurriculumSpec) -> None:
    levels = SMALL_TREE[0]
    at_level = [a for a in range(len(levels)) if allowed(spec.anchor_level, levels[a])]
    expected = [a for a in at_level if all(oracle(spec, a))]
    assert sampler_for(spec).eligible_anchors.tolist() == expected
    if spec is SIBLINGS_ONLY:
        assert len(expected) < len([a for a in at_level if oracle(spec, a)[0]])


def test_a_code_as_close_as_the_closest_positive_is_never_a_negative() -> None:
    # Only the level-3 parent is a positive of a level-4 anchor; its level-5 children are not,
    # yet they are as close as the parent, so they must not become negatives either.
    spec = CurriculumSpec(
        name="parents", anchor_level=[4], positive_relation=[1], positive_level=[3]
    )
    sampler = sampler_for(spec)
    sample = sampler.sample_epoch(0)
    distance = SMALL_TREE[2]
    for row, anchor in enumerate(sample.anchors):
        drawn = sample.negatives[row][sample.negative_mask[row]]
        assert (distance[anchor, drawn] > 1).all()


def test_cross_referenced_negatives_come_first_when_admissible() -> None:
    levels, relation, _ = SMALL_TREE
    spec = CurriculumSpec(
        name="xref", anchor_level=[6], positive_relation=[1], negative_relation=[2, 7, 15]
    )
    anchor = int(np.flatnonzero(levels == 6)[-1])
    far = np.flatnonzero(relation[anchor] == UNRELATED)[-2:]  # least likely by weight
    parent = int(np.flatnonzero(relation[anchor] == 1)[0])  # a positive, so never a negative
    niece = int(np.flatnonzero(relation[anchor] == 5)[0])  # excluded by negative_relation
    excluded = NO_EXCLUSIONS.copy()
    excluded[anchor, [*far, parent, niece]] = True
    sampler = sampler_for(spec, excluded)
    row = int(np.flatnonzero(sampler.eligible_anchors == anchor)[0])
    for seed in range(5):
        sample = sampler.sample_epoch(seed)
        assert set(sample.negatives[row, :2].tolist()) == set(far.tolist())
        assert parent not in sample.negatives[row] and niece not in sample.negatives[row]
        assert parent in sample.positives[row]


def test_closer_negatives_are_drawn_more_often() -> None:
    # Weight 1 / (1 + distance - closest positive distance): a sibling (distance 2, weight 1/2)
    # must beat an unrelated sector (distance 6 from a level-6 code, weight 1/6).
    relation = SMALL_TREE[1]
    spec = CurriculumSpec(
        name="weights",
        anchor_level=[6],
        positive_relation=[1],
        negative_relation=[2, 15],
        negative_distance=[2, 6],  # the sibling, and the other two sectors
        n_negatives=1,
    )
    sampler = sampler_for(spec)
    rows = [
        r
        for r, a in enumerate(sampler.eligible_anchors)
        if (relation[a] == 2).sum() == 1  # exactly one sibling
    ]
    picks = np.stack([sampler.sample_epoch(seed).negatives[rows, 0] for seed in range(200)])
    anchors = sampler.eligible_anchors[rows]
    sibling_share = (relation[anchors, picks] == 2).mean()
    # One sibling at weight 1/2 against two sectors at 1/6 each: 0.6 (uniform would give 1/3).
    assert 0.55 < sibling_share < 0.65


def test_rows_are_padded_when_candidates_run_out() -> None:
    spec = CurriculumSpec(
        name="pad", anchor_level=[6], positive_relation=[1], n_positives=5, n_negatives=500
    )
    sampler = sampler_for(spec)
    sample = sampler.sample_epoch(1)
    assert sample.positives.shape == (len(sample.anchors), 5)
    assert sample.negatives.shape == (len(sample.anchors), 500)
    # A level-6 code has exactly one parent and fewer than 500 codes at all.
    assert (sample.positive_mask.sum(axis=1) == 1).all()
    assert (sample.positives[:, 1:] == -1).all()
    for row, anchor in enumerate(sample.anchors):
        assert sample.negative_mask[row].sum() == len(oracle(spec, int(anchor))[1])
        assert (sample.negatives[row][~sample.negative_mask[row]] == -1).all()


def test_anchor_level_limits_the_anchors() -> None:
    spec = CurriculumSpec(name="mid", anchor_level=[3, 5], positive_relation=[1, 2])
    anchors = sampler_for(spec).eligible_anchors
    assert set(SMALL_TREE[0][anchors].tolist()) == {3, 5}


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"positive_relation": [1], "positive_distance": [3]}, "positive_distance"),
        ({"positive_level": [2, 3, 4, 5], "negative_level": [2]}, "negative_level"),
        ({"positive_relation": [1], "negative_relation": [0]}, "negative_relation"),
        ({"positive_relation": [1], "negative_distance": [1]}, "negative_distance"),
        ({"positive_relation": [1], "relation_margin": [15]}, "relation_margin"),
        ({"positive_relation": [1], "distance_margin": [40]}, "distance_margin"),
    ],
)
def test_an_emptying_filter_is_named(overrides: dict, field_name: str) -> None:
    spec = CurriculumSpec(name="empty", **overrides)
    with pytest.raises(
        CurriculumError, match=rf"'empty'.* after {field_name}=.*widen {field_name}"
    ):
        sampler_for(spec)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"anchor_level": [6]}, r"anchor_level=\[6\] leaves no anchor"),
        ({"positive_level": [5]}, r"after positive_level=\[5\].*widen positive_level"),
        ({"positive_relation": [6]}, r"after positive_relation=\[6\].*widen positive_relation"),
    ],
)
def test_filters_asking_for_missing_levels_are_named(overrides: dict, message: str) -> None:
    levels, relation, distance = tree_arrays(ragged_tree((2, 2, 2)))  # levels 2-4 only
    no_exclusions = np.zeros_like(relation, dtype=bool)
    spec = CurriculumSpec(name="shallow", **overrides)
    with pytest.raises(CurriculumError, match=message):
        CurriculumSampler(spec, levels, relation, distance, no_exclusions)


def test_a_spec_without_positive_filters_is_explained() -> None:
    with pytest.raises(CurriculumError, match="no anchor has a negative candidate"):
        sampler_for(CurriculumSpec(name="all"))


def test_naics_sized_tree_builds_and_samples_fast() -> None:
    # 20 sectors down to 1,200 national industries: 2,220 codes, about NAICS's 2,125.
    levels, relation, distance = tree_arrays(ragged_tree((20, 5, 3, 2, 2), ragged=False))
    rng = np.random.default_rng(0)
    excluded = rng.random(relation.shape) < 0.002
    spec = CurriculumSpec(name="big", positive_relation=[1, 2], n_negatives=32)
    start = time.perf_counter()
    sample = CurriculumSampler(spec, levels, relation, distance, excluded).sample_epoch(0)
    elapsed = time.perf_counter() - start
    assert sample.negatives.shape == (len(levels), 32)
    assert elapsed < 2.0, f"init + one epoch took {elapsed:.2f} s"


# --- YAML files ----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "stage.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "name: s\npostive_level: [2]\n",
            r"stage.yaml: unknown field 'postive_level'.*'positive_level'",
        ),
        ("name: s\nanchor_level: [2, 7]\n", r"stage.yaml: field 'anchor_level' has 7, outside 2-6"),
        ("name: s\npositive_level: [1]\n", r"field 'positive_level' has 1, outside 2-6"),
        ("name: s\nnegative_relation: [16]\n", r"field 'negative_relation' has 16, outside 0-15"),
        ("name: s\npositive_relation: [-1]\n", r"field 'positive_relation' has -1, outside 0-15"),
        ("name: s\nnegative_distance: [-2]\n", r"field 'negative_distance' has -2, outside >= 0"),
        (
            "name: s\npositive_relation: 1\n",
            r"'positive_relation' must be a list .* write e.g. \[1\]",
        ),
        (
            "name: s\nnegative_level: []\n",
            r"'negative_level' is an empty list.*use null for no filter",
        ),
        ("name: s\nn_negatives: 0\n", r"field 'n_negatives' must be an integer >= 1"),
        ("positive_relation: [1]\n", r"stage.yaml: missing required field 'name'"),
        ("name: s\ndistance_margin: [0]\n", r"'distance_margin' has 0, outside >= 1"),
        ("- name: s\n", r"stage.yaml: expected a mapping"),
    ],
)
def test_curriculum_validation_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CurriculumError, match=message):
        load_curriculum(write(tmp_path, text))


def test_curriculum_file_loads_with_null_and_omitted_filters(tmp_path: Path) -> None:
    spec = load_curriculum(
        write(
            tmp_path,
            "name: s\ndescription: d\npositive_relation: [1, 2]\nnegative_level: null\n",
            "s.yaml",
        )
    )
    assert spec == CurriculumSpec(name="s", description="d", positive_relation=[1, 2])


def test_a_stage_or_chain_named_otherwise_than_its_file_is_refused(tmp_path: Path) -> None:
    """A copy that kept its original's name would train, and be found, as the original."""
    copy = write(tmp_path, "name: 01_stage\n", "01_again.yaml")
    with pytest.raises(CurriculumError) as refused:
        load_curriculum(copy)
    assert str(refused.value) == (
        f"{copy}: name is '01_stage', but the file is 01_again.yaml; set name: 01_again, or name "
        "the file 01_stage.yaml (a stage's runs are named and found by it)"
    )
    chain = write(tmp_path, CHAIN, "chain_mine.yaml")
    with pytest.raises(CurriculumError, match=r"chain_name is 'c', but the file is chain_mine"):
        load_chain(chain)


CHAIN = """chain_name: c
stages:
  - name: 01_stage
    max_epochs: 5
    learning_rate: 2e-4
  - name: 02_stage
    learning_rate: "1e-4"
  - name: 03_stage
"""


def test_chain_loads_exponent_learning_rates(tmp_path: Path) -> None:
    chain = load_chain(write(tmp_path, CHAIN, "c.yaml"))
    assert chain.chain_name == "c"
    assert chain.stages == [
        ChainStage(name="01_stage", max_epochs=5, learning_rate=2e-4),
        ChainStage(name="02_stage", learning_rate=1e-4),
        ChainStage(name="03_stage"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chain_name: c\nstages: []\n", r"chain.yaml: field 'stages' must be a non-empty list"),
        ("chain_name: c\n", r"field 'stages' must be a non-empty list"),
        ("stages:\n  - name: a\n", r"missing required field 'chain_name'"),
        (
            "chain_name: c\nstages:\n  - name: a\n    max_epoch: 3\n",
            r"stages\[0\]: unknown field 'max_epoch'.*'max_epochs'",
        ),
        (
            "chain_name: c\nstages:\n  - name: a\n    learning_rate: fast\n",
            r"stages\[0\]: field 'learning_rate' must be a number",
        ),
        (
            "chain_name: c\nstages:\n  - name: a\n    max_epochs: 0\n",
            r"stages\[0\]: field 'max_epochs' must be an integer >= 1",
        ),
        (
            "chain_name: c\nstages:\n  - max_epochs: 2\n",
            r"stages\[0\]: missing required field 'name'",
        ),
        ("chain_name: c\nstage:\n  - name: a\n", r"unknown field 'stage'; did you mean 'stages'"),
    ],
)
def test_chain_validation_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CurriculumError, match=message):
        load_chain(write(tmp_path, text, "chain.yaml"))


def test_list_curricula_skips_chain_files(tmp_path: Path) -> None:
    write(tmp_path, "name: b\n", "b.yaml")
    write(tmp_path, "name: a\n", "a.yaml")
    write(tmp_path, CHAIN, "chain_x.yaml")
    assert [spec.name for spec in list_curricula(tmp_path)] == ["a", "b"]


# --- Shipped configuration -----------------------------------------------------------------------

SHIPPED_STAGES = [
    "01_stage",
    "02_stage",
    "03_stage",
    "04_stage",
    "05_stage",
    "default",
    "finetune",
    "quickstart",
]


def test_every_shipped_stage_loads_and_leaves_anchors_on_a_naics_like_tree() -> None:
    specs = list_curricula(CONF_DIR)
    assert [spec.name for spec in specs] == SHIPPED_STAGES
    levels, relation, distance = tree_arrays(ragged_tree((6, 4, 3, 2, 3)))
    excluded = np.zeros_like(relation, dtype=bool)
    for spec in specs:
        assert spec.description, f"{spec.name} needs a description"
        sampler = CurriculumSampler(spec, levels, relation, distance, excluded)
        assert len(sampler.eligible_anchors) > 0


def test_shipped_chain_names_shipped_stages() -> None:
    chain = load_chain(CONF_DIR / "chain_default.yaml")
    assert [stage.name for stage in chain.stages] == ["quickstart", "finetune"]
    assert [stage.learning_rate for stage in chain.stages] == [3e-3, 1e-4]
    # Its head-only stage is the quick start's, whose settings were chosen on the dev split, and
    # the adapters then train on the quick start's relations and samples, as chosen on dev.
    assert chain.stages[0] == load_chain(CONF_DIR / "chain_quickstart.yaml").stages[0]
    quick, tune = (
        load_curriculum(CONF_DIR / f"{name}.yaml") for name in ("quickstart", "finetune")
    )
    assert dataclasses.replace(tune, name=quick.name, description=quick.description) == quick
    # Each stage's weights fit the next one's model (checked when the chain is planned).
    plan = plan_chain(CONF_DIR.parent / "config.yaml", CONF_DIR, chain, [], [])
    assert [s.config.training.head_only for s in plan.stages] == [True, False]
    for stage in chain.stages:
        assert load_curriculum(CONF_DIR / f"{stage.name}.yaml").name == stage.name


def test_a_chain_is_the_same_wherever_its_files_live_and_however_its_model_ranks() -> None:
    """A chain continued on another machine (its folders elsewhere) or after a new search
    default is resumed from the store, not started over; a training setting, another experiment
    or other data makes another."""
    chain = load_chain(CONF_DIR / "chain_default.yaml")

    def chain_hash(*overrides: str, data: str = "a1b2c3") -> str:
        config = CONF_DIR.parent / "config.yaml"
        plan = plan_chain(config, CONF_DIR, chain, [], list(overrides))
        return plan.hash(None, [data] * len(plan.stages))

    elsewhere = [
        "dirs.data=/mnt/b/data",
        "dirs.raw=/mnt/b/raw",
        "dirs.checkpoints=/mnt/b/checkpoints",
        "dirs.outputs=/mnt/b/outputs",
        "search.lexical_weight=8",
        "search.backbone_dtype=float32",
        "evaluation.unseen_queries=/mnt/b/queries.csv",
    ]
    assert chain_hash(*elsewhere) == chain_hash()
    another = ("loss.temperature=0.5", "data_loader.batch_size=8", "mlflow.experiment_name=study2")
    for setting in another:
        assert chain_hash(setting) != chain_hash()
    assert chain_hash(data="d4e5f6") != chain_hash()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "no stages to train"),
        (["quickstart", "finetune", "quickstart"], "stage 'quickstart' is named more than once"),
    ],
)
def test_a_chain_of_no_stages_or_of_a_stage_twice_is_refused(names, message) -> None:
    # Twice, a resumed chain would find the first one's finished run for the second.
    with pytest.raises(CurriculumError, match=message):
        plan_chain(CONF_DIR.parent / "config.yaml", CONF_DIR, None, names, [])
    if names:
        chain = ChainSpec("twice", [ChainStage(name=name) for name in names])
        with pytest.raises(CurriculumError, match=message):
            plan_chain(CONF_DIR.parent / "config.yaml", CONF_DIR, chain, [], [])
