import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score

from naics_mlflow.evaluation.metrics import (
    code_prefix,
    coefficient_of_variation,
    cophenetic_correlations,
    hierarchy_metrics,
    mean_distortion,
    monotonic_fraction,
    ndcg_at,
    rank_of_true,
    retrieval_metrics,
    sample_codes,
)
from naics_mlflow.model.lorentz import expmap0, pairwise_distance

CURVATURE = 1.0
# 2 sectors x 2 children x 2 grandchildren, parents first.
TINY_CODES = [
    "11",
    "21",
    "111",
    "112",
    "211",
    "212",
    "1111",
    "1112",
    "1121",
    "1122",
    "2111",
    "2112",
    "2121",
    "2122",
]


def _tree_distance(a: str, b: str) -> int:
    """Edges between two codes of the tiny tree, sectors hanging under a virtual root."""
    shared_levels = sum(a[:k] == b[:k] for k in range(2, min(len(a), len(b)) + 1))
    return (len(a) - 1) + (len(b) - 1) - 2 * shared_levels


TINY_TREE = np.array([[_tree_distance(a, b) for b in TINY_CODES] for a in TINY_CODES], np.int8)
TINY_LEVELS = np.array([len(code) for code in TINY_CODES], np.int8)


def _branch_angle(code: str) -> float:
    """Sectors opposite each other; each level turns by a third of the previous turn."""
    angle, turn = (0.0 if code[0] == "1" else math.pi), math.pi / 8
    for digit in code[2:]:
        angle += turn if digit == "2" else -turn
        turn /= 3
    return angle


def _tree_like(radius_of_level: Callable[[int], float] = lambda level: level - 1.0) -> torch.Tensor:
    """Tiny-tree codes on geodesics from the origin: radius by level, direction by branch."""
    tangents = []
    for code in TINY_CODES:
        radius, angle = radius_of_level(len(code)), _branch_angle(code)
        tangents.append([radius * math.cos(angle), radius * math.sin(angle)])
    return expmap0(torch.tensor(tangents), CURVATURE)


def _on_line(positions: list[float]) -> torch.Tensor:
    """Points on one geodesic through the origin; the distance between two is |t_i - t_j|."""
    return expmap0(torch.tensor([[t, 0.0] for t in positions]), CURVATURE)


def test_tiny_tree_distances_by_hand():
    position = {code: i for i, code in enumerate(TINY_CODES)}
    assert TINY_TREE[position["1111"], position["111"]] == 1
    assert TINY_TREE[position["1111"], position["1112"]] == 2
    assert TINY_TREE[position["1111"], position["11"]] == 2
    assert TINY_TREE[position["1111"], position["1121"]] == 4
    assert TINY_TREE[position["1111"], position["2111"]] == 6
    assert TINY_TREE[position["11"], position["21"]] == 2
    assert (TINY_TREE == TINY_TREE.T).all() and (np.diag(TINY_TREE) == 0).all()


def test_tree_like_embedding_scores_high():
    metrics = hierarchy_metrics(_tree_like(), TINY_TREE, TINY_LEVELS, CURVATURE)
    assert set(metrics) == {
        "val/spearman",
        "val/pearson",
        "val/mean_distortion",
        "val/ndcg_at_5",
        "val/ndcg_at_10",
        "val/ndcg_at_20",
        "val/radius_level_2",
        "val/radius_level_3",
        "val/radius_level_4",
        "val/radius_level_monotonic",
        "val/radius_depth_spearman",
        "val/manifold_violation_max",
        "val/manifold_valid",
        "val/tangent_variance",
        "val/norm_cv",
        "val/distance_cv",
    }
    assert metrics["val/spearman"] > 0.9
    assert metrics["val/pearson"] > 0.9
    for k in (5, 10, 20):
        assert metrics[f"val/ndcg_at_{k}"] > 0.99
    for level in (2, 3, 4):
        assert metrics[f"val/radius_level_{level}"] == pytest.approx(level - 1.0, abs=1e-5)
    assert metrics["val/radius_level_monotonic"] == 1.0
    assert metrics["val/radius_depth_spearman"] == pytest.approx(1.0)
    assert metrics["val/manifold_valid"] == 1.0
    assert metrics["val/manifold_violation_max"] < 1e-5


