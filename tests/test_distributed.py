"""Data-parallel pieces on a real torch.distributed process group: 2 CPU processes with gloo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from naics_mlflow.distributed import (
    gather_across_ranks,
    is_global_zero,
    mean_over_ranks,
    rank_zero_answer,
    world_size,
)
from naics_mlflow.model.lorentz import expmap0
from naics_mlflow.model.loss import pool_negative_mask, pooled_infonce

WORLD = 2
ANCHORS_PER_RANK, NEGATIVES, DIM, CODES = 3, 4, 5, 12
CURVATURE, TEMPERATURE = 1.0, 0.5


def _global_batch() -> dict[str, torch.Tensor]:
    """The batches of both ranks, stacked: rank r owns rows ``r * B : (r + 1) * B``."""
    generator = torch.Generator().manual_seed(7)
    anchors = WORLD * ANCHORS_PER_RANK

    def points(*shape: int) -> torch.Tensor:
        tangent = torch.randn(*shape, DIM, generator=generator, dtype=torch.float64)
        return expmap0(tangent, CURVATURE)

    negative_rows = torch.randint(0, CODES, (anchors, NEGATIVES), generator=generator)
    negative_rows[0, -1] = -1  # padding
    return {
        "anchor": points(anchors),
        "positive": points(anchors),
        "negatives": points(anchors, NEGATIVES),
        "anchor_rows": torch.randint(0, CODES, (anchors,), generator=generator),
        "positive_rows": torch.randint(0, CODES, (anchors,), generator=generator),
        "negative_rows": negative_rows,
        "positive_pairs": torch.rand(CODES, CODES, generator=generator) < 0.2,
    }


def _pooled_loss(batch: dict[str, torch.Tensor], hard_negative_k: int | None) -> torch.Tensor:
    """The global-negatives loss as ``NaicsEmbedder`` computes it on one rank."""
    local_pool = torch.cat([batch["positive"], batch["negatives"].flatten(0, 1)])
    pool = gather_across_ranks(local_pool)
    pool_rows = gather_across_ranks(
        torch.cat([batch["positive_rows"], batch["negative_rows"].flatten()])
    )
    assert pool.shape[0] == world_size() * local_pool.shape[0]
    valid = pool_negative_mask(
        batch["anchor_rows"], batch["positive_rows"], pool_rows, batch["positive_pairs"]
    )
    return pooled_infonce(
        batch["anchor"], batch["positive"], pool, valid, CURVATURE, TEMPERATURE, hard_negative_k
    )


_DIFFERENTIABLE = ("anchor", "positive", "negatives")


def _leaves(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {
        key: value[rows].clone().requires_grad_(key in _DIFFERENTIABLE)
        if key != "positive_pairs"
        else value
        for key, value in batch.items()
    }


def _rank_main(rank: int, init_file: str, hard_negative_k: int | None, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * ANCHORS_PER_RANK, (rank + 1) * ANCHORS_PER_RANK)
        batch = _leaves(_global_batch(), rows)
        loss = _pooled_loss(batch, hard_negative_k)
        loss.backward()
        # Only rank 1's loss is kept: whatever gradient reaches rank 0 crossed processes.
        from_rank_1 = _leaves(_global_batch(), rows)
        (_pooled_loss(from_rank_1, hard_negative_k) * rank).backward()
        expert_use = mean_over_ranks(torch.tensor([float(rank), 1.0 - rank]))
        torch.save(
            {
                "loss": loss.detach(),
                "grads": {key: batch[key].grad for key in _DIFFERENTIABLE},
                "grads_from_rank_1": {key: from_rank_1[key].grad for key in _DIFFERENTIABLE},
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


@pytest.mark.parametrize("hard_negative_k", [None, 5])
def test_global_negatives_match_one_process_on_the_concatenated_batch(tmp_path, hard_negative_k):
    mp.spawn(
        _rank_main,
        args=(str(tmp_path / "init"), hard_negative_k, str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]

    whole = _leaves(_global_batch(), slice(None))
    single_loss = _pooled_loss(whole, hard_negative_k)
    single_loss.backward()

    # DDP averages the ranks' gradients, and each rank's loss is the mean over its own anchors,
    # so the mean of the rank losses and gradients must equal one process on the whole batch.
    torch.testing.assert_close(
        torch.stack([r["loss"] for r in ranks]).mean(), single_loss.detach(), atol=1e-5, rtol=0
    )
    for key in _DIFFERENTIABLE:
        for rank, result in enumerate(ranks):
            own = slice(rank * ANCHORS_PER_RANK, (rank + 1) * ANCHORS_PER_RANK)
            torch.testing.assert_close(
                result["grads"][key] / WORLD, whole[key].grad[own], atol=1e-5, rtol=0
            )
    # Rank 0's positives and negatives are in rank 1's pool, so rank 1's loss trains them.
    for key in ("positive", "negatives"):
        assert ranks[0]["grads_from_rank_1"][key].abs().sum() > 0
    assert ranks[0]["grads_from_rank_1"]["anchor"].abs().sum() == 0
    for result in ranks:
        torch.testing.assert_close(result["expert_use"], torch.tensor([0.5, 0.5]))


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
