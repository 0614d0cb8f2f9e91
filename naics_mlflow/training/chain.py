"""Sequential curriculum training: one parent MLflow run, one nested run per stage, each stage
starting as ``training/start.py`` decides from the tracking store's state, read here."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run

from naics_mlflow import tracking
from naics_mlflow.config import Config
from naics_mlflow.data.census import CensusRelease
from naics_mlflow.data.taxonomy import load_taxonomy
from naics_mlflow.distributed import is_global_zero, rank_zero_answer, stop_launched_ranks
from naics_mlflow.evaluation.retrieval import SearchEngine
from naics_mlflow.model.checkpoint import CheckpointError, read_checkpoint, weights_digest
from naics_mlflow.model.merged import inference_device
from naics_mlflow.model.trained import load_embedder
from naics_mlflow.serving import log_search_model
from naics_mlflow.training.plan import ChainPlan
from naics_mlflow.training.stage import StageResult, check_stage_can_start, train_stage
from naics_mlflow.training.start import (
    INTERRUPTED_STATUSES,
    ChainStart,
    EarlierRun,
    How,
    StageStart,
    StoreState,
    decide_chain_start,
    refuse_if_written_now,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainResult:
    parent_run_id: str
    stages: list[StageResult | None]  # None for a stage reused from an earlier run
    final_run_id: str  # the run holding the last stage's best checkpoint


def run_chain(
    plan: ChainPlan,
    *,
    release: CensusRelease,
    resume: bool,
    init_checkpoint: Path | None,
    raw_dir: str | None = None,
) -> ChainResult | None:
    """Train every stage of ``plan`` in one parent run; see docs/training.md for resumption.

    Ranks other than 0 of a data-parallel run train the same stages from the same starts, keep
    no record and return None.
    """
    # The chain ends by building its model for search; a device that cannot fails here, not
    # after hours of training.
    inference_device(plan.stages[-1].config.search.device)
    if is_global_zero():  # nor a folder it cannot write, before the parent run is opened
        for stage in plan.stages:
            check_stage_can_start(stage.config, Path(stage.config.dirs.checkpoints))
    starting_weights = (
        weights_digest(read_checkpoint(init_checkpoint)["state_dict"]) if init_checkpoint else None
    )
    chain_hash = plan.hash(starting_weights)
    names = [stage.curriculum.name for stage in plan.stages]
    with tempfile.TemporaryDirectory(prefix="naics-chain-") as download_dir:

        def decide() -> dict[str, Any]:
            return read_chain_start(
                names,
                chain_hash,
                Path(download_dir),
                resume=resume,
                init_checkpoint=_str_or_none(init_checkpoint),
            ).to_json()

        start = ChainStart.from_json(rank_zero_answer("chain_start", decide))
        if not is_global_zero():
            _train_without_record(plan, start, release, raw_dir)
            return None
        try:
            if resume:
                # Asked again just before this command opens its runs: another one may have
                # started the chain while this one read the store, which takes as long as
                # downloading the interrupted runs' last.ckpt.
                refuse_if_written_now(_written_now(*_chain_runs(chain_hash, names)))
            return _record_chain(plan, chain_hash, start, release, raw_dir, Path(download_dir))
        except BaseException as stop:
            # Between two stages the ranks this process started wait for it in the next fit.
            stop_launched_ranks()
            if isinstance(stop, KeyboardInterrupt | SystemExit):  # Ctrl-C, SIGTERM
                logger.warning(
                    "the same command%s resumes the chain from the last epoch it finished",
                    "" if resume else " with --resume true",
                )
            raise


def read_chain_start(
    stages: list[str],
    chain_hash: str,
    download_dir: Path,
    *,
    resume: bool,
    init_checkpoint: str | None,
) -> ChainStart:
    """How the chain of ``stages`` with ``chain_hash`` starts, from the tracking store's state."""
    return decide_chain_start(
        stages,
        read_store_state(chain_hash, stages, download_dir),
        resume=resume,
        init_checkpoint=init_checkpoint,
        under_mlflow_run=bool(os.environ.get("MLFLOW_RUN_ID")),
    )


def _train_without_record(
    plan: ChainPlan, start: ChainStart, release: CensusRelease, raw_dir: str | None
) -> None:
    """A rank other than 0: train what rank 0 trains; DDP hands every rank rank 0's weights."""
    for stage, stage_start in zip(plan.stages, start.stages, strict=True):
        if stage_start.how is not How.REUSE:
            train_stage(
                stage.config,
                stage.curriculum,
                run_group=plan.run_group,
                release=release,
                raw_dir=raw_dir,
                resume_checkpoint=_resume_checkpoint(stage_start),
            )


