"""How well Lorentz embeddings reproduce the NAICS tree, and how well text queries find their code.

``hierarchy_metrics`` scores code embeddings against the tree: correlation and distortion of
distances, neighbourhood ranking (NDCG), radius by level, manifold validity and collapse checks.
``retrieval_metrics`` scores query embeddings by where their true code ranks among candidates;
``ranking_metrics`` does the ranking for it and for the text baselines (``evaluation.baselines``).

Distances are computed in float32 on the embeddings' device (see ``model.lorentz`` for why never
lower precision); statistics over the ~2.25M code pairs are taken in float64 numpy, where sums of
that many terms keep their digits.
"""

import math
from collections.abc import Iterable, Sequence
from itertools import pairwise

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from naics_mlflow.data.taxonomy import sector_of, submatrix
from naics_mlflow.model.lorentz import (
    distance_to_origin,
    logmap0,
    manifold_violation,
    pairwise_distance,
)

NDCG_CUTOFFS = (5, 10, 20)
# expmap0 output is off the hyperboloid by about one float32 ulp of x0^2 (relative ~1e-7 at every
# radius and dimension); 1e-4 leaves three orders of margin for float32 arithmetic done to the
# points afterwards, yet flags any point that was moved in ambient space (a 0.1% change of x0
# alone is ~2e-3).
MANIFOLD_RELATIVE_TOLERANCE = 1e-4
# Rows of queries per distance block: (1024, C) float32 is 8.7 MB for all 2,125 codes.
QUERY_CHUNK_SIZE = 1024


def coefficient_of_variation(values: np.ndarray) -> float:
    """Population standard deviation over mean, defined as 0 when the mean is 0.

    A collapsed embedding has all values equal (or all zero); 0 says "no spread" in both cases
    instead of NaN, which would break the comparison of runs.
    """
    mean = float(values.mean())
    return float(values.std() / mean) if mean != 0.0 else 0.0


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation, defined as 0 when either side is constant (it orders nothing)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(stats.pearsonr(a, b).statistic)


def cophenetic_correlations(
    embedding_pairs: np.ndarray, tree_pairs: np.ndarray
) -> tuple[float, float]:
    """Spearman and Pearson correlation between embedding and tree distances of the same pairs.

    Spearman is Pearson of average ranks (``rankdata``), which is what ``spearmanr`` computes but
    without its overhead on ~2.25M pairs.

    Args:
        embedding_pairs, tree_pairs: ``(P,)`` float64.

    Returns:
        ``(spearman, pearson)``.
    """
    spearman = _pearson(stats.rankdata(embedding_pairs), stats.rankdata(tree_pairs))
    return spearman, _pearson(embedding_pairs, tree_pairs)


def mean_distortion(embedding_pairs: np.ndarray, tree_pairs: np.ndarray) -> float:
    """Mean of ``|s d_emb - d_tree| / d_tree`` with ``s`` the least-squares scale.

    ``s = <d_emb, d_tree> / <d_emb, d_emb>`` minimises ``sum (s d_emb - d_tree)^2``. Fitting the
    scale makes the metric independent of curvature and of the embedding's overall size, so runs
    compare; without it any uniform stretch would read as distortion.

    Args:
        embedding_pairs, tree_pairs: ``(P,)`` float64; tree distances of distinct codes are >= 1.
    """
    energy = float(embedding_pairs @ embedding_pairs)
    scale = float(embedding_pairs @ tree_pairs) / energy if energy > 0.0 else 0.0
    return float(np.mean(np.abs(scale * embedding_pairs - tree_pairs) / tree_pairs))


