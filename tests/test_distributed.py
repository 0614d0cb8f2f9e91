"""Data-parallel pieces on a real torch.distributed process group: 2 CPU processes with gloo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from naics_mlflow.distributed import (
    another_rank_ended_in_one_line,
    is_global_zero,
    mean_over_ranks,
    rank_zero_answer,
)
from naics_mlflow.model.lorentz import expmap0
from naics_mlflow.model.loss import batch_contrastive_loss

WORLD, DIM, CODES = 2, 5, 12
CURVATURE, TEMPERATURE = 1.0, 0.5
# Each rank's batch: its unique codes (rank 1 holds fewer, so the gathered pool is padded; codes 5
# and 6 are on both ranks) and its anchors and positives as indices into them.
RANK_ROWS = (torch.tensor([0, 1, 2, 3, 4, 5, 6]), torch.tensor([5, 6, 7, 8, 9]))
RANK_ANCHORS = (torch.tensor([0, 2, 4]), torch.tensor([0, 1, 3]))
RANK_POSITIVES = (torch.tensor([1, 3, 5]), torch.tensor([2, 4, 1]))
POSITIVE_PAIRS = torch.rand(CODES, CODES, generator=torch.Generator().manual_seed(3)) < 0.2
CLUSTERS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])


def _rank_embeddings(rank: int) -> torch.Tensor:
    """Rank ``rank``'s code embeddings, a fresh leaf that collects its gradient."""
    generator = torch.Generator().manual_seed(10 + rank)
    tangent = torch.randn(len(RANK_ROWS[rank]), DIM, generator=generator, dtype=torch.float64)
    return expmap0(tangent, CURVATURE).requires_grad_(True)


def _loss(embeddings, rows, anchor, positive, hard_negative_k, clustered) -> torch.Tensor:
    return batch_contrastive_loss(
        embeddings,
        rows,
        anchor,
        positive,
        CURVATURE,
        TEMPERATURE,
        POSITIVE_PAIRS,
        CLUSTERS if clustered else None,
        hard_negative_k,
    ).loss


def _rank_main(rank: int, init_file: str, settings: tuple, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        batch = (RANK_ROWS[rank], RANK_ANCHORS[rank], RANK_POSITIVES[rank])
        embeddings = _rank_embeddings(rank)
        loss = _loss(embeddings, *batch, *settings)
        loss.backward()
        # Only rank 1's loss is kept: whatever gradient reaches rank 0 crossed processes.
        from_rank_1 = _rank_embeddings(rank)
        (_loss(from_rank_1, *batch, *settings) * rank).backward()
        expert_use = mean_over_ranks(torch.tensor([float(rank), 1.0 - rank]))
        torch.save(
            {
                "loss": loss.detach(),
                "grad": embeddings.grad,
                "grad_from_rank_1": from_rank_1.grad,
                "expert_use": expert_use,
            },
            Path(out) / f"rank{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # torch 2.13 can abort in a C++ destructor as a gloo process exits ("terminate called without
    # an active exception", after Python has finished); the results are saved, so skip that.
    os._exit(0)


@pytest.mark.parametrize(
    ("hard_negative_k", "clustered"), [(None, False), (5, False), (None, True), (4, True)]
)
def test_the_gathered_pool_matches_one_process_on_the_concatenated_batch(
    tmp_path, hard_negative_k, clustered
):
    """The project's contrastive loss on 2 ranks against 1 process holding both batches: the same
    masking, false-negative clusters and hard negatives act on the same pool."""
    settings = (hard_negative_k, clustered)
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), settings, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]

    own = [_rank_embeddings(rank) for rank in range(WORLD)]
    offset = len(RANK_ROWS[0])
    single_loss = _loss(
        torch.cat(own),
        torch.cat(RANK_ROWS),
        torch.cat([RANK_ANCHORS[0], RANK_ANCHORS[1] + offset]),
        torch.cat([RANK_POSITIVES[0], RANK_POSITIVES[1] + offset]),
        *settings,
    )
    single_loss.backward()

    # DDP averages the ranks' gradients, and each rank's loss is the mean over its own anchors,
    # so the mean of the rank losses and gradients must equal one process on the whole batch.
    torch.testing.assert_close(
        torch.stack([r["loss"] for r in ranks]).mean(), single_loss.detach(), atol=1e-10, rtol=0
    )
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["grad"] / WORLD, own[rank].grad, atol=1e-10, rtol=0)
    # Rank 0's codes are in rank 1's pool, so rank 1's loss trains them.
    assert ranks[0]["grad_from_rank_1"].abs().sum() > 0
    for result in ranks:
        torch.testing.assert_close(result["expert_use"], torch.tensor([0.5, 0.5]))


def test_clusters_and_hard_negatives_change_the_loss():
    """The parameter rows above would pass with settings that did nothing: they must not."""
    batch = (RANK_ROWS[0], RANK_ANCHORS[0], RANK_POSITIVES[0])
    plain = _loss(_rank_embeddings(0), *batch, None, False).item()
    assert _loss(_rank_embeddings(0), *batch, None, True).item() != pytest.approx(plain)
    assert _loss(_rank_embeddings(0), *batch, 2, False).item() != pytest.approx(plain)


_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


@pytest.mark.parametrize(
    ("environment", "rank_zero"),
    [
        ({}, True),  # the process a user started
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # started by Lightning's launcher ...
        ({"LOCAL_RANK": "1", "SLURM_PROCID": "0"}, False),  # ... inside a SLURM job
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # the first process of the second node
        ({"SLURM_PROCID": "2"}, False),  # an srun task
    ],
)
def test_rank_zero_is_known_from_the_launchers_environment(monkeypatch, environment, rank_zero):
    for variable in _RANK_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    assert is_global_zero() is rank_zero


def test_other_ranks_take_rank_zeros_answer(monkeypatch):
    for variable in _RANK_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    # Set first, so that the answer rank 0 leaves in the environment goes when the test ends.
    monkeypatch.setenv("NAICS_EMBEDDER_RANK_ZERO_CHECKPOINT", "null")
    assert rank_zero_answer("checkpoint", lambda: {"path": "a.ckpt"}) == {"path": "a.ckpt"}
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning starts, with rank 0's environment
    assert rank_zero_answer("checkpoint", lambda: {"path": "other.ckpt"}) == {"path": "a.ckpt"}


def test_a_fit_s_other_errors_keep_their_own_traceback():
    """Only gloo's word for a rank gone becomes the one line (tests/test_scale_out.py)."""
    with pytest.raises(RuntimeError) as raised, another_rank_ended_in_one_line("01_stage"):
        raise RuntimeError("a step that breaks")
    assert type(raised.value) is RuntimeError and str(raised.value) == "a step that breaks"