def test_random_embedding_scores_clearly_lower():
    tree_like = hierarchy_metrics(_tree_like(), TINY_TREE, TINY_LEVELS, CURVATURE)
    tangents = 2.0 * torch.randn(len(TINY_CODES), 2, generator=torch.Generator().manual_seed(0))
    random = hierarchy_metrics(expmap0(tangents, CURVATURE), TINY_TREE, TINY_LEVELS, CURVATURE)
    assert random["val/spearman"] < 0.5 < tree_like["val/spearman"] - 0.3
    assert random["val/ndcg_at_5"] < tree_like["val/ndcg_at_5"] - 0.3
    assert random["val/mean_distortion"] > tree_like["val/mean_distortion"] + 0.2
    assert random["val/radius_level_monotonic"] < 1.0


def test_radius_decreasing_with_level_is_not_monotonic():
    inverted = _tree_like(radius_of_level=lambda level: 7.0 - level)
    metrics = hierarchy_metrics(inverted, TINY_TREE, TINY_LEVELS, CURVATURE)
    assert metrics["val/radius_level_monotonic"] == 0.0
    assert metrics["val/radius_depth_spearman"] == pytest.approx(-1.0)
    assert monotonic_fraction({2: 1.0, 3: 2.0, 4: 1.5}) == 0.5
    assert monotonic_fraction({2: 1.0, 4: 2.0}) == 1.0  # a missing level is skipped over


def test_spearman_ranks_and_pearson_does_not():
    tree = np.array([1.0, 2.0, 2.0, 3.0, 6.0])
    spearman, pearson = cophenetic_correlations(np.exp(tree), tree)
    assert spearman == pytest.approx(1.0)
    assert pearson < 0.99


def test_mean_distortion_fits_the_scale():
    tree = np.array([1.0, 2.0, 4.0])
    assert mean_distortion(3.0 * tree, tree) == pytest.approx(0.0, abs=1e-12)
    # s = (1*1 + 2*1) / (1 + 4) = 0.6: |0.6 - 1| / 1 and |1.2 - 1| / 1 average to 0.3.
    assert mean_distortion(np.array([1.0, 2.0]), np.array([1.0, 1.0])) == pytest.approx(0.3)


def test_ndcg_by_hand():
    # Path 0 - 1 - 2. Codes 0 and 2 each rank the wrong one of their two neighbours first;
    # code 1's two neighbours are equally relevant, so any order is ideal.
    tree = torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]])
    embedding = torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, 3.0], [1.0, 3.0, 0.0]])
    wrong = (0.25 + 0.5 / math.log2(3)) / (0.5 + 0.25 / math.log2(3))
    ndcg = ndcg_at(embedding, tree, (1, 2, 5))
    assert ndcg[1] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert ndcg[2] == pytest.approx((wrong + 1.0 + wrong) / 3)
    assert ndcg[5] == ndcg[2]  # only N - 1 = 2 neighbours exist