def ndcg_at(
    embedding_distance: Tensor, tree_distance: Tensor, cutoffs: Sequence[int]
) -> dict[int, float]:
    """Mean NDCG@k of ranking the other codes by embedding distance, for each code.

    Relevance is ``2 ** -d_tree``: the parent (1) counts 1/2, siblings and the grandparent (2)
    1/4, and so on. The halving matches the tree, where the number of codes at distance ``d``
    grows roughly geometrically, so NDCG rewards getting the near neighbourhood right instead of
    the order among the many distant codes. It also depends on the pair alone, whereas
    ``max_d - d_tree`` would shift with the evaluated subset's largest distance. Ties in the tree
    cost nothing: the ideal DCG sorts by tree distance. Ties in the embedding count against it:
    codes at the same embedding distance are ranked least relevant first, so an embedding that
    collapses codes onto one point cannot score by the row order (parents first) of the
    taxonomy. A code is never its own neighbour, so ``k`` is capped at ``N - 1``.

    ``sklearn.metrics.ndcg_score`` is not used because it averages the gain of tied codes, which
    lends a collapsed embedding the score of a random order; breaking ties before calling it
    would leave it only the discounted sum below, at the cost of copying the ``(N, N)``
    distances off the device.

    Args:
        embedding_distance: ``(N, N)`` float32.
        tree_distance: ``(N, N)`` on the same device.
        cutoffs: the ``k`` values.

    Returns:
        ``{k: mean NDCG@k}``.
    """
    n = embedding_distance.shape[0]
    depth = min(max(cutoffs), n - 1)
    self_pair = torch.eye(n, dtype=torch.bool, device=embedding_distance.device)
    # Self ranks last and has no gain, so neither the ranking nor the ideal ever picks it.
    masked_distance = embedding_distance.masked_fill(self_pair, math.inf)
    gain = torch.exp2(-tree_distance.float()).masked_fill(self_pair, 0.0)
    # Two stable sorts: by gain ascending, then by distance, so ties keep the worst gain first.
    by_gain = gain.argsort(dim=1, stable=True)
    by_distance = masked_distance.gather(1, by_gain).argsort(dim=1, stable=True)
    neighbours = by_gain.gather(1, by_distance[:, :depth])
    discount = 1.0 / torch.log2(torch.arange(2, depth + 2, dtype=torch.float32, device=gain.device))
    dcg = torch.cumsum(gain.gather(1, neighbours) * discount, dim=1)
    ideal = torch.cumsum(torch.topk(gain, depth, dim=1).values * discount, dim=1)
    ndcg = dcg / ideal
    return {k: float(ndcg[:, min(k, depth) - 1].mean()) for k in cutoffs}


def radius_by_level(radius: np.ndarray, levels: np.ndarray) -> dict[int, float]:
    """Mean distance to the origin of the codes at each level present, ``{level: mean}``."""
    return {int(level): float(radius[levels == level].mean()) for level in np.unique(levels)}


def monotonic_fraction(mean_radius: dict[int, float]) -> float:
    """Fraction of consecutive levels (among those present) whose mean radius increases.

    1.0 when deeper codes lie further out at every step; vacuously 1.0 for a single level.
    """
    radii = [mean_radius[level] for level in sorted(mean_radius)]
    steps = [outer > inner for inner, outer in pairwise(radii)]
    return float(np.mean(steps)) if steps else 1.0


def manifold_check(embeddings: Tensor, curvature: float) -> tuple[float, bool]:
    """Largest violation ``|<x, x>_L + 1/c|`` and whether every point is on the hyperboloid.

    Float32 holds the constraint only to a few ulps of ``x0^2``, so the absolute violation of a
    correct point at radius 11 is ~65; validity therefore compares each point's violation with
    ``1/c + x0^2`` (>= 2/c, so no division by zero even for a broken point with ``x0 = 0``) using
    ``MANIFOLD_RELATIVE_TOLERANCE``.

    Args:
        embeddings: ``(N, D + 1)`` float32.
        curvature: ``c > 0``.

    Returns:
        ``(max absolute violation, valid)``.
    """
    violation = manifold_violation(embeddings, curvature)
    relative = violation / (1.0 / curvature + embeddings[:, 0].square())
    return float(violation.max()), bool(relative.max() < MANIFOLD_RELATIVE_TOLERANCE)


def sample_codes(n: int, sample_size: int | None, seed: int) -> np.ndarray:
    """Sorted row indices to evaluate: all ``n``, or a seeded subset without replacement."""
    if sample_size is None or sample_size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))


