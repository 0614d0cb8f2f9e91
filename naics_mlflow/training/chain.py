"""Sequential curriculum training: one parent MLflow run, one nested run per stage, each stage
starting from the previous stage's best checkpoint, and resumption of interrupted chains."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from naics_mlflow import tracking
from naics_mlflow.config import Config
from naics_mlflow.data.census import CensusRelease
from naics_mlflow.data.taxonomy import load_taxonomy
from naics_mlflow.evaluation.retrieval import SearchEngine
from naics_mlflow.model.checkpoint import read_checkpoint, weights_digest
from naics_mlflow.model.module import load_embedder
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


def run_chain(
    plan: ChainPlan,
    *,
    release: CensusRelease,
    resume: bool,
    init_checkpoint: Path | None,
    raw_dir: str | None = None,
) -> ChainResult:
    """Train every stage of ``plan`` in one parent run; see docs/training.md for resumption."""
    first_config = plan.stages[0].config
    experiment_id = tracking.use_experiment(first_config.mlflow.experiment_name)
    starting_weights = (
        weights_digest(read_checkpoint(init_checkpoint)["state_dict"]) if init_checkpoint else None
    )
    chain_hash = plan.hash(starting_weights)
    chain_tags = {"sequence": plan.sequence, "chain_hash": chain_hash}
    if plan.chain:
        chain_tags["chain"] = plan.chain
    parent_tags = {**chain_tags, "config_hash": chain_hash, "role": "chain"}
    earlier_parent = _earlier_parent_run(chain_hash) if resume else None
    results: list[StageResult | None] = []
    with (
        tempfile.TemporaryDirectory(prefix="naics-chain-") as download_dir,
        tracking.run(experiment_id, plan.name, parent_tags, reopen_run_id=earlier_parent) as parent,
    ):
        if earlier_parent is None:
            tracking.log_params({"stages": ",".join(s.curriculum.name for s in plan.stages)})
        else:
            logger.info("resuming chain %s in its parent run %s", plan.name, earlier_parent)
        previous_best = init_checkpoint
        for stage in plan.stages:
            name = stage.curriculum.name
            if resume:
                finished = _finished_stage_run(chain_hash, name)
                if finished is not None:
                    logger.info(
                        "stage %s already finished in run %s; reusing its best checkpoint",
                        name,
                        finished.info.run_id,
                    )
                    tracking.set_tags({f"reused.{name}": finished.info.run_id})
                    previous_best = tracking.download_checkpoint(
                        finished, finished.data.tags["best_checkpoint"], Path(download_dir)
                    )
                    results.append(None)
                    final_run_id = finished.info.run_id
                    continue
            interrupted = _interrupted_stage_run(chain_hash, name) if resume else None
            extra_tags = dict(chain_tags)
            resume_checkpoint = None
            if interrupted is not None:
                logger.info(
                    "stage %s was interrupted in run %s; continuing from its last.ckpt",
                    name,
                    interrupted.info.run_id,
                )
                resume_checkpoint = tracking.download_checkpoint(
                    interrupted, tracking.LAST_CHECKPOINT, Path(download_dir)
                )
                tracking.mark_killed_if_running(interrupted)
                extra_tags["resumed_from"] = interrupted.info.run_id
            result = train_stage(
                stage.config,
                stage.curriculum,
                run_group=plan.run_group,
                release=release,
                raw_dir=raw_dir,
                init_checkpoint=None if resume_checkpoint else previous_best,
                resume_checkpoint=resume_checkpoint,
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


def _log_final_model(checkpoint: Path, config: Config) -> None:
    """The chain's result as a servable MLflow model in the parent run."""
    engine = SearchEngine.build(load_embedder(checkpoint), load_taxonomy(config.dirs.data))
    uri = log_search_model(checkpoint, engine)
    logger.info("chain model logged as %s", uri)


def _earlier_parent_run(chain_hash: str) -> str | None:
    """The latest parent run of this very chain, to continue in, unless ``mlflow run`` already
    opened the run this process must use."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return None
    runs = tracking.search_runs(f"tags.chain_hash = '{chain_hash}' AND tags.role = 'chain'")
    return runs[0].info.run_id if runs else None


def _finished_stage_run(chain_hash: str, stage: str):
    for run in tracking.search_runs(
        f"tags.chain_hash = '{chain_hash}' AND tags.stage = '{stage}' "
        "AND attributes.status = 'FINISHED'"
    ):
        best = run.data.tags.get("best_checkpoint")
        if best and tracking.has_checkpoint(run, best):
            return run
    return None


def _interrupted_stage_run(chain_hash: str, stage: str):
    for run in tracking.search_runs(f"tags.chain_hash = '{chain_hash}' AND tags.stage = '{stage}'"):
        if run.info.status in INTERRUPTED_STATUSES and tracking.has_checkpoint(
            run, tracking.LAST_CHECKPOINT
        ):
            return run
    return None
