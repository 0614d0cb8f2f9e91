"""What changes when training runs as several processes (Lightning's DDP on torch.distributed).

Lightning starts the other processes of a node by running the same command again; every process
then runs the same code in step. Rank 0 alone talks to MLflow and writes checkpoints. Where the
other ranks need an answer only the tracking store has (which stages of a chain are finished,
which checkpoint resumes an interrupted one), rank 0 decides before training starts and passes
its answer on in the environment, which the processes Lightning starts inherit.

torch is imported inside the functions that use it: the command line asks for the rank before
anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from naics_mlflow.errors import UserError

if TYPE_CHECKING:
    import torch

_RANK_ZERO_ANSWER = "NAICS_EMBEDDER_RANK_ZERO_{}"
# How gloo (torch.distributed on CPUs) says the other end of a collective has gone: the process
# of that rank has ended.
PEER_CONNECTION_CLOSED = "Connection closed by peer"
# Process ids of the ranks this process started, as :func:`note_launched_ranks` found them:
# Lightning's launcher starts them at a chain's first fit, and its later fits find them running.
_launched_ranks: list[int] = []


def is_global_zero() -> bool:
    """Whether this process is rank 0, known before any Trainer exists.

    ``RANK`` is set by torchrun. Lightning's own launcher sets ``LOCAL_RANK`` (and
    ``NODE_RANK``) in the processes it starts, which also inherit any ``SLURM_PROCID`` of the
    job, so those come before it; srun sets ``SLURM_PROCID`` per task. A process with none of
    them is the one a user started: rank 0.
    """
    environ = os.environ
    if "RANK" in environ:
        return int(environ["RANK"]) == 0
    if "LOCAL_RANK" in environ or "NODE_RANK" in environ:
        return int(environ.get("NODE_RANK", 0)) == 0 and int(environ.get("LOCAL_RANK", 0)) == 0
    return int(environ.get("SLURM_PROCID", 0)) == 0


def rank_zero_answer(question: str, decide: Callable[[], Any]) -> Any:
    """Rank 0's answer to ``question`` (JSON-serialisable), the same on every rank.

    Rank 0 calls ``decide`` and leaves the answer in its environment, where the processes
    Lightning starts later find it. A rank started some other way (on another node, say) has no
    such answer and calls ``decide`` itself, which must then only read the tracking store.
    """
    variable = _RANK_ZERO_ANSWER.format(question.upper())
    if not is_global_zero() and variable in os.environ:
        return json.loads(os.environ[variable])
    answer = decide()
    if is_global_zero():
        os.environ[variable] = json.dumps(answer)
    return answer


class RankEndedError(UserError):
    """Another process of a data-parallel fit ended, so this one cannot go on."""


@contextlib.contextmanager
def another_rank_ended_in_one_line(stage: str) -> Iterator[None]:
    """Raise :class:`RankEndedError` where the fit inside stops because another rank's process
    ended: that process has printed its own error (out of memory, say), and gloo's traceback
    of the broken connection here, pages long, would bury it. On GPUs NCCL does not notice a
    rank gone; Lightning's launcher kills the others instead."""
    try:
        yield
    except RuntimeError as exc:
        if PEER_CONNECTION_CLOSED not in str(exc):
            raise
        raise RankEndedError(
            f"stage {stage} stopped: another of its training processes ended, and this one "
            "cannot go on without it; that process's own error says why"
        ) from exc


def world_size() -> int:
    """Processes training together: 1 outside a process group."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order: ``(B, ...) -> (W * B, ...)``.

    Gradients flow back through it: the backward pass sums each rank's gradient for a slice into
    the rank that owns it, so a loss computed on the gathered tensor trains the encoder of every
    rank. All ranks must pass the same shape.
    """
    import torch
    import torch.distributed.nn.functional as distributed_functional

    if world_size() == 1:
        return tensor
    # torch marks it deprecated in favour of an autograd all-gather in a private module; this is
    # the public one, and its warning would repeat at every step.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(distributed_functional.all_gather(tensor))


def gather_pool_across_ranks(
    points: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``points`` ``(U, D)`` and their code ``rows`` ``(U,)``, concatenated in rank
    order; the identity on one process.

    Ranks may hold different numbers of points (each batch's unique codes), so each pads to the
    largest with copies of its first point, finite as the loss needs, under row -1, which every
    negative mask treats as padding. Gradients flow back as in :func:`gather_across_ranks`.
    """
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return points, rows
    largest = torch.tensor([len(rows)], device=rows.device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    padding = int(largest) - len(rows)
    points = torch.cat([points, points[:1].expand(padding, *points.shape[1:])])
    rows = torch.cat([rows, rows.new_full((padding,), -1)])
    return gather_across_ranks(points), gather_across_ranks(rows)


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks, without gradient (for statistics such as expert use)."""
    import torch.distributed as dist

    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def note_launched_ranks() -> None:
    """Record the ranks of the process group that this process started: those on this machine
    whose parent it is (none where ``torchrun`` or a cluster started them). A collective: every
    rank calls it, at each fit's start."""
    import torch.distributed as dist

    if world_size() == 1:
        return
    ranks: list[tuple[str, int, int] | None] = [None] * world_size()
    dist.all_gather_object(ranks, (socket.gethostname(), os.getpid(), os.getppid()))
    _launched_ranks[:] = [
        pid for host, pid, parent in ranks if host == socket.gethostname() and parent == os.getpid()
    ]


def stop_launched_ranks() -> None:
    """Kill the ranks this process started, when it stops on an error or a signal.

    They would otherwise wait for it in their next collective and then die on its closed
    connections, each with a gloo traceback ('Connection closed by peer ... a remote worker
    crashing') printed after this process's own message, as if they had crashed. They own no run
    and write no checkpoint.
    """
    for pid in _launched_ranks:
        with contextlib.suppress(ProcessLookupError):  # it has ended on its own
            os.kill(pid, signal.SIGKILL)
    _launched_ranks.clear()
