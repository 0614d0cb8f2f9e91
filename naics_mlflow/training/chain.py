"""Sequential curriculum training: one parent MLflow run, one nested run per stage, each stage
starting as ``training/start.py`` decides from the tracking store's state, read here."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run

from naics_mlflow import tracking
from naics_mlflow.config import Config
from naics_mlflow.data.build import data_digest, ensure_built
from naics_mlflow.data.census import CensusRelease, resolve_raw_dir
from naics_mlflow.data.taxonomy import load_taxonomy
from naics_mlflow.distributed import is_global_zero, rank_zero_answer, stop_launched_ranks
from naics_mlflow.evaluation.retrieval import SearchEngine
from naics_mlflow.model.checkpoint import CheckpointError, read_checkpoint, weights_digest
from naics_mlflow.model.merged import inference_device
from naics_mlflow.model.trained import load_embedder
from naics_mlflow.serving import MODEL_NAME, log_search_model
from naics_mlflow.training.memory import check_stage_fits_memory
from naics_mlflow.training.mlflow_logging import SUMMARY_METRICS
from naics_mlflow.training.plan import ChainPlan
from naics_mlflow.training.stage import (
    StageResult,
    run_checkpoint_dir,
    stage_checkpoint_dir,
    train_stage,
)
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

FINAL_STAGE_PREFIX = "final_stage/"


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
    chain_hash = ""  # rank 0 alone reads and writes the store
    if is_global_zero():
        starting_weights = (
            weights_digest(read_checkpoint(init_checkpoint)["state_dict"])
            if init_checkpoint
            else None
        )
        chain_hash = plan.hash(starting_weights, _built_data(plan, release, raw_dir))
    checkpoint_dirs = {
        stage.curriculum.name: stage_checkpoint_dir(
            stage.config, plan.run_group, stage.curriculum.name
        )
        for stage in plan.stages
    }
    names = list(checkpoint_dirs)
    with tempfile.TemporaryDirectory(prefix="naics-chain-") as download_dir:

        def decide() -> dict[str, Any]:
            return read_chain_start(
                checkpoint_dirs,
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
    checkpoint_dirs: Mapping[str, Path],
    chain_hash: str,
    download_dir: Path,
    *,
    resume: bool,
    init_checkpoint: str | None,
) -> ChainStart:
    """How the chain with ``chain_hash`` starts, from the tracking store's state.
    ``checkpoint_dirs``: each stage's name, in order, and its checkpoint folder on this disk."""
    return decide_chain_start(
        list(checkpoint_dirs),
        read_store_state(chain_hash, checkpoint_dirs, download_dir),
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
                chain=plan.chain,
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
    for stage, stage_start in zip(plan.stages, start.stages, strict=True):
        if stage_start.how is not How.REUSE:
            check_stage_fits_memory(stage.config, stage.curriculum, release, raw_dir, plan.chain)
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
                chain=plan.chain,
            )
            results.append(result)
            previous_best = result.best_checkpoint
            final_run_id = result.run_id
        tracking.set_tags(
            {"final_stage": plan.stages[-1].curriculum.name, "final_run_id": final_run_id}
        )
        # The chain's row in the MLflow UI then shows the figures of the weights it ships, so
        # that chains can be sorted and compared without unfolding each one.
        final_metrics = tracking.get_run(final_run_id).data.metrics
        tracking.log_metrics(
            {
                f"{FINAL_STAGE_PREFIX}{name}": final_metrics[name]
                for name in SUMMARY_METRICS
                if name in final_metrics
            }
        )
        if start.logs_final_model:
            if start.parent_run_id is not None:  # a chain in use is never resumed
                tracking.delete_models_cut_short(parent, MODEL_NAME)
            _log_final_model(previous_best, plan.stages[-1].config, parent.info.run_id)
    return ChainResult(parent.info.run_id, results, final_run_id)


def _built_data(plan: ChainPlan, release: CensusRelease, raw_dir: str | None) -> list[str | None]:
    """Each stage's ``data_digest``, its data built first where it is not: the chain is
    identified by the data it trains on, before its first stage would build it."""
    for config in {stage.config.dirs.data: stage.config for stage in plan.stages}.values():
        ensure_built(resolve_raw_dir(raw_dir, config.dirs.raw), Path(config.dirs.data), release)
    return [data_digest(Path(stage.config.dirs.data)) for stage in plan.stages]


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


