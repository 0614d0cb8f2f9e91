"""How a chain and its stages start, one row per situation: the decision is plain data in and
out, so these tables need no store (tests/test_chain.py reads a real one into this data)."""

from __future__ import annotations

import json

import pytest

from naics_mlflow.training.start import (
    ChainInUseError,
    ChainStart,
    EarlierRun,
    How,
    StageStart,
    StoreState,
    decide_chain_start,
)

LAST = "downloads/last.ckpt"
INIT = "init.ckpt"


def finished(run_id: str, best_logged: bool = True) -> EarlierRun:
    return EarlierRun(run_id, "FINISHED", best_checkpoint_logged=best_logged)


def stopped(run_id: str, status: str = "KILLED", last: str | None = LAST) -> EarlierRun:
    return EarlierRun(run_id, status, last_checkpoint=last)


REUSE_F1 = StageStart(How.REUSE, run_id="f1")
RESUME_K1 = StageStart(How.RESUME, run_id="k1", checkpoint=LAST)
FROM_SCRATCH = StageStart(How.FROM_SCRATCH)
FROM_INIT = StageStart(How.FROM_CHECKPOINT, checkpoint=INIT)
AFTER_PREVIOUS = StageStart(How.AFTER_PREVIOUS)


# earlier runs of the stage (newest first), --resume, --from-checkpoint -> the first stage's start
FIRST_STAGE = [
    pytest.param([], True, None, FROM_SCRATCH, id="no earlier run: from scratch"),
    pytest.param([], True, INIT, FROM_INIT, id="no earlier run, --from-checkpoint: its weights"),
    pytest.param([finished("f1")], True, None, REUSE_F1, id="finished: reused"),
    pytest.param([finished("f1")], True, INIT, REUSE_F1, id="finished, --from-checkpoint: reused"),
    pytest.param(
        [finished("f0", best_logged=False)], True, None, FROM_SCRATCH, id="finished, no best: fresh"
    ),
    pytest.param(
        [finished("f0", best_logged=False), finished("f1")],
        True,
        None,
        REUSE_F1,
        id="newest finished without best: the older one reused",
    ),
    pytest.param(
        [finished("f1"), finished("f2")], True, None, REUSE_F1, id="two finished: newest reused"
    ),
    pytest.param([stopped("k1", "KILLED")], True, None, RESUME_K1, id="killed: resumed"),
    pytest.param([stopped("k1", "FAILED")], True, None, RESUME_K1, id="failed: resumed"),
    pytest.param([stopped("k1", "RUNNING")], True, None, RESUME_K1, id="left running: resumed"),
    pytest.param([stopped("k1")], True, INIT, RESUME_K1, id="killed, --from-checkpoint: resumed"),
    pytest.param(
        [stopped("k0", last=None)], True, None, FROM_SCRATCH, id="killed, no whole last.ckpt: fresh"
    ),
    pytest.param(
        [EarlierRun("k1", "FAILED", best_checkpoint_logged=True, last_checkpoint=LAST)],
        True,
        None,
        RESUME_K1,
        id="failed after naming its best: resumed, not reused",
    ),
    pytest.param(
        [stopped("k0", last=None)],
        True,
        INIT,
        FROM_INIT,
        id="killed, no whole last.ckpt, --from-checkpoint: its weights",
    ),
    pytest.param(
        [stopped("k0", last=None), stopped("k1")],
        True,
        None,
        RESUME_K1,
        id="newest last.ckpt cut short: the older run resumed",
    ),
    pytest.param(
        [stopped("k0"), finished("f1")],
        True,
        None,
        REUSE_F1,
        id="killed after a finished run: the finished one reused",
    ),
    pytest.param(
        [EarlierRun("s0", "SCHEDULED", last_checkpoint=LAST)],
        True,
        None,
        FROM_SCRATCH,
        id="neither finished nor interrupted: fresh",
    ),
    pytest.param([finished("f1")], False, None, FROM_SCRATCH, id="--resume false, finished: fresh"),
    pytest.param([stopped("k1")], False, INIT, FROM_INIT, id="--resume false, killed: fresh"),
]


@pytest.mark.parametrize(("earlier", "resume", "init", "expected"), FIRST_STAGE)
def test_first_stage(earlier, resume, init, expected):
    state = StoreState(None, {"01_stage": earlier})
    chain_start = decide_chain_start(
        ["01_stage"], state, resume=resume, init_checkpoint=init, under_mlflow_run=False
    )
    assert chain_start.stages == (expected,)


