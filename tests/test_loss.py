import math

import pytest
import scipy.stats
import torch

from naics_mlflow.data.taxonomy import tree_matrices
from naics_mlflow.data.validation import VALIDATION_NEGATIVES, VALIDATION_TEMPERATURE
from naics_mlflow.model.lorentz import distance_to_origin, expmap0, pairwise_distance
from naics_mlflow.model.loss import (
    depth_loss,
    distortion_loss,
    kmeans_clusters,
    neighbourhood_loss,
    pool_infonce,
    pool_negative_mask,
)
from tests.reads_back import ReadsBack


def _random_points(*shape: int, curvature: float = 1.0, seed: int = 0) -> torch.Tensor:
    tangent = torch.randn(*shape, 4, generator=torch.Generator().manual_seed(seed))
    return expmap0(tangent.double(), curvature)


def _hand_distance(x: list[float], y: list[float], curvature: float) -> float:
    inner = -x[0] * y[0] + sum(a * b for a, b in zip(x[1:], y[1:], strict=True))
    return math.acosh(-curvature * inner) / math.sqrt(curvature)


def _on_hyperboloid(space: list[float], curvature: float) -> list[float]:
    return [math.sqrt(1 / curvature + sum(s * s for s in space)), *space]


def test_pool_infonce_matches_hand_computed_example():
    c, tau = 2.0, 0.5
    a = [_on_hyperboloid(s, c) for s in ([0.1, 0.2], [-0.3, 0.4])]
    p = [_on_hyperboloid(s, c) for s in ([0.2, 0.1], [-0.5, 0.2])]
    pool = [_on_hyperboloid(s, c) for s in ([0.9, -0.7], [0.6, 0.6], [-0.2, -0.2])]
    valid = [[True, False, True], [True, True, False]]
    expected = 0.0
    for i in range(2):
        kept = [pool[m] for m in range(3) if valid[i][m]]
        logits = [-_hand_distance(a[i], q, c) / tau for q in (p[i], *kept)]
        expected += -logits[0] + math.log(sum(math.exp(z) for z in logits))
    expected /= 2

    loss = pool_infonce(
        torch.tensor(a, dtype=torch.float64),
        torch.tensor(p, dtype=torch.float64),
        torch.tensor(pool, dtype=torch.float64),
        torch.tensor(valid),
        curvature=c,
        temperature=tau,
    )
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)


def test_masking_a_pool_member_equals_removing_it():
    anchor, positive = _random_points(3, seed=1), _random_points(3, seed=2)
    pool = _random_points(4, seed=3)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[0, 1] = False
    masked = pool_infonce(anchor, positive, pool, valid, 1.0, 0.1)

    kept = [pool[[0, 2, 3]], pool, pool]
    per_row = [
        pool_infonce(
            anchor[i : i + 1],
            positive[i : i + 1],
            kept[i],
            torch.ones(1, len(kept[i]), dtype=torch.bool),
            1.0,
            0.1,
        )
        for i in range(3)
    ]
    torch.testing.assert_close(masked, torch.stack(per_row).mean())


def test_hard_negative_k_keeps_each_anchors_nearest_valid_members():
    radii = torch.tensor([3.0, 1.0, 2.0, 0.5, 4.0], dtype=torch.float64)
    direction = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    pool = expmap0(radii.unsqueeze(1) * direction, 1.0)
    anchor = expmap0(torch.zeros(1, 3, dtype=torch.float64), 1.0)
    positive = expmap0(torch.tensor([[0.0, 0.7, 0.0]], dtype=torch.float64), 1.0)
    valid = torch.tensor([[True, True, True, False, True]])  # 0.5 is masked: 1.0 and 2.0 kept
    nearest_two = torch.tensor([[False, True, True, False, False]])

    torch.testing.assert_close(
        pool_infonce(anchor, positive, pool, valid, 1.0, 0.5, hard_negative_k=2),
        pool_infonce(anchor, positive, pool, nearest_two, 1.0, 0.5),
    )
    torch.testing.assert_close(
        pool_infonce(anchor, positive, pool, valid, 1.0, 0.5, hard_negative_k=5),
        pool_infonce(anchor, positive, pool, valid, 1.0, 0.5),
    )


def test_pool_negative_mask_excludes_padding_self_positives_and_clusters():
    anchor_rows, positive_rows = torch.tensor([0, 3]), torch.tensor([1, 4])
    pool_rows = torch.tensor([0, 1, 2, 3, 4, 5, -1])
    positive_pairs = torch.zeros(6, 6, dtype=torch.bool)
    positive_pairs[0, 2] = True  # code 2 is another positive of anchor 0 in this curriculum
    mask = pool_negative_mask(anchor_rows, positive_rows, pool_rows, positive_pairs)
    assert mask.tolist() == [
        [False, False, False, True, True, True, False],
        [True, True, True, False, False, True, False],
    ]
    clusters = torch.tensor([7, 7, 7, 8, 8, 7])  # code 5 shares anchor 0's cluster
    clustered = pool_negative_mask(anchor_rows, positive_rows, pool_rows, positive_pairs, clusters)
    assert clustered.tolist() == [
        [False, False, False, True, True, False, False],
        [True, True, True, False, False, True, False],
    ]