@pytest.mark.parametrize("where", [0.0, 2.0])
def test_collapsed_embedding_reads_zero_without_nan(where: float):
    points = expmap0(torch.full((len(TINY_CODES), 3), where), CURVATURE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = hierarchy_metrics(points, TINY_TREE, TINY_LEVELS, CURVATURE)
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["val/tangent_variance"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["val/distance_cv"] == 0.0
    assert metrics["val/norm_cv"] == 0.0
    assert metrics["val/spearman"] == 0.0
    assert metrics["val/radius_level_monotonic"] == 0.0  # equal radii do not increase
    assert metrics["val/radius_depth_spearman"] == 0.0


def test_collapsed_embedding_scores_low_on_neighbourhoods():
    """Equal distances rank the least relevant codes first: a collapsed embedding scores exactly
    what ranking every code's farthest relatives first scores, not what the taxonomy's row order
    (parents first) would lend it."""
    points = expmap0(torch.full((len(TINY_CODES), 3), 1.0), CURVATURE)
    collapsed = hierarchy_metrics(points, TINY_TREE, TINY_LEVELS, CURVATURE)
    tree = torch.from_numpy(TINY_TREE)
    farthest_first = ndcg_at((tree.max() - tree).float(), tree, (5, 10))
    by_row = ndcg_at(torch.arange(len(TINY_CODES)).float().expand(len(TINY_CODES), -1), tree, (5,))
    for k in (5, 10):
        assert collapsed[f"val/ndcg_at_{k}"] == pytest.approx(farthest_first[k])
        assert collapsed[f"val/ndcg_at_{k}"] < 0.5
    assert by_row[5] > collapsed["val/ndcg_at_5"] + 0.2


def test_ndcg_ties_count_against_the_embedding():
    tree = torch.tensor([[0, 1, 3], [1, 0, 2], [3, 2, 0]])
    tied = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    worst_first = torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    assert ndcg_at(tied, tree, (1, 2)) == ndcg_at(worst_first, tree, (1, 2))


def _sklearn_ndcg(embedding_distance: torch.Tensor, tree_distance: torch.Tensor, k: int) -> float:
    """``sklearn.metrics.ndcg_score`` of each code's other codes, nearer scoring higher, with
    ``ndcg_at``'s gains, averaged over codes."""
    n = len(tree_distance)
    others = ~np.eye(n, dtype=bool)
    gain = np.exp2(-tree_distance.numpy().astype(np.float64))[others].reshape(n, n - 1)
    score = -embedding_distance.numpy()[others].reshape(n, n - 1)
    return float(ndcg_score(gain, score, k=k))


def test_ndcg_is_sklearns_without_ties_and_below_its_tie_average_with_them():
    tangents = torch.randn(len(TINY_CODES), 2, generator=torch.Generator().manual_seed(0))
    points = expmap0(tangents, CURVATURE)
    untied = pairwise_distance(points, points, CURVATURE)
    others = untied[~torch.eye(len(TINY_CODES), dtype=torch.bool)].reshape(len(TINY_CODES), -1)
    assert all(len(row.unique()) == len(row) for row in others)  # no code sees a tie
    tree = torch.from_numpy(TINY_TREE)
    ndcg = ndcg_at(untied, tree, (1, 5, 10))
    for k in (1, 5, 10):
        assert ndcg[k] == pytest.approx(_sklearn_ndcg(untied, tree, k), rel=1e-5)

    # Every code sees its two others at one distance. Ranking the less relevant first gives
    # 0.125/0.5, 0.25/0.5 and 0.125/0.25 at k = 1; sklearn averages the tied gains instead:
    # 0.3125/0.5, 0.375/0.5 and 0.1875/0.25.
    path = torch.tensor([[0, 1, 3], [1, 0, 2], [3, 2, 0]])
    tied = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert ndcg_at(tied, path, (1,))[1] == pytest.approx(5 / 12)
    assert _sklearn_ndcg(tied, path, 1) == pytest.approx(17 / 24)


def test_collapsed_query_embeddings_hit_no_prefix():
    """A query at equal distance from every candidate 'predicts' none of them."""
    metrics = retrieval_metrics(
        _on_line([0.0, 0.0]),
        _on_line([1.0, -1.0, 1.0, -1.0]),
        ["111111", "112111"],
        ["111111", "112111", "211111", "111222"],
        CURVATURE,
    )
    assert metrics["top1"] == 0.0 and metrics["top5"] == 1.0
    assert metrics["prefix2_accuracy"] == metrics["prefix3_accuracy"] == 0.0
    shared = retrieval_metrics(
        _on_line([0.0]), _on_line([1.0, -1.0]), ["111111"], ["111111", "111222"], CURVATURE, (2, 3)
    )
    assert shared["prefix2_accuracy"] == shared["prefix3_accuracy"] == 1.0


def test_coefficient_of_variation():
    assert coefficient_of_variation(np.array([1.0, 3.0])) == pytest.approx(0.5)
    assert coefficient_of_variation(np.zeros(4)) == 0.0


def test_manifold_valid_is_relative_to_the_time_coordinate():
    directions = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    far = expmap0(10.0 * directions / directions.norm(dim=1, keepdim=True), CURVATURE)
    tree = np.ones((32, 32), np.int8) - np.eye(32, dtype=np.int8)
    levels = np.full(32, 6, np.int8)
    metrics = hierarchy_metrics(far, tree, levels, CURVATURE)
    assert metrics["val/manifold_violation_max"] > 1e-3  # float32 rounding of x0^2 ~ 5e8
    assert metrics["val/manifold_valid"] == 1.0
    moved = far.clone()
    moved[3, 0] *= 1.001
    assert hierarchy_metrics(moved, tree, levels, CURVATURE)["val/manifold_valid"] == 0.0


def test_sample_size_subsets_deterministically():
    points = _tree_like()
    rows = np.sort(np.random.default_rng(7).choice(len(TINY_CODES), size=8, replace=False))
    assert (sample_codes(len(TINY_CODES), 8, seed=7) == rows).all()
    assert not (sample_codes(len(TINY_CODES), 8, seed=8) == rows).all()

    sampled = hierarchy_metrics(points, TINY_TREE, TINY_LEVELS, CURVATURE, sample_size=8, seed=7)
    again = hierarchy_metrics(points, TINY_TREE, TINY_LEVELS, CURVATURE, sample_size=8, seed=7)
    by_hand = hierarchy_metrics(
        points[torch.from_numpy(rows)], TINY_TREE[np.ix_(rows, rows)], TINY_LEVELS[rows], CURVATURE
    )
    assert sampled == again == by_hand
    full = hierarchy_metrics(points, TINY_TREE, TINY_LEVELS, CURVATURE)
    assert sampled != full
    everything = hierarchy_metrics(points, TINY_TREE, TINY_LEVELS, CURVATURE, sample_size=99)
    assert everything == full


# Candidates on one geodesic at -3, -2, ..., 3, so every distance is known by hand.
CANDIDATES = ["311111", "321111", "441111", "451111", "111111", "112111", "113111"]
# (true code, position): ranks 1, 2, 6, absent, 3, 5; nearest candidate in the comment.
QUERIES = [
    ("311111", -2.9),  # 311111 (0.1): rank 1, all prefixes hit
    ("321111", -2.7),  # 311111 (0.3), 321111 (0.7): rank 2, range sector 31 = 32 hits prefix 2
    ("112111", -0.9),  # 441111 .1, 451111 .9, 321111 1.1, 111111 1.9, 311111 2.1, 112111 2.9
    ("999999", 1.1),  # not a candidate: rank 0; nearest 111111
    ("112111", 0.6),  # 111111 .4, 451111 .6, 112111 1.4: rank 3, prefix 2 hits
    ("111111", -1.6),  # 321111 .4, 441111 .6, 311111 1.4, 451111 1.6, 111111 2.6: rank 5
]


def _retrieval(**kwargs) -> dict[str, float]:
    return retrieval_metrics(
        _on_line([t for _, t in QUERIES]),
        _on_line([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]),
        [code for code, _ in QUERIES],
        CANDIDATES,
        CURVATURE,
        **kwargs,
    )


def test_retrieval_by_hand():
    metrics = _retrieval()
    assert metrics["top1"] == pytest.approx(1 / 6)
    assert metrics["top5"] == pytest.approx(4 / 6)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 6 + 0 + 1 / 3 + 1 / 5) / 6)
    assert metrics["prefix2_accuracy"] == pytest.approx(3 / 6)
    assert metrics["prefix3_accuracy"] == pytest.approx(1 / 6)
    assert metrics["prefix4_accuracy"] == pytest.approx(1 / 6)
    assert set(metrics) == {
        "top1",
        "top5",
        "mrr",
        "prefix2_accuracy",
        "prefix3_accuracy",
        "prefix4_accuracy",
    }


