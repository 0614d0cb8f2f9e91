"""Sequential curriculum training: one parent MLflow run, one nested run per stage, each stage
starting from the previous stage's best checkpoint, and resumption of interrupted chains."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from naics_mlflow import tracking
from naics_mlflow.config import Config
from naics_mlflow.data.census import CensusRelease
from naics_mlflow.data.taxonomy import load_taxonomy
from naics_mlflow.distributed import is_global_zero, rank_zero_answer
from naics_mlflow.evaluation.retrieval import SearchEngine
from naics_mlflow.model.checkpoint import CheckpointError, read_checkpoint, weights_digest
from naics_mlflow.model.loading import load_embedder
from naics_mlflow.serving import log_search_model
from naics_mlflow.training.plan import ChainPlan
from naics_mlflow.training.stage import StageResult, train_stage

logger = logging.getLogger(__name__)

INTERRUPTED_STATUSES = ("RUNNING", "FAILED", "KILLED")


@dataclass(frozen=True)
class ChainResult:
    parent_run_id: str
    stages: list[StageResult | None]  # None for a stage reused from an earlier run
    final_run_id: str  # the run holding the last stage's best checkpoint


@dataclass(frozen=True)
class StageStart:
    """How a stage of a resumed chain starts: reused, continued, or trained afresh."""

    finished_run_id: str | None = None  # reuse this run's best checkpoint
    interrupted_run_id: str | None = None  # continue this run's last.ckpt ...
    resume_checkpoint: str | None = None  # ... downloaded here


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
    starting_weights = (
        weights_digest(read_checkpoint(init_checkpoint)["state_dict"]) if init_checkpoint else None
    )
    chain_hash = plan.hash(starting_weights)
    with tempfile.TemporaryDirectory(prefix="naics-chain-") as download_dir:

        def read_starts() -> list[dict[str, str | None]]:
            if not resume:
                return [asdict(StageStart()) for _ in plan.stages]
            return [
                asdict(stage_start(chain_hash, stage.curriculum.name, Path(download_dir)))
                for stage in plan.stages
            ]

        starts = [
            StageStart(**start) for start in rank_zero_answer("chain_stage_starts", read_starts)
        ]
        if not is_global_zero():
            for stage, start in zip(plan.stages, starts, strict=True):
                if start.finished_run_id is None:
                    train_stage(
                        stage.config,
                        stage.curriculum,
                        run_group=plan.run_group,
                        release=release,
                        raw_dir=raw_dir,
                        resume_checkpoint=_path_or_none(start.resume_checkpoint),
                    )
            return None
        return _record_chain(
            plan, chain_hash, starts, release, resume, init_checkpoint, raw_dir, Path(download_dir)
        )


def _record_chain(
    plan: ChainPlan,
    chain_hash: str,
    starts: list[StageStart],
    release: CensusRelease,
    resume: bool,
    init_checkpoint: Path | None,
    raw_dir: str | None,
    download_dir: Path,
) -> ChainResult:
    """Rank 0's part of :func:`run_chain`: the parent run, the stage runs, the final model."""
    experiment_id = tracking.use_experiment(plan.stages[0].config.mlflow.experiment_name)
    chain_tags = {"sequence": plan.sequence, "chain_hash": chain_hash}
    if plan.chain:
        chain_tags["chain"] = plan.chain
    parent_tags = {**chain_tags, "config_hash": chain_hash, "role": "chain"}
    earlier_parent = _earlier_parent_run(chain_hash) if resume else None
    results: list[StageResult | None] = []
    parent_run = tracking.run(experiment_id, plan.name, parent_tags, reopen_run_id=earlier_parent)
    with parent_run as parent:
        if earlier_parent is None:
            tracking.log_params({"stages": ",".join(s.curriculum.name for s in plan.stages)})
        else:
            logger.info("resuming chain %s in its parent run %s", plan.name, earlier_parent)
        previous_best = init_checkpoint
        for stage, start in zip(plan.stages, starts, strict=True):
            name = stage.curriculum.name
            if start.finished_run_id is not None:
                logger.info(
                    "stage %s already finished in run %s; reusing its best checkpoint",
                    name,
                    start.finished_run_id,
                )
                tracking.set_tags({f"reused.{name}": start.finished_run_id})
                previous_best = tracking.download_best_checkpoint(
                    start.finished_run_id, download_dir
                )
                results.append(None)
                final_run_id = start.finished_run_id
                continue
            extra_tags = dict(chain_tags)
            if start.interrupted_run_id is not None:
                logger.info(
                    "stage %s was interrupted in run %s; continuing from its last.ckpt",
                    name,
                    start.interrupted_run_id,
                )
                tracking.mark_killed_if_running(start.interrupted_run_id)
                extra_tags["resumed_from"] = start.interrupted_run_id
            result = train_stage(
                stage.config,
                stage.curriculum,
                run_group=plan.run_group,
                release=release,
                raw_dir=raw_dir,
                init_checkpoint=None if start.resume_checkpoint else previous_best,
                resume_checkpoint=_path_or_none(start.resume_checkpoint),
                parent_run_id=parent.info.run_id,
                extra_tags=extra_tags,
            )
            results.append(result)
            previous_best = result.best_checkpoint
            final_run_id = result.run_id
        tracking.set_tags(
            {"final_stage": plan.stages[-1].curriculum.name, "final_run_id": final_run_id}
        )
        if earlier_parent is None or any(results):
            _log_final_model(previous_best, plan.stages[-1].config)
    return ChainResult(parent.info.run_id, results, final_run_id)


