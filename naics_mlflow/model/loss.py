"""Hyperbolic InfoNCE over a candidate pool with its negative masks, and the hierarchy terms.

``curvature`` is ``loss.curvature``, ``c > 0`` for sectional curvature ``-c`` (see
``naics_mlflow.model.lorentz``). The contrastive terms shape neighbourhoods; the hierarchy terms
(:func:`distortion_loss`, :func:`neighbourhood_loss`, :func:`depth_loss`) give distances the
tree's metric, over the pairs of codes a batch already holds.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from naics_mlflow.distributed import gather_pool_across_ranks
from naics_mlflow.model.lorentz import distance, distance_to_origin, pairwise_distance


def pool_negative_mask(
    anchor_rows: Tensor,
    positive_rows: Tensor,
    pool_rows: Tensor,
    positive_pairs: Tensor | None = None,
    code_clusters: Tensor | None = None,
) -> Tensor:
    """(B, M) bool: True where pool member ``m`` may act as a negative for anchor ``i``.

    It may not when it is padding (row -1), anchor ``i`` itself, anchor ``i``'s positive, any
    positive of anchor ``i`` in this curriculum, or, with clusters, a code in anchor ``i``'s
    cluster (a likely false negative).

    Args:
        anchor_rows: ``(B,)`` long code rows of the anchors.
        positive_rows: ``(B,)`` long code rows of their positives.
        pool_rows: ``(M,)`` long code rows of the pool, -1 for padding.
        positive_pairs: ``(N, N)`` bool, ``[a, j]`` True when code j is a positive of anchor a;
            None masks only the anchor's own positive.
        code_clusters: ``(N,)`` long cluster id of every code, or None.
    """
    rows = pool_rows.unsqueeze(0)
    valid = (rows >= 0) & (rows != anchor_rows.unsqueeze(1)) & (rows != positive_rows.unsqueeze(1))
    known_rows = pool_rows.clamp(min=0).unsqueeze(0)
    if positive_pairs is not None:
        valid &= ~positive_pairs[anchor_rows.unsqueeze(1), known_rows]
    if code_clusters is not None:
        valid &= code_clusters[known_rows] != code_clusters[anchor_rows].unsqueeze(1)
    return valid


def pool_infonce(
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    pool_valid: Tensor,
    curvature: float,
    temperature: float,
    hard_negative_k: int | None = None,
) -> Tensor:
    """InfoNCE with logits ``-distance / temperature``: each anchor's positive against the
    members of a candidate pool that ``pool_valid`` allows it.

    The one contrastive loss of the project: training contrasts each anchor with the codes of its
    batch (on several processes, of every rank's batch), the queries with the batch's six-digit
    codes, and ``val_loss`` each validation pair with its fixed negatives, all through this. Only
    the ``hard_negative_k`` nearest valid pool members count when it is set; the selection itself
    carries no gradient, the distances to what it keeps do. Masked members get logit ``-inf``;
    the positive is always present, so every row's softmax stays finite. Pool members must hold
    finite coordinates, masked or not, since their distances are computed before masking.

    Args:
        anchor: ``(B, D + 1)`` points.
        positive: ``(B, D + 1)`` points, the positive of each anchor.
        pool: ``(M, D + 1)`` points.
        pool_valid: ``(B, M)`` bool, from :func:`pool_negative_mask`; an anchor's positive must
            be False in its row if it is a pool member, or it would also count as a negative.
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


class BatchContrastive(NamedTuple):
    loss: Tensor  # scalar
    false_negative_fraction: Tensor | None  # scalar share of valid negatives the clusters mask
    pool_size: int  # codes every anchor was contrasted with, padding included


def batch_contrastive_loss(
    embeddings: Tensor,
    rows: Tensor,
    anchor: Tensor,
    positive: Tensor,
    curvature: float,
    temperature: float,
    positive_pairs: Tensor | None = None,
    code_clusters: Tensor | None = None,
    hard_negative_k: int | None = None,
) -> BatchContrastive:
    """A batch's contrastive loss: each anchor's positive against the pool of the batch's codes,
    on several processes every rank's (gathered, so that the gradient reaches the rank each one
    came from), masked by :func:`pool_negative_mask`.

    The pool holds each anchor's sampled negatives, the other anchors and their positives. One
    process and several follow the same rules; the mean over ranks of their losses is the loss of
    one process on the concatenated batches.

    Args:
        embeddings: ``(U, D + 1)`` points, the batch's unique codes.
        rows: ``(U,)`` long code rows of ``embeddings``.
        anchor: ``(B,)`` long, each anchor's index into ``embeddings``.
        positive: ``(B,)`` long, its positive's index.
        curvature: ``c > 0``.
        temperature: softmax temperature ``> 0``.
        positive_pairs, code_clusters: as in :func:`pool_negative_mask`.
        hard_negative_k: as in :func:`pool_infonce`.
    """
    pool, pool_rows = gather_pool_across_ranks(embeddings, rows)
    anchor_rows, positive_rows = rows[anchor], rows[positive]
    valid = pool_negative_mask(anchor_rows, positive_rows, pool_rows, positive_pairs)
    false_negative_fraction = None
    if code_clusters is not None:
        outside_cluster = pool_negative_mask(
            anchor_rows, positive_rows, pool_rows, positive_pairs, code_clusters
        )
        false_negative_fraction = (valid & ~outside_cluster).sum() / valid.sum().clamp(min=1)
        valid = outside_cluster
    loss = pool_infonce(
        embeddings[anchor],
        embeddings[positive],
        pool,
        valid,
        curvature,
        temperature,
        hard_negative_k,
    )
    return BatchContrastive(loss, false_negative_fraction, len(pool))


def kmeans_clusters(embeddings_tangent: Tensor, num_clusters: int, seed: int) -> Tensor:
    """k-means (scikit-learn's, k-means++ seeding, seeded) on tangent vectors.

    Pass ``logmap0`` of the hyperboloid points. The tangent space at the origin is a Euclidean
    vector space, so means and Euclidean distances are well defined there, and ``logmap0`` keeps
    each point's hyperbolic radius and direction; on the hyperboloid itself a centroid would need
    an iterative Fréchet mean. Runs on the CPU in float64, so the result is the same whatever
    device the embeddings are on.

    Args:
        embeddings_tangent: ``(N, D)``.
        num_clusters: number of clusters, at most ``N``.
        seed: seeds the k-means++ draws.

    Returns:
        ``(N,)`` long cluster ids on the input's device.
    """
    points = embeddings_tangent.detach().double().cpu().numpy()
    if not 1 <= num_clusters <= len(points):
        raise ValueError(
            f"num_clusters must be between 1 and the number of points ({len(points)}), "
            f"got {num_clusters}"
        )
    # Imported here: scikit-learn takes 0.2 s to import, and only stages that cluster need it.
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=num_clusters, n_init=1, random_state=seed).fit_predict(points)
    return torch.from_numpy(labels.astype("int64")).to(embeddings_tangent.device)


