"""Hyperbolic InfoNCE with its negative-selection helpers, and the hierarchy terms.

``curvature`` is ``loss.curvature``, ``c > 0`` for sectional curvature ``-c`` (see
``naics_mlflow.model.lorentz``). The contrastive terms shape neighbourhoods; the hierarchy terms
(:func:`distortion_loss`, :func:`neighbourhood_loss`, :func:`depth_loss`) give distances the
tree's metric, over the pairs of codes a batch already holds.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from naics_mlflow.model.lorentz import distance, distance_to_origin, pairwise_distance


def hyperbolic_infonce(
    anchor: Tensor,
    positive: Tensor,
    negatives: Tensor,
    curvature: float,
    temperature: float,
    negative_valid: Tensor | None = None,
    in_batch_negatives: Tensor | None = None,
) -> Tensor:
    """InfoNCE with logits ``-distance / temperature`` and the positive as the target class.

    Each anchor's positive competes with the anchor's own sampled negatives and, where
    ``in_batch_negatives`` allows, with the other anchors' positives. Excluded candidates get
    logit ``-inf``; the positive is always present, so every row's softmax stays finite. Padded
    negatives must still hold finite coordinates, since their distances are computed before
    masking.

    Args:
        anchor: ``(B, D + 1)`` points.
        positive: ``(B, D + 1)`` points, the positive of each anchor.
        negatives: ``(B, K, D + 1)`` points, each anchor's sampled negatives.
        curvature: ``c > 0``.
        temperature: softmax temperature ``> 0``.
        negative_valid: ``(B, K)`` bool, False for padding and masked false negatives;
            None keeps all.
        in_batch_negatives: ``(B, B)`` bool, True where ``positive[j]`` is a valid negative for
            ``anchor[i]`` (built by ``naics_mlflow.data.datamodule.in_batch_negatives``); None
            uses no in-batch negatives.

    Returns:
        Scalar mean loss over the batch.
    """
    positive_logits = -distance(anchor, positive, curvature).unsqueeze(1) / temperature
    candidate_logits = [-distance(anchor.unsqueeze(1), negatives, curvature) / temperature]
    candidate_masks = [negative_valid]
    if in_batch_negatives is not None:
        candidate_logits.append(-pairwise_distance(anchor, positive, curvature) / temperature)
        candidate_masks.append(in_batch_negatives)
    masked = [
        logits if mask is None else logits.masked_fill(~mask, float("-inf"))
        for logits, mask in zip(candidate_logits, candidate_masks, strict=True)
    ]
    logits = torch.cat([positive_logits, *masked], dim=1)
    target = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits, target)


def candidate_infonce(
    queries: Tensor,
    candidates: Tensor,
    target: Tensor,
    negative_valid: Tensor,
    curvature: float,
    temperature: float,
) -> Tensor:
    """InfoNCE of each query against a shared candidate set: its target candidate is the positive,
    the candidates ``negative_valid`` marks are the negatives, the rest are ignored.

    Args:
        queries: ``(Q, D + 1)`` points.
        candidates: ``(U, D + 1)`` points.
        target: ``(Q,)`` long, the index of each query's positive among the candidates.
        negative_valid: ``(Q, U)`` bool; its value at the target is ignored.
        curvature: ``c > 0``.
        temperature: softmax temperature ``> 0``.

    Returns:
        Scalar mean loss over the queries.
    """
    logits = -pairwise_distance(queries, candidates, curvature) / temperature
    keep = negative_valid.clone()
    keep[torch.arange(len(target), device=target.device), target] = True
    return F.cross_entropy(logits.masked_fill(~keep, float("-inf")), target)


def pool_negative_mask(
    anchor_rows: Tensor, positive_rows: Tensor, pool_rows: Tensor, positive_pairs: Tensor
) -> Tensor:
    """(B, M) bool: True where pool member ``m`` may act as a negative for anchor ``i``.

    It may not when it is padding (row -1), anchor ``i`` itself, anchor ``i``'s positive, or any
    positive of anchor ``i`` in this curriculum: the rule in-batch negatives follow, applied to
    every code of the (global) batch.

    Args:
        anchor_rows: ``(B,)`` long code rows of the anchors.
        positive_rows: ``(B,)`` long code rows of their positives.
        pool_rows: ``(M,)`` long code rows of the pool, -1 for padding.
        positive_pairs: ``(N, N)`` bool, ``[a, j]`` True when code j is a positive of anchor a.
    """
    rows = pool_rows.unsqueeze(0)
    return (
        (rows >= 0)
        & (rows != anchor_rows.unsqueeze(1))
        & (rows != positive_rows.unsqueeze(1))
        & ~positive_pairs[anchor_rows.unsqueeze(1), pool_rows.clamp(min=0).unsqueeze(0)]
    )


def pooled_infonce(
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    pool_valid: Tensor,
    curvature: float,
    temperature: float,
    hard_negative_k: int | None = None,
) -> Tensor:
    """InfoNCE of each anchor's positive against a pool of candidates all anchors share: with
    global negatives, every positive and sampled negative of every rank's batch.

    Only the ``hard_negative_k`` nearest valid pool members count when it is set; None keeps every
    valid one. The selection itself carries no gradient, the distances to what it keeps do.

    Args:
        anchor: ``(B, D + 1)`` points.
        positive: ``(B, D + 1)`` points, the positive of each anchor.
        pool: ``(M, D + 1)`` points.
        pool_valid: ``(B, M)`` bool, from :func:`pool_negative_mask` (and false-negative masks).
        curvature: ``c > 0``.
        temperature: softmax temperature ``> 0``.
        hard_negative_k: how many of the nearest valid pool members to keep, or None.

    Returns:
        Scalar mean loss over the anchors.
    """
    pool_distance = pairwise_distance(anchor, pool, curvature)
    if hard_negative_k is not None and hard_negative_k < pool.shape[0]:
        with torch.no_grad():
            nearest = pool_distance.masked_fill(~pool_valid, float("inf"))
            keep = nearest.topk(hard_negative_k, dim=1, largest=False).indices
        pool_distance, pool_valid = pool_distance.gather(1, keep), pool_valid.gather(1, keep)
    positive_logits = -distance(anchor, positive, curvature).unsqueeze(1) / temperature
    negative_logits = (-pool_distance / temperature).masked_fill(~pool_valid, float("-inf"))
    logits = torch.cat([positive_logits, negative_logits], dim=1)
    target = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits, target)


def false_negative_mask(anchor_clusters: Tensor, negative_clusters: Tensor) -> Tensor:
    """True where a sampled negative shares its anchor's cluster, i.e. is a likely false negative.

    Args:
        anchor_clusters: ``(B,)`` long cluster ids.
        negative_clusters: ``(B, K)`` long cluster ids.

    Returns:
        ``(B, K)`` bool; combine as ``negative_valid & ~false_negative_mask(...)``.
    """
    return negative_clusters == anchor_clusters.unsqueeze(1)


def _kmeans_plus_plus(points: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each new centroid is drawn with probability proportional to its squared
    distance from the nearest centroid chosen so far.

    Args:
        points: ``(N, D)``.

    Returns:
        ``(num_clusters, D)`` initial centroids.
    """
    first = torch.randint(points.shape[0], (1,), generator=generator)
    centroids = [points[first]]
    nearest_sq = (points - centroids[0]).square().sum(dim=1)
    for _ in range(1, num_clusters):
        # All points coincide with a centroid when there are fewer distinct points than
        # clusters; any choice is then as good as another, and multinomial rejects all zeros.
        weights = nearest_sq if nearest_sq.sum() > 0 else torch.ones_like(nearest_sq)
        chosen = torch.multinomial(weights, 1, generator=generator)
        centroids.append(points[chosen])
        nearest_sq = torch.minimum(nearest_sq, (points - points[chosen]).square().sum(dim=1))
    return torch.cat(centroids)


