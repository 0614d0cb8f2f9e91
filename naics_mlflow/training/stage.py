"""Train one curriculum stage as one MLflow run: data module, model, configured Trainer, logging."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from mlflow.entities import Run

from naics_mlflow import tracking
from naics_mlflow.config import Config
from naics_mlflow.data.build import data_digest
from naics_mlflow.data.census import CensusRelease
from naics_mlflow.data.curriculum import CurriculumSpec
from naics_mlflow.data.datamodule import NaicsDataModule
from naics_mlflow.data.validation import validation_protocol
from naics_mlflow.distributed import another_rank_ended_in_one_line, is_global_zero
from naics_mlflow.model.checkpoint import CheckpointError, read_checkpoint, weights_digest
from naics_mlflow.model.loading import load_trainable_weights
from naics_mlflow.model.module import NaicsEmbedder
from naics_mlflow.training.callbacks import (
    CommandSigtermHandler,
    CurriculumNegatives,
    EpochSummary,
    ForgetUnreachableBest,
    PrecomputedFeatures,
    StagePictures,
    StageProgressBar,
    StopBetweenSteps,
    StopLaunchedRanksFirst,
    TaxonomyEvaluation,
    checkpoint_figures,
    find_best_on_this_disk,
)
from naics_mlflow.training.checkpoint_io import AtomicCheckpointIO
from naics_mlflow.training.memory import (
    check_step_fits_memory,
    out_of_memory_in_one_line,
    trains_on_cpu,
)
from naics_mlflow.training.mlflow_logging import (
    EpochEndRecord,
    MetricsLogger,
    best_epoch_metrics,
    log_verified_checkpoint,
)

logger = logging.getLogger(__name__)

_HALF_PRECISIONS = {"16-mixed", "16", "16-true", "bf16-mixed", "bf16", "bf16-true"}
CHECKPOINT_FOLDER_TAG = "checkpoint_folder"


def resolve_precision(requested: str | int, accelerator: str) -> str:
    """The configured precision, or ``32-true`` where it cannot run.

    Mixed precision needs a GPU: on a CPU, fp16 autocast is unsupported and bf16 is usually
    slower than float32, so CPU runs train in float32 with one warning.
    """
    requested = str(requested)
    if requested in _HALF_PRECISIONS and trains_on_cpu(accelerator):
        logger.warning("precision %s needs a CUDA GPU; training in 32-true on the CPU", requested)
        return "32-true"
    return requested


@dataclass(frozen=True)
class StageResult:
    run_id: str
    stage: str
    best_checkpoint: Path
    metrics: dict[str, float]


def train_stage(
    config: Config,
    curriculum: CurriculumSpec,
    *,
    run_group: str,
    release: CensusRelease,
    raw_dir: str | None = None,
    init_checkpoint: Path | None = None,
    resume_checkpoint: Path | None = None,
    resumed_run_id: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    chain: str | None = None,
) -> StageResult | None:
    """Train ``curriculum`` inside a new MLflow run and log its checkpoints under ``ckpt/``.

    It starts from scratch, from ``init_checkpoint``'s weights with a fresh optimiser and
    schedule, or continues the interrupted run ``resumed_run_id`` from ``resume_checkpoint`` (its
    ``last.ckpt``) with optimiser, schedule and epoch restored. Ranks other than 0 of a
    data-parallel run only train, and return None. ``chain``: the ``chain_name`` of the chain
    file the stage comes from, if it does, which a line about its settings names. The command
    line has checked the machine and the folders first (``training/preflight.py``).
    """
    rank_zero = is_global_zero()
    stage_dir = stage_checkpoint_dir(config, run_group, curriculum.name)
    experiment_id = tracking.use_experiment(config.mlflow.experiment_name) if rank_zero else None
    L.seed_everything(config.training.seed, workers=True)
    datamodule = NaicsDataModule(config, curriculum, release, raw_dir)
    module = NaicsEmbedder(config.to_dict())
    if not rank_zero:
        # DDP copies rank 0's weights to every rank as training starts: no need to load them.
        # The checkpoint folder, too, is rank 0's (ModelCheckpoint broadcasts it).
        _fit(config, module, datamodule, run_group, stage_dir, None, resume_checkpoint, chain=chain)
        return None
    if init_checkpoint is not None:
        load_trainable_weights(module, init_checkpoint)
    # Data, curriculum, validation and memory problems end here, before a run is opened.
    datamodule.prepare_data()
    datamodule.setup()
    check_step_fits_memory(config, datamodule, module.encoder.backbone.config, chain=chain)
    tags = {
        "stage": curriculum.name,
        "curriculum": curriculum.name,
        "config_hash": config.hash(),
        "git_commit": tracking.git_commit(),
        "run_group": run_group,
        **(extra_tags or {}),
    }
    if resumed_run_id is not None:
        tags["resumed_from"] = resumed_run_id
    if init_checkpoint is not None:
        tags["init_checkpoint"] = str(init_checkpoint)
        tags["init_weights_digest"] = weights_digest(module.encoder.trainable_state_dict())
    with tracking.run(experiment_id, curriculum.name, tags, parent_run_id) as active:
        run_id = active.info.run_id
        logger.info("stage %s: MLflow run %s", curriculum.name, run_id)
        # A folder of the run's own: runs of a stage in one group (a rerun with other settings,
        # a sweep's parallel jobs) would otherwise overwrite each other's last.ckpt and best file,
        # and upload the other run's as their own. A resumed run continues in the folder the
        # interrupted run wrote to, where Lightning restores its whole record of the best epoch.
        checkpoint_dir = (
            run_checkpoint_dir(stage_dir, tracking.get_run(resumed_run_id))
            if resumed_run_id
            else stage_dir / run_id
        )
        tracking.set_tags({CHECKPOINT_FOLDER_TAG: checkpoint_dir.name})
        tracking.log_params(config.flat())
        tracking.log_params({f"curriculum.{k}": v for k, v in asdict(curriculum).items()})
        tracking.log_dict(config.to_dict(), "config.yaml")
        trainer, checkpoint = _fit(
            config,
            module,
            datamodule,
            run_group,
            checkpoint_dir,
            run_id,
            resume_checkpoint,
            resumed_run_id=resumed_run_id,
            chain=chain,
        )
        # What makes this run's val_loss comparable with another's (tracking.best_run_of_stage);
        # the data is built by the time fitting ends.
        tracking.set_tags(
            {
                "data_digest": data_digest(Path(config.dirs.data)) or "unknown",
                "val_protocol": validation_protocol(curriculum, config.data_loader.val_split),
            }
        )
        # With no epoch left to train, ForgetUnreachableBest did not run.
        if resume_checkpoint is not None and not find_best_on_this_disk(checkpoint):
            _keep_resumed_epoch_as_best(checkpoint, resume_checkpoint)
        best = Path(checkpoint.best_model_path)
        log_verified_checkpoint(run_id, best)
        log_verified_checkpoint(run_id, checkpoint_dir / tracking.LAST_CHECKPOINT)
        metrics = best_epoch_metrics(checkpoint, checkpoint_figures(best))
        tracking.set_tags({"best_checkpoint": best.name})
        # Again at the end, for a resumed run that had no epoch left to train.
        tracking.log_metric_batch(run_id, metrics, trainer.global_step)
        # Last, once the run's record is whole; the interrupted run's copy too: it is resumed no
        # more once this run has finished.
        for stage_run_id in filter(None, (run_id, resumed_run_id)):
            tracking.drop_best_so_far(stage_run_id)
    return StageResult(
        run_id=run_id,
        stage=curriculum.name,
        best_checkpoint=best,
        metrics=metrics,
    )


def stage_checkpoint_dir(config: Config, run_group: str, stage: str) -> Path:
    """The folder on this disk where a stage's runs keep their checkpoints, one folder a run."""
    return Path(config.dirs.checkpoints) / run_group / stage