def distortion_loss(hyperbolic: Tensor, tree_distance: Tensor, scale: float) -> Tensor:
    """Mean of ``(d_H / (scale * d_tree) - 1) ** 2`` over the distinct pairs: the relative error
    of each hyperbolic distance as a multiple of the tree distance.

    Relative rather than absolute, so that the many far pairs (codes of different sectors are 6-10
    edges apart) do not drown the few near ones. A code's pair with itself is masked by
    arithmetic, not selected out: gathering the pairs of distinct codes of all 2,125 (4.5M) and
    scattering their gradient back took longer than the rest of the term.

    Args:
        hyperbolic: ``(R, U)`` hyperbolic distances from ``R`` of the batch's codes (all of
            them, or a sample: ``loss.hierarchy_rows``) to all ``U``
            (:func:`~naics_mlflow.model.lorentz.pairwise_distance`).
        tree_distance: ``(R, U)`` tree distances, 0 only where a code meets itself.
        scale: the hyperbolic length of one tree edge.

    Returns:
        Scalar; 0 when the batch has fewer than two codes.
    """
    pairs = tree_distance > 0
    target = torch.where(pairs, scale * tree_distance.float(), 1.0)
    error = torch.where(pairs, hyperbolic / target - 1.0, 0.0)
    return error.square().sum() / pairs.sum().clamp(min=1)


def neighbourhood_loss(
    hyperbolic: Tensor, tree_distance: Tensor, scale: float, sharpness: float
) -> Tensor:
    """Cross-entropy from the tree's neighbourhood of each code to the embedding's.

    Over the other codes ``j`` of the batch, the tree gives code ``i`` the distribution
    ``p_ij ~ exp(-sharpness * d_tree)`` and the embedding ``q_ij ~ exp(-sharpness * d_H / scale)``;
    both agree when ``d_H = scale * d_tree`` near ``i``, which is what the distortion term asks
    globally. A sharpness of 2 puts nearly all of ``p`` on the parent, children and siblings, so
    this term orders each code's nearest few codes (what NDCG scores), which the distortion term,
    averaged over every pair, leaves loose.

    Args:
        hyperbolic, tree_distance, scale: as in :func:`distortion_loss`, ``(R, U)``.
        sharpness: how fast the tree's weight falls per edge.

    Returns:
        Scalar mean over the ``R`` codes; 0 when the batch has fewer than two codes.
    """
    if hyperbolic.shape[1] < 2:
        return hyperbolic.sum() * 0.0
    itself = tree_distance == 0
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
    radius = distance_to_origin(embeddings, curvature)
    # Masked rather than indexed by ``has_parent``: a boolean index reads the mask back, on a GPU
    # a wait for everything queued before it.
    hinge = F.relu(radius[parent.clamp(min=0)] - radius + margin)
    return torch.where(has_parent, hinge, 0.0).sum() / has_parent.sum().clamp(min=1)