# the same situations for a later stage: a fresh run starts after the previous stage
LATER_STAGE = [
    pytest.param([], AFTER_PREVIOUS, id="no earlier run: after the previous stage"),
    pytest.param([finished("f1")], REUSE_F1, id="finished: reused"),
    pytest.param([stopped("k1")], RESUME_K1, id="killed: resumed"),
    pytest.param([stopped("k0", last=None)], AFTER_PREVIOUS, id="killed, no whole last.ckpt"),
]


@pytest.mark.parametrize(("earlier", "expected"), LATER_STAGE)
def test_later_stage_with_a_from_checkpoint_first_stage(earlier, expected):
    state = StoreState(None, {"01_stage": [], "02_stage": earlier})
    chain_start = decide_chain_start(
        ["01_stage", "02_stage"], state, resume=True, init_checkpoint=INIT, under_mlflow_run=False
    )
    assert chain_start.stages == (FROM_INIT, expected)


def test_a_resumed_chain_reads_each_stage_on_its_own():
    state = StoreState(
        None,
        {"01_stage": [finished("f1")], "02_stage": [stopped("k1")], "03_stage": [finished("f1")]},
    )
    chain_start = decide_chain_start(
        ["01_stage", "02_stage", "03_stage", "04_stage"],
        state,
        resume=True,
        init_checkpoint=None,
        under_mlflow_run=False,
    )
    assert chain_start.stages == (REUSE_F1, RESUME_K1, REUSE_F1, AFTER_PREVIOUS)


# earlier parent (and whether it logged the chain's model), --resume, under `mlflow run`, each
# stage's earlier runs -> the parent run continued in, whether it gets the chain's model
PARENT_RUN = [
    pytest.param(None, True, False, [[finished("f1")]], None, True, id="no earlier parent: new"),
    pytest.param(("p1", True), True, False, [[]], "p1", True, id="earlier parent: continued"),
    pytest.param(
        ("p1", True),
        True,
        False,
        [[finished("f1")]],
        "p1",
        False,
        id="continued, all reused: has model",
    ),
    pytest.param(
        ("p1", False),
        True,
        False,
        [[finished("f1")]],
        "p1",
        True,
        id="continued, all reused, stopped before logging its model: gets the model",
    ),
    pytest.param(
        ("p1", True),
        True,
        False,
        [[finished("f1")], [stopped("k1")]],
        "p1",
        True,
        id="continued, one stage resumed: gets the model",
    ),
    pytest.param(
        ("p1", True), False, False, [[finished("f1")]], None, True, id="--resume false: new"
    ),
    pytest.param(
        ("p1", True),
        True,
        True,
        [[finished("f1")]],
        None,
        True,
        id="under mlflow run: the launcher's run",
    ),
]


@pytest.mark.parametrize(
    ("earlier_parent", "resume", "under_mlflow_run", "stage_runs", "parent", "logs_model"),
    PARENT_RUN,
)
def test_parent_run(earlier_parent, resume, under_mlflow_run, stage_runs, parent, logs_model):
    names = [f"0{position + 1}_stage" for position in range(len(stage_runs))]
    parent_run_id, holds_model = earlier_parent or (None, False)
    state = StoreState(
        parent_run_id, dict(zip(names, stage_runs, strict=True)), parent_holds_model=holds_model
    )
    chain_start = decide_chain_start(
        names, state, resume=resume, init_checkpoint=None, under_mlflow_run=under_mlflow_run
    )
    assert chain_start.parent_run_id == parent
    assert chain_start.logs_final_model is logs_model


def test_the_decision_reaches_other_ranks_unchanged_as_json():
    for holds_model in (True, False):
        chain_start = ChainStart("p1", (REUSE_F1, RESUME_K1, AFTER_PREVIOUS), holds_model)
        assert ChainStart.from_json(json.loads(json.dumps(chain_start.to_json()))) == chain_start


def test_a_chain_another_live_process_is_writing_is_not_resumed():
    """Resuming would take over that process's runs; --resume false trains a separate copy."""
    state = StoreState("p1", {"01_stage": [stopped("k1", "RUNNING")]}, written_now=("k1", 4321))
    with pytest.raises(ChainInUseError, match=r"process 4321 on this machine \(run k1\)"):
        decide_chain_start(
            ["01_stage"], state, resume=True, init_checkpoint=None, under_mlflow_run=False
        )
    separate = decide_chain_start(
        ["01_stage"], state, resume=False, init_checkpoint=None, under_mlflow_run=False
    )
    assert separate == ChainStart(None, (FROM_SCRATCH,))
