"""Lightning's side of the MLflow record: a logger for metrics and a callback for checkpoints,
both writing through :mod:`naics_mlflow.tracking` into a run this project opened."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from naics_mlflow import tracking
from naics_mlflow.model.checkpoint import read_checkpoint
from naics_mlflow.training.callbacks import checkpoint_figures

# A stage's summary is its best epoch's: the weights it ships and a chain passes on are that
# epoch's, where the trainer's figures at the end are the last epoch's.
BEST_EPOCH_FIGURES = ("epoch", "val/spearman", "val/ndcg_at_10", "val/mean_distortion")
SUMMARY_METRICS = ("best_val_loss", *(f"best/{name}" for name in BEST_EPOCH_FIGURES))


class MetricsLogger(Logger):
    """Lightning logger that sends metrics to an MLflow run this project opened and will close.

    Lightning's own MLFlowLogger ends the run when training stops, before the best checkpoint is
    uploaded; a run must only read FINISHED once its checkpoints are there.
    """

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self._run_id = run_id

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self._run_id

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        tracking.log_metric_batch(self._run_id, metrics, step or 0)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Parameters are logged once, flattened, as the run starts (``tracking.log_params``)."""


class EpochEndRecord(Checkpoint):
    """At every epoch end, log the best epoch's summary so far (``SUMMARY_METRICS``) and upload
    ``last.ckpt``: a running or interrupted run shows its best, and an interrupted one loses at
    most the epoch it was in. Where the best epoch is an earlier one, upload it first as
    ``resume/best.ckpt``: a run resumed on another machine then keeps it, where it used to keep
    only the best of the epochs it trained itself.

    A :class:`Checkpoint` so that Lightning calls it after the other callbacks at an epoch's end,
    and after the ``ModelCheckpoint`` callbacks listed before it, which update the best and write
    that epoch's ``last.ckpt``. As a plain callback it ran first and uploaded the epoch before's:
    a run resumed on a machine without the first one's checkpoint folder repeated a finished
    epoch.
    """

    def __init__(self, run_id: str, checkpoint_dir: Path) -> None:
        self._run_id = run_id
        self._last = checkpoint_dir / tracking.LAST_CHECKPOINT
        self._best_so_far_logged = ""  # the best file last uploaded as resume/best.ckpt

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        checkpoint = trainer.checkpoint_callback
        if checkpoint.best_model_score is not None:
            best = Path(checkpoint.best_model_path)
            figures = checkpoint_figures(best)  # the best file, read once an epoch
            metrics = best_epoch_metrics(checkpoint, figures)
            tracking.log_metric_batch(self._run_id, metrics, trainer.global_step)
            # Before last.ckpt: the store then never holds a last.ckpt past the best epoch
            # without that epoch's file, whenever the process stops. Not where the best is the
            # validation just saved: last.ckpt is that one.
            saved_now = figures.get("step") == trainer.global_step
            if not saved_now and str(best) != self._best_so_far_logged:
                tracking.log_best_so_far(self._run_id, best)
                self._best_so_far_logged = str(best)
        if self._last.is_file():
            log_verified_checkpoint(self._run_id, self._last)


def log_verified_checkpoint(run_id: str, path: Path) -> None:
    """Upload a checkpoint under ``ckpt/`` once it reads back whole, so that the store never holds
    a checkpoint a resumed run could not load (Lightning itself writes to a temporary name and
    renames)."""
    read_checkpoint(path)
    tracking.log_checkpoint(run_id, path)


def best_epoch_metrics(
    checkpoint: ModelCheckpoint, figures: Mapping[str, float]
) -> dict[str, float]:
    """``SUMMARY_METRICS`` of the best epoch so far: its ``val_loss`` and, where its file records
    them (``figures``, :func:`checkpoint_figures` of that file), its figures
    (``best/val/spearman``, ...); empty before there is a best."""
    if checkpoint.best_model_score is None:
        return {}
    metrics = {"best_val_loss": float(checkpoint.best_model_score)}
    metrics.update(
        {f"best/{name}": figures[name] for name in BEST_EPOCH_FIGURES if name in figures}
    )
    return metrics