def _path_or_none(path: str | None) -> Path | None:
    return None if path is None else Path(path)


def _log_final_model(checkpoint: Path, config: Config) -> None:
    """The chain's result as a servable MLflow model in the parent run."""
    engine = SearchEngine.build(
        load_embedder(checkpoint), load_taxonomy(config.dirs.data), config.search.lexical_weight
    )
    uri = log_search_model(checkpoint, engine)
    logger.info("chain model logged as %s", uri)


def _earlier_parent_run(chain_hash: str) -> str | None:
    """The latest parent run of this very chain, to continue in, unless ``mlflow run`` already
    opened the run this process must use."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return None
    runs = tracking.search_runs(
        f"{tracking.tag_equals('chain_hash', chain_hash)} AND tags.role = 'chain'"
    )
    return runs[0].info.run_id if runs else None


def stage_start(chain_hash: str, stage: str, download_dir: Path) -> StageStart:
    """How ``stage`` of the chain with ``chain_hash`` starts, read from the tracking store: a
    finished run to reuse, else an interrupted run's ``last.ckpt`` (downloaded), else afresh."""
    this_stage = (
        f"{tracking.tag_equals('chain_hash', chain_hash)} AND {tracking.tag_equals('stage', stage)}"
    )
    for run in tracking.search_runs(f"{this_stage} AND attributes.status = 'FINISHED'"):
        best = run.data.tags.get("best_checkpoint")
        if best and tracking.has_checkpoint(run, best):
            return StageStart(finished_run_id=run.info.run_id)
    for run in tracking.search_runs(this_stage):
        if run.info.status in INTERRUPTED_STATUSES and tracking.has_checkpoint(
            run, tracking.LAST_CHECKPOINT
        ):
            last = tracking.download_checkpoint(run, tracking.LAST_CHECKPOINT, download_dir)
            try:
                read_checkpoint(last)
            except CheckpointError as exc:
                # A process killed while uploading leaves a partial file; an older run may do.
                logger.warning("not resuming from run %s: %s", run.info.run_id, exc)
                continue
            return StageStart(interrupted_run_id=run.info.run_id, resume_checkpoint=str(last))
    return StageStart()