def _record_chain(
    plan: ChainPlan,
    chain_hash: str,
    start: ChainStart,
    release: CensusRelease,
    raw_dir: str | None,
    download_dir: Path,
) -> ChainResult:
    """Rank 0's part of :func:`run_chain`: the parent run, the stage runs, the final model."""
    experiment_id = tracking.use_experiment(plan.stages[0].config.mlflow.experiment_name)
    chain_tags = {"sequence": plan.sequence, "chain_hash": chain_hash}
    if plan.chain:
        chain_tags["chain"] = plan.chain
    parent_tags = {**chain_tags, "config_hash": chain_hash, "role": "chain"}
    results: list[StageResult | None] = []
    parent_run = tracking.run(
        experiment_id, plan.name, parent_tags, reopen_run_id=start.parent_run_id
    )
    with parent_run as parent:
        if start.parent_run_id is None:
            tracking.log_params({"stages": ",".join(s.curriculum.name for s in plan.stages)})
        else:
            logger.info("resuming chain %s in its parent run %s", plan.name, start.parent_run_id)
        previous_best: Path | None = None
        for stage, stage_start in zip(plan.stages, start.stages, strict=True):
            name = stage.curriculum.name
            if stage_start.how is How.REUSE:
                logger.info(
                    "stage %s already finished in run %s; reusing its best checkpoint",
                    name,
                    stage_start.run_id,
                )
                tracking.set_tags({f"reused.{name}": stage_start.run_id})
                previous_best = tracking.download_best_checkpoint(stage_start.run_id, download_dir)
                results.append(None)
                final_run_id = stage_start.run_id
                continue
            extra_tags = dict(chain_tags)
            if stage_start.how is How.RESUME:
                logger.info(
                    "stage %s was interrupted in run %s; continuing from its last.ckpt",
                    name,
                    stage_start.run_id,
                )
                tracking.mark_killed_if_running(stage_start.run_id)
            result = train_stage(
                stage.config,
                stage.curriculum,
                run_group=plan.run_group,
                release=release,
                raw_dir=raw_dir,
                init_checkpoint=_initial_weights(stage_start, previous_best),
                resume_checkpoint=_resume_checkpoint(stage_start),
                resumed_run_id=stage_start.run_id if stage_start.how is How.RESUME else None,
                parent_run_id=parent.info.run_id,
                extra_tags=extra_tags,
            )
            results.append(result)
            previous_best = result.best_checkpoint
            final_run_id = result.run_id
        tracking.set_tags(
            {"final_stage": plan.stages[-1].curriculum.name, "final_run_id": final_run_id}
        )
        if start.logs_final_model:
            _log_final_model(previous_best, plan.stages[-1].config)
    return ChainResult(parent.info.run_id, results, final_run_id)


def _initial_weights(start: StageStart, previous_best: Path | None) -> Path | None:
    """The weights a new run of a stage loads; a resumed run restores its own."""
    if start.how is How.AFTER_PREVIOUS:
        return previous_best
    if start.how is How.FROM_CHECKPOINT:
        return Path(start.checkpoint)
    return None


def _resume_checkpoint(start: StageStart) -> Path | None:
    return Path(start.checkpoint) if start.how is How.RESUME else None


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _log_final_model(checkpoint: Path, config: Config) -> None:
    """The chain's result as a servable MLflow model in the parent run."""
    engine = SearchEngine.build(
        load_embedder(checkpoint, inference_device(config.search.device)),
        load_taxonomy(config.dirs.data),
        config.search,
        outputs_dir=Path(config.dirs.outputs),
    )
    uri = log_search_model(checkpoint, engine)
    logger.info("chain model logged as %s", uri)


def read_store_state(chain_hash: str, stages: list[str], download_dir: Path) -> StoreState:
    """What the tracking store holds about the chain with ``chain_hash``: its latest parent run,
    and each stage's runs, newest first, with every interrupted run's ``last.ckpt`` downloaded
    to ``download_dir`` and read back."""
    parents, found = _chain_runs(chain_hash, stages)
    written_now = _written_now(parents, found)
    # A chain in use is not resumed: its runs' last.ckpt, perhaps mid-upload, is not needed.
    stage_runs = {
        name: [] if written_now else [_earlier_run(run, download_dir) for run in runs]
        for name, runs in found.items()
    }
    return StoreState(parents[0].info.run_id if parents else None, stage_runs, written_now)


def _chain_runs(chain_hash: str, stages: list[str]) -> tuple[list[Run], dict[str, list[Run]]]:
    """The parent runs of the chain with ``chain_hash``, and each stage's runs, newest first."""
    this_chain = tracking.tag_equals("chain_hash", chain_hash)
    parents = tracking.search_runs(f"{this_chain} AND tags.role = 'chain'")
    found = {
        name: tracking.search_runs(f"{this_chain} AND {tracking.tag_equals('stage', name)}")
        for name in stages
    }
    return parents, found


def _written_now(parents: list[Run], found: dict[str, list[Run]]) -> tuple[str, int] | None:
    """(run id, pid) of the first of a chain's runs that a live process on this machine writes."""
    for run in [*parents, *(run for runs in found.values() for run in runs)]:
        if (pid := tracking.live_writer(run)) is not None:
            return run.info.run_id, pid
    return None


def _earlier_run(run: Run, download_dir: Path) -> EarlierRun:
    best = run.data.tags.get("best_checkpoint")
    # Only an interrupted run continues from its last.ckpt: a finished run's is never downloaded.
    interrupted = run.info.status in INTERRUPTED_STATUSES
    return EarlierRun(
        run_id=run.info.run_id,
        status=run.info.status,
        best_checkpoint_logged=bool(best) and tracking.has_checkpoint(run, best),
        last_checkpoint=_whole_last_checkpoint(run, download_dir) if interrupted else None,
    )


def _whole_last_checkpoint(run: Run, download_dir: Path) -> str | None:
    """``run``'s logged ``last.ckpt``, downloaded, unless it is missing or does not read back
    (a process killed while uploading leaves a partial file)."""
    if not tracking.has_checkpoint(run, tracking.LAST_CHECKPOINT):
        return None
    logger.info(
        "reading the last.ckpt of run %s, where stage %s stopped",
        run.info.run_id,
        run.data.tags.get("stage"),
    )
    last = tracking.download_checkpoint(run, tracking.LAST_CHECKPOINT, download_dir)
    try:
        read_checkpoint(last)
    except CheckpointError as exc:
        logger.warning("run %s cannot be resumed: %s", run.info.run_id, exc)
        return None
    return str(last)