def run_checkpoint_dir(stage_dir: Path, run: Run) -> Path:
    """The folder in ``stage_dir`` that ``run`` writes its checkpoints to: its
    ``checkpoint_folder`` tag (runs from before that tag: the run they resumed's, else their
    own)."""
    tags = run.data.tags
    folder = tags.get(CHECKPOINT_FOLDER_TAG) or tags.get("resumed_from") or run.info.run_id
    # Anyone with access to the store can edit a tag: a folder name, never a path out of here.
    if Path(folder).name != folder or folder in (".", ".."):
        folder = run.info.run_id
    return stage_dir / folder


def _unless_every_batch(batches: int | float) -> int | float | None:
    """None where the setting is 1.0, every batch: Lightning's default, which it then takes
    without printing, at every fit, a line that says the setting was given."""
    return None if isinstance(batches, float) and batches == 1.0 else batches


def _fit(
    config: Config,
    module: NaicsEmbedder,
    datamodule: NaicsDataModule,
    run_group: str,
    checkpoint_dir: Path,
    run_id: str | None,
    resume_checkpoint: Path | None,
    *,
    resumed_run_id: str | None = None,
    chain: str | None = None,
) -> tuple[L.Trainer, ModelCheckpoint]:
    """The configured Trainer, fitted; with a ``run_id`` (rank 0) it logs to that run, and
    where it continues run ``resumed_run_id`` it first fetches what that one left. A fit out of
    memory ends in one line that names the batch size (in ``chain``'s file, if given), and one
    that stops because another rank's process ended, in one line that points to that one's
    error."""
    name = datamodule.curriculum.name
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename=f"{name}-{{epoch:02d}}-{{val_loss:.4f}}",
        monitor="val_loss",
        mode="min",
        save_top_k=1,
    )
    # Lightning 2.6 writes save_last's file only at a step that saved a best one: an interrupted
    # stage then resumed from its best epoch, repeating every epoch since. With no metric to
    # monitor this one saves every validation, over the same file; listed after the best one,
    # it saves that one's record of the epoch just judged.
    latest = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename=Path(tracking.LAST_CHECKPOINT).stem,
        save_top_k=1,
        enable_version_counter=False,
    )
    evaluation = TaxonomyEvaluation()
    # Lightning draws its bar on stdout: where that is a file (nohup, CI, `mlflow run`, results
    # sent to a file), log lines on stderr instead, one an epoch.
    on_terminal = sys.stdout.isatty()
    # Features first: the other callbacks embed codes from them in a head-only stage.
    callbacks = [PrecomputedFeatures()] if config.training.head_only else []
    callbacks += [
        CurriculumNegatives(),
        evaluation,
        checkpoint,
        latest,
        LearningRateMonitor(logging_interval="step"),
        StageProgressBar() if on_terminal else EpochSummary(name),
        ForgetUnreachableBest(),
        CommandSigtermHandler(),
        StopBetweenSteps(),
        StopLaunchedRanksFirst(),
    ]
    loggers = [TensorBoardLogger(config.dirs.outputs, name=run_group, version=name)]
    if run_id is not None:
        callbacks.append(EpochEndRecord(run_id, checkpoint_dir))
        callbacks.append(StagePictures(run_id, evaluation))
        loggers.append(MetricsLogger(run_id))
    trainer_config = config.training.trainer
    trainer = L.Trainer(
        max_epochs=trainer_config.max_epochs,
        accelerator=trainer_config.accelerator,
        devices=trainer_config.devices,
        num_nodes=trainer_config.num_nodes,
        strategy=_strategy(trainer_config.strategy),
        precision=resolve_precision(trainer_config.precision, trainer_config.accelerator),
        gradient_clip_val=trainer_config.gradient_clip_val,
        accumulate_grad_batches=trainer_config.accumulate_grad_batches,
        log_every_n_steps=trainer_config.log_every_n_steps,
        val_check_interval=_unless_every_batch(trainer_config.val_check_interval),
        limit_train_batches=_unless_every_batch(trainer_config.limit_train_batches),
        limit_val_batches=_unless_every_batch(trainer_config.limit_val_batches),
        reload_dataloaders_every_n_epochs=1,
        # The data module deals each rank its own anchors (TripletItems.shard).
        use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=callbacks,
        logger=loggers,
        enable_model_summary=False,
        enable_progress_bar=on_terminal,
    )
    if resume_checkpoint is not None and resumed_run_id is not None:
        _copy_in_resumed_checkpoint(checkpoint, resume_checkpoint, resumed_run_id)
    with warnings.catch_warnings():
        # Lightning 2.6 builds torch's LeafSpec, which torch 2.13 marks deprecated: theirs to
        # fix, and it would greet every fit.
        warnings.filterwarnings(
            "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning
        )
        # A run resumed in another checkpoint folder (another machine's): ForgetUnreachableBest
        # says in one line what that costs, where Lightning's warning names both folders in full.
        warnings.filterwarnings("ignore", "The dirpath has changed from")
        # weights_only: a resumed checkpoint may come from a shared store; never unpickle code.
        with (
            another_rank_ended_in_one_line(name),
            out_of_memory_in_one_line(config, name, chain),
        ):
            trainer.fit(
                module, datamodule=datamodule, ckpt_path=resume_checkpoint, weights_only=True
            )
    return trainer, checkpoint


