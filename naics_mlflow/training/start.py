"""How a chain and each of its stages start: reuse a finished run, continue an interrupted one,
or train afresh from the previous stage, a ``--from-checkpoint`` file or the initial weights.

One decision, :func:`decide_chain_start`, over plain data: the stages and what the tracking store
holds about the chain's hash (read in one place, ``training.chain.read_store_state``). Rank 0
takes it and hands it to the other processes as JSON (``distributed.rank_zero_answer``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from naics_mlflow.errors import UserError

# What a run that stopped before its end reads: RUNNING when its process died, KILLED after
# Ctrl-C, FAILED after an error.
INTERRUPTED_STATUSES = ("RUNNING", "FAILED", "KILLED")


@dataclass(frozen=True)
class EarlierRun:
    """What the store holds about an earlier run of a stage in a chain with the same hash."""

    run_id: str
    status: str  # its MLflow status
    best_checkpoint_logged: bool = False  # the file its best_checkpoint tag names is in ckpt/
    last_checkpoint: str | None = None  # its ckpt/last.ckpt, downloaded, when logged and whole


@dataclass(frozen=True)
class StoreState:
    """What the store holds about a chain hash."""

    parent_run_id: str | None  # the latest parent run of the chain
    stage_runs: Mapping[str, Sequence[EarlierRun]]  # a stage's earlier runs, newest first
    # (run id, pid) of a run of the chain that a live process on this machine is writing now
    written_now: tuple[str, int] | None = None
    parent_holds_model: bool = False  # the latest parent run logged the chain's model, whole


class ChainInUseError(UserError):
    """The chain is being trained now by another process, whose runs a resume would take over."""


class How(StrEnum):
    REUSE = "reuse"  # a finished run's best checkpoint; nothing trains
    RESUME = "resume"  # an interrupted run's last.ckpt, with optimiser, schedule and epoch
    AFTER_PREVIOUS = "after_previous"  # a new run from the previous stage's best checkpoint
    FROM_CHECKPOINT = "from_checkpoint"  # the first stage's new run, from --from-checkpoint
    FROM_SCRATCH = "from_scratch"  # the first stage's new run, from the initial weights


@dataclass(frozen=True)
class StageStart:
    how: How
    run_id: str | None = None  # the run reused or resumed
    checkpoint: str | None = None  # the last.ckpt resumed, or the --from-checkpoint file


@dataclass(frozen=True)
class ChainStart:
    parent_run_id: str | None  # an earlier parent run to continue in; None opens a new one
    stages: tuple[StageStart, ...]
    parent_holds_model: bool = False  # the earlier parent run logged the chain's model, whole

    @property
    def logs_final_model(self) -> bool:
        """Whether the parent run gets the chain's model: an earlier parent run whose stages are
        all reused holds it already, unless the command that trained them stopped before it had
        logged the model (Ctrl-C, a kill or a lost store as it embedded the codes or uploaded)."""
        if self.parent_run_id is None or not self.parent_holds_model:
            return True
        return any(stage.how is not How.REUSE for stage in self.stages)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, answer: Mapping[str, Any]) -> ChainStart:
        stages = tuple(
            StageStart(How(stage["how"]), stage["run_id"], stage["checkpoint"])
            for stage in answer["stages"]
        )
        return cls(answer["parent_run_id"], stages, answer["parent_holds_model"])


def decide_chain_start(
    stages: Sequence[str],
    state: StoreState,
    *,
    resume: bool,
    init_checkpoint: str | None,
    under_mlflow_run: bool,
) -> ChainStart:
    """How the chain of ``stages`` (in order) starts, given the store's ``state`` for its hash.

    With ``resume``, a stage reuses its newest finished run that logged its best checkpoint, else
    continues its newest interrupted run whose ``last.ckpt`` is whole, else trains afresh; the
    chain continues in its latest parent run, unless ``mlflow run`` opened the run this process
    must use. Without ``resume`` every stage trains afresh in a new parent run. A resume is
    refused while a live process on this machine is writing one of the chain's runs.
    """
    if resume:
        refuse_if_written_now(state.written_now)
    parent_run_id = state.parent_run_id if resume and not under_mlflow_run else None
    starts = []
    for position, name in enumerate(stages):
        earlier = state.stage_runs.get(name, ()) if resume else ()
        starts.append(_earlier_run_start(earlier) or _fresh_start(position, init_checkpoint))
    holds_model = parent_run_id is not None and state.parent_holds_model
    return ChainStart(parent_run_id, tuple(starts), holds_model)


def refuse_if_written_now(written_now: tuple[str, int] | None) -> None:
    """Raise :class:`ChainInUseError` when a live process is writing a run of the chain:
    ``written_now`` is its (run id, pid), or None."""
    if written_now is None:
        return
    run_id, pid = written_now
    raise ChainInUseError(
        f"this chain is being trained now by process {pid} on this machine (run {run_id}); "
        f"wait for it to finish, stop it (Ctrl-C there, or kill {pid}) and run this again "
        "to resume, or pass --resume false to train another copy"
    )


def _earlier_run_start(earlier: Sequence[EarlierRun]) -> StageStart | None:
    """A finished run to reuse, else an interrupted run to continue, else None.

    A finished run comes first even when an interrupted one is newer: its stage is done.
    """
    for run in earlier:
        if run.status == "FINISHED" and run.best_checkpoint_logged:
            return StageStart(How.REUSE, run_id=run.run_id)
    for run in earlier:
        # A last.ckpt cut short by a kill during its upload is not whole: an older run may do.
        if run.status in INTERRUPTED_STATUSES and run.last_checkpoint is not None:
            return StageStart(How.RESUME, run_id=run.run_id, checkpoint=run.last_checkpoint)
    return None


def _fresh_start(position: int, init_checkpoint: str | None) -> StageStart:
    if position > 0:
        return StageStart(How.AFTER_PREVIOUS)
    if init_checkpoint is not None:
        return StageStart(How.FROM_CHECKPOINT, checkpoint=init_checkpoint)
    return StageStart(How.FROM_SCRATCH)