def test_retrieval_chunking_does_not_change_results():
    assert _retrieval(chunk_size=1) == _retrieval(chunk_size=4) == _retrieval()


def test_range_sectors_share_their_two_digit_prefix():
    assert code_prefix("321111", 2) == code_prefix("311111", 2) == "31"
    assert code_prefix("452111", 2) == "44"
    assert code_prefix("493110", 2) == "48"
    assert code_prefix("321111", 3) != code_prefix("311111", 3)
    metrics = retrieval_metrics(
        _on_line([0.1]), _on_line([0.0, 2.0]), ["331111"], ["321111", "331111"], CURVATURE, (2,)
    )
    assert metrics == {"top1": 0.0, "top5": 1.0, "mrr": 0.5, "prefix2_accuracy": 1.0}


def test_rank_of_true_counts_ties_against_the_true_code():
    distances = torch.tensor([[1.0, 1.0, 2.0], [3.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    ranks = rank_of_true(distances, torch.tensor([0, 0, -1]))
    assert ranks.tolist() == [2, 3, 0]


def test_duplicate_candidates_are_rejected():
    with pytest.raises(ValueError, match="duplicates"):
        retrieval_metrics(_on_line([0.0]), _on_line([0.0, 1.0]), ["11"], ["11", "11"], CURVATURE)