@torch.no_grad()
def hierarchy_metrics(
    embeddings: Tensor,
    tree_distance: np.ndarray,
    levels: np.ndarray,
    curvature: float,
    sample_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Score code embeddings against the tree; keys carry the ``val/`` prefix for logging as-is.

    Pair statistics use each unordered pair ``i < j`` once.

    - ``val/spearman``, ``val/pearson``: cophenetic correlation of embedding and tree distance.
    - ``val/mean_distortion``: see ``mean_distortion`` (least-squares scale, so scale-free).
    - ``val/ndcg_at_5``, ``val/ndcg_at_10``, ``val/ndcg_at_20``: see ``ndcg_at``.
    - ``val/radius_level_{L}`` for each level present, and ``val/radius_level_monotonic``.
    - ``val/radius_depth_spearman``: rank correlation of each code's distance to the origin with
      its level; 1 when every deeper code lies further out (0 when all radii are equal).
    - ``val/manifold_violation_max``, ``val/manifold_valid`` (1.0 or 0.0): see
      ``manifold_check``.
    - collapse checks, ~0 for a collapsed embedding: ``val/tangent_variance`` (mean over
      dimensions of the variance of ``logmap0``), ``val/norm_cv`` (coefficient of variation of
      the radius) and ``val/distance_cv`` (of the pairwise distances).

    Args:
        embeddings: ``(N, D + 1)`` points; evaluated in float32 on their device.
        tree_distance: ``(N, N)`` int tree distances.
        levels: ``(N,)`` code levels, 2..6.
        curvature: ``c > 0``.
        sample_size: evaluate a random subset of this many codes (all if None or >= N).
        seed: seed of that subset, so successive evaluations compare the same codes.
    """
    rows = sample_codes(embeddings.shape[0], sample_size, seed)
    if len(rows) < 2:
        raise ValueError(f"hierarchy metrics need at least 2 codes, got {len(rows)}")
    points = embeddings[torch.from_numpy(rows).to(embeddings.device)].float()
    tree = submatrix(tree_distance, rows)
    levels = levels[rows]

    embedding_distance = pairwise_distance(points, points, curvature)
    upper = np.triu_indices(len(rows), k=1)
    embedding_pairs = embedding_distance.cpu().numpy()[upper].astype(np.float64)
    tree_pairs = tree[upper].astype(np.float64)
    spearman, pearson = cophenetic_correlations(embedding_pairs, tree_pairs)
    metrics = {
        "val/spearman": spearman,
        "val/pearson": pearson,
        "val/mean_distortion": mean_distortion(embedding_pairs, tree_pairs),
    }

    tree_on_device = torch.from_numpy(tree.astype(np.int64)).to(points.device)
    ndcg = ndcg_at(embedding_distance, tree_on_device, NDCG_CUTOFFS)
    metrics.update({f"val/ndcg_at_{k}": value for k, value in ndcg.items()})

    radius = distance_to_origin(points, curvature).cpu().numpy().astype(np.float64)
    mean_radius = radius_by_level(radius, levels)
    metrics.update({f"val/radius_level_{level}": value for level, value in mean_radius.items()})
    metrics["val/radius_level_monotonic"] = monotonic_fraction(mean_radius)
    metrics["val/radius_depth_spearman"] = _pearson(
        stats.rankdata(radius), stats.rankdata(levels.astype(np.float64))
    )

    violation_max, valid = manifold_check(points, curvature)
    metrics["val/manifold_violation_max"] = violation_max
    metrics["val/manifold_valid"] = float(valid)

    tangent = logmap0(points, curvature)
    metrics["val/tangent_variance"] = float(tangent.var(dim=0, correction=0).mean())
    metrics["val/norm_cv"] = coefficient_of_variation(radius)
    metrics["val/distance_cv"] = coefficient_of_variation(embedding_pairs)
    return metrics


def rank_of_true(distances: Tensor, true_index: Tensor) -> Tensor:
    """1-based rank of each query's true candidate, 0 where it is absent (``true_index < 0``).

    Ties count against the true candidate (rank = number of candidates at most as far), so an
    embedding that maps everything to one point ranks last rather than first.

    Args:
        distances: ``(Q, C)``.
        true_index: ``(Q,)`` int64 column of the true candidate, -1 if absent.

    Returns:
        ``(Q,)`` int64.
    """
    present = true_index >= 0
    true_distance = distances.gather(1, true_index.clamp_min(0).unsqueeze(1))
    rank = (distances <= true_distance).sum(dim=1)
    return torch.where(present, rank, torch.zeros_like(rank))


def code_prefix(code: str, digits: int) -> str:
    """The first ``digits`` digits, with a two-digit result mapped to its sector.

    ``32...`` and ``33...`` belong to sector ``31`` (also ``45`` to ``44``, ``49`` to ``48``), so
    their two-digit prefixes must compare equal. A code shorter than ``digits`` is its own prefix.
    """
    prefix = code[:digits]
    return sector_of(prefix) if len(prefix) == 2 else prefix


def ranking_metrics(
    distance_blocks: Iterable[Tensor],
    true_codes: Sequence[str],
    candidate_codes: Sequence[str],
    prefix_levels: Sequence[int] = (2, 3, 4),
) -> dict[str, float]:
    """Score where each query's true code ranks among candidates ordered by a distance.

    Shared by every retriever: ``retrieval_metrics`` passes Lorentz distances, similarity-based
    baselines pass negated scores, so all report the same numbers for the same ranking.

    - ``top1``, ``top5``: fraction of queries whose true code ranks within 1 / 5 (ties count
      against it, see ``rank_of_true``); a true code absent from the candidates is a miss.
    - ``mrr``: mean reciprocal rank, 0 for an absent true code.
    - ``prefix{n}_accuracy`` for each ``n`` in ``prefix_levels``: fraction of queries whose
      nearest candidate shares the first ``n`` digits with the true code (see ``code_prefix``
      for range sectors), i.e. how often a miss still lands in the right part of the tree. When
      several candidates tie for nearest, all of them must share the prefix.

    Args:
        distance_blocks: consecutive row blocks of the ``(Q, C)`` distances, smaller is nearer
            (``[distances]`` for one block); blocks let callers bound memory for large ``Q``.
        true_codes: ``Q`` codes.
        candidate_codes: ``C`` distinct codes, the columns.
        prefix_levels: prefix lengths to score.
    """
    if not true_codes:
        raise ValueError("retrieval metrics need at least one query")
    column = {code: i for i, code in enumerate(candidate_codes)}
    if len(column) != len(candidate_codes):
        raise ValueError("candidate_codes contains duplicates, so ranks would be ambiguous")
    true_index = torch.tensor([column.get(code, -1) for code in true_codes])

    prefixes = {
        digits: _prefix_ids(candidate_codes, true_codes, digits) for digits in prefix_levels
    }
    ranks, start = [], 0
    hits: dict[int, list[Tensor]] = {digits: [] for digits in prefix_levels}
    for distances in distance_blocks:
        rows = slice(start, start + distances.shape[0])
        block_index = true_index[rows].to(distances.device)
        ranks.append(rank_of_true(distances, block_index).cpu())
        # Every candidate tied at the smallest distance must share the prefix: a query with no
        # signal (all distances equal) hits only where every candidate would.
        nearest = (distances == distances.min(dim=1, keepdim=True).values).cpu()
        for digits, (candidate_prefix, true_prefix) in prefixes.items():
            wrong = candidate_prefix.unsqueeze(0) != true_prefix[rows].unsqueeze(1)
            hits[digits].append(~(nearest & wrong).any(dim=1))
        start += distances.shape[0]
    if start != len(true_codes):
        raise ValueError(f"distances have {start} rows for {len(true_codes)} true codes")
    rank = torch.cat(ranks).numpy()

    found = rank > 0
    metrics = {
        "top1": float(np.mean(rank == 1)),
        "top5": float(np.mean(found & (rank <= 5))),
        "mrr": float(np.mean(np.where(found, 1.0 / np.maximum(rank, 1), 0.0))),
    }
    for digits in prefix_levels:
        metrics[f"prefix{digits}_accuracy"] = float(torch.cat(hits[digits]).float().mean())
    return metrics


def _prefix_ids(
    candidate_codes: Sequence[str], true_codes: Sequence[str], digits: int
) -> tuple[Tensor, Tensor]:
    """``(C,)`` and ``(Q,)`` integer ids of the candidates' and true codes' ``code_prefix``."""
    ids: dict[str, int] = {}
    candidate = [ids.setdefault(code_prefix(code, digits), len(ids)) for code in candidate_codes]
    true = [ids.setdefault(code_prefix(code, digits), len(ids)) for code in true_codes]
    return torch.tensor(candidate), torch.tensor(true)


@torch.no_grad()
def retrieval_metrics(
    query_embeddings: Tensor,
    code_embeddings: Tensor,
    true_codes: list[str],
    candidate_codes: list[str],
    curvature: float,
    prefix_levels: Sequence[int] = (2, 3, 4),
    chunk_size: int = QUERY_CHUNK_SIZE,
) -> dict[str, float]:
    """Rank candidates by Lorentz distance to each query and score the true code's rank.

    The keys and their meaning are those of ``ranking_metrics``.

    Args:
        query_embeddings: ``(Q, D + 1)`` points.
        code_embeddings: ``(C, D + 1)`` points.
        true_codes: ``Q`` codes.
        candidate_codes: ``C`` distinct codes, rows of ``code_embeddings``.
        curvature: ``c > 0``.
        prefix_levels: prefix lengths to score.
        chunk_size: queries per block of ``(chunk_size, C)`` distances.
    """
    candidates = code_embeddings.float()
    # Lazy, so only one block of distances is alive at a time.
    blocks = (
        pairwise_distance(
            query_embeddings[start : start + chunk_size].to(candidates.device).float(),
            candidates,
            curvature,
        )
        for start in range(0, len(true_codes), chunk_size)
    )
    return ranking_metrics(blocks, true_codes, candidate_codes, prefix_levels)