def _strategy(name: str) -> str | DDPStrategy:
    """The configured strategy; plain ``ddp`` lets a step leave some adapters without gradient,
    since a batch may hold no text for a channel (no code with cross-references, say), and DDP
    otherwise stops at the first such step."""
    return DDPStrategy(find_unused_parameters=True) if name == "ddp" else name


def _copy_in_resumed_checkpoint(
    checkpoint: ModelCheckpoint, resumed: Path, resumed_run_id: str
) -> None:
    """Put the checkpoints a run resumes from into its checkpoint folder, where that holds no
    copy (a run resumed on another machine): the one it resumes from as its ``last.ckpt``, and
    the best epoch's file under its name, which that one's record tells: the same file where the
    best epoch is its own, else the interrupted run's ``resume/best.ckpt``."""
    folder = Path(checkpoint.dirpath)
    folder.mkdir(parents=True, exist_ok=True)  # Lightning makes it at its first save
    state = read_checkpoint(resumed)
    best_name = Path(state["callbacks"][checkpoint.state_key]["best_model_path"]).name
    if not (folder / tracking.LAST_CHECKPOINT).is_file():
        shutil.copyfile(resumed, folder / tracking.LAST_CHECKPOINT)
    # No best yet: an epoch that validated nothing (limit_val_batches=0).
    if not best_name or (folder / best_name).is_file():
        return
    if best_name == _epoch_file_name(checkpoint, state):
        shutil.copyfile(resumed, folder / best_name)
    else:
        _fetch_best_so_far(checkpoint, resumed_run_id, best_name)