def test_loss_falls_when_optimising_free_embeddings():
    torch.manual_seed(0)
    tangent = torch.nn.Parameter(0.1 * torch.randn(12, 3))
    rows = torch.arange(12)
    anchors = torch.arange(0, 12, 2)
    positives = anchors + 1
    valid = pool_negative_mask(anchors, positives, rows)
    optimiser = torch.optim.Adam([tangent], lr=0.05)

    def loss_value() -> torch.Tensor:
        x = expmap0(tangent, 1.0)
        return pool_infonce(x[anchors], x[positives], x, valid, 1.0, 0.5)

    initial = loss_value().item()
    for _ in range(100):
        optimiser.zero_grad()
        loss = loss_value()
        loss.backward()
        optimiser.step()
    assert loss_value().item() < 0.25 * initial


def _two_blobs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(60, 8, generator=generator)
    centres = torch.zeros(60, 8)
    centres[:25, 0], centres[25:, 0] = 3.0, -3.0
    return centres + noise


def test_kmeans_separates_well_separated_blobs():
    clusters = kmeans_clusters(_two_blobs(), num_clusters=2, seed=0)
    assert clusters.dtype == torch.long
    assert (clusters[:25] == clusters[0]).all()
    assert (clusters[25:] == clusters[25]).all()
    assert clusters[0] != clusters[25]


def test_kmeans_is_deterministic_for_a_seed():
    points = torch.randn(300, 5, generator=torch.Generator().manual_seed(1))
    first = kmeans_clusters(points, num_clusters=7, seed=3)
    assert torch.equal(first, kmeans_clusters(points, num_clusters=7, seed=3))
    assert set(first.tolist()) == set(range(7))


# --- hierarchy terms ------------------------------------------------------------------------


def _on_line(positions: list[float]) -> torch.Tensor:
    """Points on one geodesic through the origin: the distance between two is |t_i - t_j|."""
    return expmap0(torch.tensor([[t, 0.0] for t in positions], dtype=torch.float64), 1.0)


def _line_distances(positions: list[float]) -> torch.Tensor:
    """The pairwise hyperbolic distances of :func:`_on_line`'s points."""
    points = _on_line(positions)
    return pairwise_distance(points, points, 1.0)


PATH_TREE = torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]])  # codes 0 - 1 - 2 on a path


def test_distortion_by_hand():
    # Hyperbolic distances 1, 3 and 2 for tree distances 1, 2 and 1, at scale 1.
    loss = distortion_loss(_line_distances([0.0, 1.0, 3.0]), PATH_TREE, 1.0)
    assert loss.item() == pytest.approx((0.0 + 0.5**2 + 1.0**2) / 3)
    # Distances that are exactly the scale times the tree distances cost nothing.
    assert distortion_loss(_line_distances([0.0, 0.7, 1.4]), PATH_TREE, 0.7).item() == (
        pytest.approx(0.0, abs=1e-9)
    )
    # The diagonal, a code's distance to itself, never counts: in float32 it is rounding noise
    # that grows with the radius.
    noisy_diagonal = _line_distances([0.0, 1.0, 3.0]) + 5.0 * torch.eye(3, dtype=torch.float64)
    assert distortion_loss(noisy_diagonal, PATH_TREE, 1.0).item() == pytest.approx(loss.item())
    one_code = torch.zeros((1, 1), requires_grad=True)
    alone = distortion_loss(one_code, torch.zeros((1, 1), dtype=torch.long), 1.0)
    alone.backward()
    assert alone.item() == 0.0 and one_code.grad.item() == 0.0


