"""Work done at stage and epoch boundaries, as Lightning callbacks."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import lightning as L
import torch

logger = logging.getLogger(__name__)


class PrecomputedFeatures(L.Callback):
    """A head-only stage: every code's and index item's channel features, computed once by the
    frozen backbone and adapters when fitting starts, replace the backbone in every batch.

    The features are exact, not an approximation: nothing before the fusion trains in such a
    stage. A step then costs the head alone, so a CPU runs thousands of them where the backbone
    allows dozens (linear probing before fine-tuning, Kumar et al. 2022).
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        started = time.perf_counter()
        datamodule.code_features = pl_module.encoder.code_features(datamodule.tokens)
        logger.info(
            "head-only stage: features of %d codes and %d index items computed in %.1f s",
            len(datamodule.tokens.code_items),
            len(datamodule.tokens.item_ids),
            time.perf_counter() - started,
        )


class EpochSummary(L.Callback):
    """One log line per epoch where no progress bar is seen (a ``mlflow run`` log, a CI job,
    ``nohup``): stage, epoch, the last training loss, ``val_loss``, Spearman and seconds.

    A progress bar redraws one line with carriage returns, so such a log keeps only its final
    state; rank 0 alone writes, once per epoch, after validation.
    """

    def __init__(self, stage: str, enabled: bool | None = None) -> None:
        self.stage = stage
        self.enabled = not sys.stderr.isatty() if enabled is None else enabled
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        metrics = trainer.callback_metrics

        def value(name: str) -> str:
            return f"{float(metrics[name]):.4f}" if name in metrics else "-"

        logger.info(
            "stage %s epoch %d/%d: train_loss %s, val_loss %s, spearman %s, %.1f s",
            self.stage,
            trainer.current_epoch + 1,
            trainer.max_epochs,
            value("train/total_loss"),
            value("val_loss"),
            value("val/spearman"),
            time.perf_counter() - self._started,
        )


class ForgetUnreachableBest(L.Callback):
    """A resumed stage: forget a best checkpoint that is not on this disk.

    Resuming restores the checkpoint callback's record of the best epoch, but its file may be
    gone: the run may resume on another machine (``last.ckpt`` comes from the store, the best
    file is uploaded only when the stage ends), or the process may have died between saving a
    better epoch (which deletes the previous best) and uploading ``last.ckpt``. Keeping that
    record would end the stage naming a file that does not exist; forgetting it lets the resumed
    epochs choose a best that does.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        if not checkpoint.best_model_path or Path(checkpoint.best_model_path).is_file():
            return
        logger.warning(
            "the best checkpoint before the interruption, %s (val_loss %.4f), is not on this "
            "disk; the best of the resumed epochs is kept instead",
            Path(checkpoint.best_model_path).name,
            float(checkpoint.best_model_score),
        )
        checkpoint.best_model_path = ""
        checkpoint.best_model_score = None
        checkpoint.best_k_models = {}
        checkpoint.kth_best_model_path = ""
        checkpoint.kth_value = torch.tensor(math.inf)