def kmeans_clusters(
    embeddings_tangent: Tensor, num_clusters: int, seed: int, iterations: int = 30
) -> Tensor:
    """Deterministic k-means (k-means++ seeding, Lloyd iterations) on tangent vectors.

    Pass ``logmap0`` of the hyperboloid points. The tangent space at the origin is a Euclidean
    vector space, so means and Euclidean distances are well defined there, and ``logmap0`` keeps
    each point's hyperbolic radius and direction; on the hyperboloid itself a centroid would need
    an iterative Fréchet mean. Runs on the CPU in float32: the problem is small, and this makes
    the result the same whatever device the embeddings are on.

    Args:
        embeddings_tangent: ``(N, D)``.
        num_clusters: number of clusters, at most ``N``.
        seed: seeds the k-means++ draws.
        iterations: maximum number of Lloyd iterations; stops early once assignments settle.

    Returns:
        ``(N,)`` long cluster ids on the input's device.
    """
    points = embeddings_tangent.detach().float().cpu()
    if not 1 <= num_clusters <= points.shape[0]:
        raise ValueError(
            f"num_clusters must be between 1 and the number of points ({points.shape[0]}), "
            f"got {num_clusters}"
        )
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_plus_plus(points, num_clusters, generator)
    assignment = torch.cdist(points, centroids).argmin(dim=1)
    for _ in range(iterations):
        counts = torch.bincount(assignment, minlength=num_clusters).unsqueeze(1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        # An emptied cluster keeps its old centroid rather than dividing by zero.
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        new_assignment = torch.cdist(points, centroids).argmin(dim=1)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
    return assignment.to(embeddings_tangent.device)


@torch.no_grad()
def hardest_negatives(
    anchor: Tensor, negatives: Tensor, valid_mask: Tensor, k: int, curvature: float
) -> tuple[Tensor, Tensor]:
    """Indices of each anchor's ``k`` nearest valid sampled negatives (hard-negative mining).

    Selection only, so no gradient is tracked; gather the returned indices from ``negatives``
    to compute the loss.

    Args:
        anchor: ``(B, D + 1)`` points.
        negatives: ``(B, K, D + 1)`` points.
        valid_mask: ``(B, K)`` bool, False for padding and masked negatives.
        k: number of negatives to keep; ``k >= K`` keeps all of them in their original order.
        curvature: ``c > 0``.

    Returns:
        ``indices`` ``(B, min(k, K))`` long into the K axis, nearest first when ``k < K``, and
        ``valid`` ``(B, min(k, K))`` bool; rows with fewer than ``k`` valid negatives are filled
        with invalid ones, marked False.
    """
    batch, num_negatives = valid_mask.shape
    if k >= num_negatives:
        indices = torch.arange(num_negatives, device=negatives.device).expand(batch, -1)
        return indices, valid_mask
    distances = distance(anchor.unsqueeze(1), negatives, curvature)
    distances = distances.masked_fill(~valid_mask, float("inf"))
    indices = distances.topk(k, dim=1, largest=False).indices
    return indices, valid_mask.gather(1, indices)


def distortion_loss(
    embeddings: Tensor, tree_distance: Tensor, curvature: float, scale: float
) -> Tensor:
    """Mean of ``(d_H / (scale * d_tree) - 1) ** 2`` over the distinct pairs: the relative error
    of each hyperbolic distance as a multiple of the tree distance.

    Relative rather than absolute, so that the many far pairs (codes of different sectors are 6-10
    edges apart) do not drown the few near ones.

    Args:
        embeddings: ``(U, D + 1)`` points.
        tree_distance: ``(U, U)`` tree distances, 0 only on the diagonal.
        curvature: ``c > 0``.
        scale: the hyperbolic length of one tree edge.

    Returns:
        Scalar; 0 when the batch has fewer than two codes.
    """
    pairs = tree_distance > 0
    if not pairs.any():
        return embeddings.sum() * 0.0
    hyperbolic = pairwise_distance(embeddings, embeddings, curvature)[pairs]
    return (hyperbolic / (scale * tree_distance[pairs].float()) - 1.0).square().mean()


def neighbourhood_loss(
    embeddings: Tensor, tree_distance: Tensor, curvature: float, scale: float, sharpness: float
) -> Tensor:
    """Cross-entropy from the tree's neighbourhood of each code to the embedding's.

    Over the other codes ``j`` of the batch, the tree gives code ``i`` the distribution
    ``p_ij ~ exp(-sharpness * d_tree)`` and the embedding ``q_ij ~ exp(-sharpness * d_H / scale)``;
    both agree when ``d_H = scale * d_tree`` near ``i``, which is what the distortion term asks
    globally. A sharpness of 2 puts nearly all of ``p`` on the parent, children and siblings, so
    this term orders each code's nearest few codes (what NDCG scores), which the distortion term,
    averaged over every pair, leaves loose.

    Args:
        embeddings: ``(U, D + 1)`` points.
        tree_distance: ``(U, U)`` tree distances, 0 only on the diagonal.
        curvature: ``c > 0``.
        scale: the hyperbolic length of one tree edge.
        sharpness: how fast the tree's weight falls per edge.

    Returns:
        Scalar mean over the codes; 0 when the batch has fewer than two codes.
    """
    if len(embeddings) < 2:
        return embeddings.sum() * 0.0
    itself = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    hyperbolic = pairwise_distance(embeddings, embeddings, curvature)
    log_q = F.log_softmax((-sharpness / scale * hyperbolic).masked_fill(itself, float("-inf")), 1)
    p = F.softmax((-sharpness * tree_distance.float()).masked_fill(itself, float("-inf")), 1)
    return -(p * log_q.masked_fill(itself, 0.0)).sum(dim=1).mean()


def depth_loss(embeddings: Tensor, parent: Tensor, curvature: float, margin: float) -> Tensor:
    """Mean hinge ``max(0, r(parent) - r(child) + margin)`` over the batch's child-parent pairs,
    with ``r`` the distance to the origin: a parent lies nearer the origin than its children
    (as in HiT's centripetal loss), so depth can be read off the radius.

    Args:
        embeddings: ``(U, D + 1)`` points.
        parent: ``(U,)`` long, the index of each code's parent among ``embeddings``, -1 when it
            is not there.
        curvature: ``c > 0``.
        margin: how much nearer, in hyperbolic distance.

    Returns:
        Scalar; 0 when the batch holds no child with its parent.
    """
    has_parent = parent >= 0
    if not has_parent.any():
        return embeddings.sum() * 0.0
    radius = distance_to_origin(embeddings, curvature)
    return F.relu(radius[parent[has_parent]] - radius[has_parent] + margin).mean()