def test_neighbourhood_by_hand():
    sharpness, scale = 2.0, 1.0
    distances = [[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]
    expected = 0.0
    for i in range(3):
        others = [j for j in range(3) if j != i]
        p = torch.softmax(torch.tensor([-sharpness * float(PATH_TREE[i, j]) for j in others]), 0)
        log_q = torch.log_softmax(
            torch.tensor([-sharpness / scale * distances[i][j] for j in others]), 0
        )
        expected += -(p * log_q).sum().item() / 3
    hyperbolic = _line_distances([0.0, 1.0, 3.0])
    assert neighbourhood_loss(hyperbolic, PATH_TREE, scale, sharpness).item() == pytest.approx(
        expected, rel=1e-6
    )
    # Ranking each code's tree neighbours first costs less than ranking them last.
    swapped = _line_distances([0.0, 3.0, 1.0])
    assert neighbourhood_loss(swapped, PATH_TREE, scale, sharpness) > (
        neighbourhood_loss(hyperbolic, PATH_TREE, scale, sharpness)
    )


def test_depth_by_hand():
    # Radii 1, 0.5 and 2; code 1's parent is code 0, code 2's is code 1, code 0 has none here.
    points = _on_line([1.0, -0.5, 2.0])
    parent = torch.tensor([-1, 0, 1])
    # Code 1 lies 0.5 nearer the origin than its parent (hinge 0.5 + 0.25), code 2 lies 1.5
    # further out than its parent (no cost at margin 0.25).
    assert depth_loss(points, parent, 1.0, 0.25).item() == pytest.approx((0.75 + 0.0) / 2)
    assert depth_loss(points, torch.tensor([-1, -1, -1]), 1.0, 0.25).item() == 0.0


def test_depth_reads_nothing_back_from_the_device():
    """The depth term runs every step; a read back (tests/reads_back.py) would stall a GPU."""
    points = _on_line([1.0, -0.5, 2.0]).requires_grad_()
    with ReadsBack() as reads:
        for parent in ([-1, 0, 1], [-1, -1, -1]):
            depth_loss(points, torch.tensor(parent), 1.0, 0.25).backward()
    assert reads.names == []
    assert points.grad.abs().sum() > 0


def test_hierarchy_terms_turn_free_points_into_the_tree():
    """Free points optimised by the three terms alone reproduce the tree: distances rank like
    tree distances and every level lies further out than the one above."""
    codes = ["11", "111", "1111", "1112", "112", "1121", "1122", "21", "211", "2111", "212"]
    distance, _ = tree_matrices(codes)
    tree = torch.from_numpy(distance.astype("int64"))
    parent_rows = [codes.index(c[:-1]) if len(c) > 2 else -1 for c in codes]
    parent = torch.tensor(parent_rows)
    tangent = 0.01 * torch.randn(len(codes), 8, generator=torch.Generator().manual_seed(0))
    tangent.requires_grad_(True)
    optimizer = torch.optim.Adam([tangent], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        points = expmap0(tangent, 1.0)
        hyperbolic = pairwise_distance(points, points, 1.0)
        loss = (
            distortion_loss(hyperbolic, tree, 1.0)
            + neighbourhood_loss(hyperbolic, tree, 1.0, 2.0)
            + depth_loss(points, parent, 1.0, 0.5)
        )
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        points = expmap0(tangent, 1.0)
        hyperbolic = pairwise_distance(points, points, 1.0)
        upper = torch.triu_indices(len(codes), len(codes), 1)
        pairs = hyperbolic[upper[0], upper[1]].numpy(), tree[upper[0], upper[1]].numpy()
        radius = distance_to_origin(points, 1.0)
    assert scipy.stats.spearmanr(*pairs).statistic > 0.9
    levels = torch.tensor([len(c) for c in codes])
    means = [radius[levels == level].mean() for level in (2, 3, 4)]
    assert means[0] < means[1] < means[2]


def test_rows_of_pairs_average_to_the_pairwise_terms():
    """The hierarchy terms of a few codes' rows of pairs (``loss.hierarchy_rows``) are, averaged
    over the rows, the terms of all pairs: each code's row has as many pairs as any other."""
    hyperbolic = _line_distances([0.0, 1.0, 3.0])
    for term in (
        lambda h, t: distortion_loss(h, t, 1.0),
        lambda h, t: neighbourhood_loss(h, t, 1.0, 2.0),
    ):
        rows = [term(hyperbolic[[i]], PATH_TREE[[i]]).item() for i in range(3)]
        assert sum(rows) / 3 == pytest.approx(term(hyperbolic, PATH_TREE).item(), rel=1e-9)
        assert term(hyperbolic[[0, 2]], PATH_TREE[[0, 2]]).item() == pytest.approx(
            (rows[0] + rows[2]) / 2, rel=1e-9
        )


def test_val_loss_tells_apart_embeddings_whose_distances_follow_the_tree():
    """Once distances follow the tree (one edge about one unit), a positive one unit from its
    anchor and negatives three or four units away must still give clearly different val_loss:
    at a temperature of 0.1 both were below 1e-8, and the best checkpoint was chosen by noise."""
    anchor = _on_line([0.0])
    positive = _on_line([1.0])

    def val_loss(negative_distance: float) -> float:
        negatives = _on_line([-negative_distance] * VALIDATION_NEGATIVES)
        valid = torch.ones((1, VALIDATION_NEGATIVES), dtype=torch.bool)
        return pool_infonce(anchor, positive, negatives, valid, 1.0, VALIDATION_TEMPERATURE).item()

    nearer, further = val_loss(3.0), val_loss(4.0)
    assert further > 0.05 and nearer > 1.5 * further