def _fetch_best_so_far(checkpoint: ModelCheckpoint, run_id: str, best_name: str) -> None:
    """Download run ``run_id``'s ``resume/best.ckpt`` into the checkpoint folder as
    ``best_name``, where it is that file: whole, and named so by its own record. Where it is
    not (a run logged before such files were, a stop during its upload), nothing is kept and
    :class:`ForgetUnreachableBest` says what that costs."""
    folder = Path(checkpoint.dirpath)
    with tempfile.TemporaryDirectory(prefix="naics-best-") as download_dir:
        downloaded = tracking.download_best_so_far(run_id, Path(download_dir))
        if downloaded is None:
            return
        try:
            record = read_checkpoint(downloaded)["callbacks"][checkpoint.state_key]
        except CheckpointError as exc:
            logger.warning("run %s: its best epoch cannot be kept: %s", run_id, exc)
            return
        if Path(record["best_model_path"]).name == best_name:
            shutil.copyfile(downloaded, folder / best_name)
            logger.info("the best epoch before the interruption, %s, is kept", best_name)


def _epoch_file_name(checkpoint: ModelCheckpoint, state: dict[str, Any]) -> str:
    """The name ``checkpoint`` gives the best file of the epoch a checkpoint ``state`` holds."""
    score = state["callbacks"][checkpoint.state_key]["current_score"]  # that epoch's val_loss
    return Path(
        checkpoint.format_checkpoint_name({"epoch": state["epoch"], "val_loss": score})
    ).name


def _keep_resumed_epoch_as_best(checkpoint: ModelCheckpoint, resumed: Path) -> None:
    """Keep the epoch a run resumed from as its best, where it trained no epoch and its best
    before the stop is not on this disk.

    That is a run stopped after its last epoch's upload but before it ended, resumed on another
    machine, where its best file was not logged (a run from before ``resume/best.ckpt``):
    Lightning restores the record of the best epoch, with the other machine's path, and trains
    nothing. The stage could never end; every retry failed to read that file.
    """
    state = read_checkpoint(resumed)
    kept = Path(checkpoint.dirpath) / _epoch_file_name(checkpoint, state)
    logger.warning(
        "the best checkpoint before the interruption, %s, is not on this disk and the stage "
        "had no epoch left to train; its last epoch, %s, is kept as its best",
        Path(checkpoint.best_model_path).name,
        kept.name,
    )
    shutil.copyfile(resumed, kept)
    checkpoint.best_model_path = str(kept)
    checkpoint.best_model_score = state["callbacks"][checkpoint.state_key]["current_score"]