def _log_final_model(checkpoint: Path, config: Config, parent_run_id: str) -> None:
    """The chain's result as a servable MLflow model in its parent run."""
    engine = SearchEngine.build(
        load_embedder(checkpoint, inference_device(config.search.device)),
        load_taxonomy(config.dirs.data),
        config.search,
        outputs_dir=Path(config.dirs.outputs),
    )
    uri = log_search_model(checkpoint, engine, parent_run_id)
    logger.info("chain model logged as %s", uri)


def read_store_state(
    chain_hash: str, checkpoint_dirs: Mapping[str, Path], download_dir: Path
) -> StoreState:
    """What the tracking store holds about the chain with ``chain_hash``: its latest parent run,
    and each stage's runs, newest first, with the ``last.ckpt`` each interrupted one continues
    from (see :func:`_last_checkpoint_to_resume`); ``checkpoint_dirs`` names the stages."""
    parents, found = _chain_runs(chain_hash, list(checkpoint_dirs))
    written_now = _written_now(parents, found)
    # A chain in use is not resumed: its runs' last.ckpt, perhaps mid-upload, is not needed.
    stage_runs = {
        name: []
        if written_now
        else [_earlier_run(run, download_dir, checkpoint_dirs[name]) for run in runs]
        for name, runs in found.items()
    }
    if not parents:
        return StoreState(None, stage_runs, written_now)
    parent = parents[0]
    holds_model = tracking.holds_logged_model(parent, MODEL_NAME)
    return StoreState(parent.info.run_id, stage_runs, written_now, holds_model)


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


def _earlier_run(run: Run, download_dir: Path, stage_dir: Path) -> EarlierRun:
    best = run.data.tags.get("best_checkpoint")
    # Only an interrupted run continues from its last.ckpt: a finished run's is never downloaded.
    interrupted = run.info.status in INTERRUPTED_STATUSES
    return EarlierRun(
        run_id=run.info.run_id,
        status=run.info.status,
        best_checkpoint_logged=bool(best) and tracking.has_checkpoint(run, best),
        last_checkpoint=_last_checkpoint_to_resume(
            run,
            download_dir,
            run_checkpoint_dir(stage_dir, run) / tracking.LAST_CHECKPOINT,
        )
        if interrupted
        else None,
    )


def _last_checkpoint_to_resume(run: Run, download_dir: Path, on_this_disk: Path) -> str | None:
    """The whole ``last.ckpt`` furthest along of the one ``run`` logged, downloaded, and the one
    in its checkpoint folder ``on_this_disk``; None when neither reads back.

    Each epoch's ``last.ckpt`` is written on the training machine's disk first and uploaded
    after: a stop during the upload (Ctrl-C, SIGTERM) leaves the logged one an epoch behind, and
    a kill can leave it cut short, while that disk still holds the whole, later one.
    """
    logged = None
    if tracking.has_checkpoint(run, tracking.LAST_CHECKPOINT):
        logger.info(
            "reading the last.ckpt of run %s, where stage %s stopped",
            run.info.run_id,
            run.data.tags.get("stage"),
        )
        logged = tracking.download_checkpoint(run, tracking.LAST_CHECKPOINT, download_dir)
    candidates = [path for path in (logged, on_this_disk) if path is not None and path.is_file()]
    readable: dict[Path, int] = {}
    for path in candidates:
        try:
            readable[path] = read_checkpoint(path).get("global_step", 0)
        except CheckpointError as exc:
            logger.warning("run %s cannot be resumed from %s", run.info.run_id, exc)
    if not readable:
        return None
    chosen = max(readable, key=readable.__getitem__)  # on a tie the logged one, listed first
    if chosen == on_this_disk:
        logger.info(
            "continuing run %s from its last.ckpt on this disk, at step %d%s",
            run.info.run_id,
            readable[chosen],
            f"; the one it logged is at step {readable[logged]}" if logged in readable else "",
        )
    return str(chosen)
