"""Work done at stage and epoch boundaries, as Lightning callbacks."""

from __future__ import annotations

import logging
import math
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from naics_mlflow import stopping, tracking
from naics_mlflow.data.datamodule import NaicsDataModule
from naics_mlflow.data.features import CHANNEL_FEATURES_CACHE
from naics_mlflow.data.taxonomy import MIN_LEVEL, submatrix
from naics_mlflow.data.validation import VALIDATION_TEMPERATURE
from naics_mlflow.distributed import note_launched_ranks, stop_launched_ranks
from naics_mlflow.evaluation.metrics import hierarchy_metrics, sample_codes
from naics_mlflow.evaluation.plots import (
    curve_panels,
    poincare_disk_figure,
    save_png,
    training_curves_figure,
)
from naics_mlflow.model.checkpoint import read_checkpoint
from naics_mlflow.model.lorentz import logmap0
from naics_mlflow.model.loss import kmeans_clusters, pool_infonce
from naics_mlflow.model.module import NaicsEmbedder

logger = logging.getLogger(__name__)


class PrecomputedFeatures(L.Callback):
    """A head-only stage: every code's and index item's channel features, computed once by the
    frozen backbone and adapters when fitting starts (or read from ``dirs.outputs``, where an
    earlier command with the same adapters cached them), replace the backbone in every batch.

    The features are exact, not an approximation: nothing before the fusion trains in such a
    stage. A step then costs the head alone, so a CPU runs thousands of them where the backbone
    allows dozens (linear probing before fine-tuning, Kumar et al. 2022).
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        started = time.perf_counter()
        cache_dir = Path(pl_module.config.dirs.outputs) / CHANNEL_FEATURES_CACHE
        datamodule.code_features = pl_module.encoder.code_features(
            datamodule.tokens, item_queries=True, cache_dir=cache_dir
        )
        logger.info(
            "head-only stage: features of %d codes and %d index items ready in %.1f s",
            len(datamodule.tokens.code_items),
            len(datamodule.tokens.item_ids),
            time.perf_counter() - started,
        )


def embed_current(
    module: NaicsEmbedder, datamodule: NaicsDataModule, rows: np.ndarray
) -> torch.Tensor:
    """``(len(rows), D + 1)`` embeddings of the codes at ``rows`` with the weights as they are
    now: from a head-only stage's precomputed features, else from a backbone pass over those
    codes' texts only."""
    if datamodule.code_features is not None:
        return module.encoder.embed_codes(datamodule.code_features, rows)
    features = module.encoder.code_features(datamodule.tokens.subset(rows))
    return module.encoder.embed_codes(features, np.arange(len(rows)))


class CurriculumNegatives(L.Callback):
    """What the contrastive loss masks in a batch's pool besides padding.

    When fitting starts: every code's positives in this curriculum, which are never negatives.
    From epoch ``loss.fn_curriculum_start_epoch`` on, every ``loss.fn_cluster_every_n_epochs``
    epochs: k-means clusters of the current embeddings, whose members are likely false negatives
    of each other (an anchor's cluster is masked too).
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: NaicsEmbedder) -> None:
        positive_pairs = trainer.datamodule.sampler.positive_candidates
        pl_module.positive_pairs = torch.from_numpy(positive_pairs).to(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: NaicsEmbedder) -> None:
        loss = pl_module.config.loss
        start, epoch = loss.fn_curriculum_start_epoch, trainer.current_epoch
        if start is None or epoch < start or (epoch - start) % loss.fn_cluster_every_n_epochs:
            return
        rows = np.arange(trainer.datamodule.taxonomy.size)
        tangent = logmap0(embed_current(pl_module, trainer.datamodule, rows), loss.curvature)
        clusters = min(loss.fn_num_clusters, len(rows))
        pl_module.code_clusters = kmeans_clusters(tangent, clusters, pl_module.config.training.seed)


class TaxonomyEvaluation(L.Callback):
    """At each validation epoch end, from one embedding pass over the codes they mention: the
    hierarchy metrics (``val/spearman``, ...) of a seeded sample of ``model.eval_sample_size``
    codes, and ``val_loss``, the fixed measure of ``data/validation.py`` that checkpoints and
    ``--from-checkpoint <stage>`` compare.

    Keeps the sample's embeddings (``last_evaluated``) for the stage's Poincaré picture, and the
    figures with the epoch they are of (``figures``) for every checkpoint: the best file then
    carries its own epoch's figures (:func:`checkpoint_figures`), where the trainer's, once the
    stage ends, are its last epoch's.
    """

    def __init__(self) -> None:
        self.last_evaluated: tuple[np.ndarray, torch.Tensor] | None = None
        self.figures: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: NaicsEmbedder) -> None:
        if trainer.sanity_checking:
            return
        config, datamodule = pl_module.config, trainer.datamodule
        taxonomy, validation = datamodule.taxonomy, datamodule.validation_set
        sample = sample_codes(taxonomy.size, config.model.eval_sample_size, config.training.seed)
        rows = np.union1d(sample, validation.rows)
        embedded = embed_current(pl_module, datamodule, rows)

        def embeddings_of(codes: np.ndarray) -> torch.Tensor:
            return embedded[torch.from_numpy(np.searchsorted(rows, codes))]

        metrics = hierarchy_metrics(
            embeddings_of(sample),
            submatrix(taxonomy.distance, sample),
            taxonomy.levels[sample],
            config.loss.curvature,
        )
        val_loss = pool_infonce(
            embeddings_of(validation.anchor),
            embeddings_of(validation.positive),
            embedded,
            torch.from_numpy(validation.negative_mask(rows)).to(embedded.device),
            config.loss.curvature,
            VALIDATION_TEMPERATURE,
        )
        # The same on every rank (each embeds the same codes); synced all the same, so that every
        # rank's checkpoint callback sees exactly one value.
        pl_module.log_dict(metrics, sync_dist=True)
        pl_module.log("val_loss", val_loss, sync_dist=True, prog_bar=True)
        self.last_evaluated = (sample, embeddings_of(sample).cpu())
        self.figures = {
            **{name: float(value) for name, value in metrics.items()},
            "val_loss": float(val_loss),
            "epoch": float(trainer.current_epoch),
            "step": float(trainer.global_step),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"figures": dict(self.figures)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.figures = dict(state_dict["figures"])


def checkpoint_figures(path: Path) -> dict[str, float]:
    """The validation figures of the epoch a checkpoint was saved at (``epoch``, ``step``,
    ``val_loss``, ``val/spearman``, ...); empty for a checkpoint written before they were
    recorded (``step`` since 2026-12-06)."""
    # Lightning files a callback's state under its class's qualified name (``state_key``).
    state = read_checkpoint(path)["callbacks"].get(TaxonomyEvaluation.__qualname__, {})
    return dict(state.get("figures", {}))


class StagePictures(L.Callback):
    """When a stage's training ends, ``plots/training_curves.png`` and
    ``plots/embeddings_poincare.png`` (the codes the last validation epoch evaluated) in its run
    (rank 0)."""

    def __init__(self, run_id: str, evaluation: TaxonomyEvaluation) -> None:
        self.run_id = run_id
        self.evaluation = evaluation

    def on_train_end(self, trainer: L.Trainer, pl_module: NaicsEmbedder) -> None:
        if not trainer.is_global_zero:
            return
        keys = [metric for panel in curve_panels() for metric, _ in panel.series]
        history = tracking.metric_history(self.run_id, keys)
        figures = {"training_curves.png": training_curves_figure(history)}
        if self.evaluation.last_evaluated is not None:
            taxonomy = trainer.datamodule.taxonomy
            rows, embeddings = self.evaluation.last_evaluated
            sectors = {
                code: title
                for code, title, level in zip(
                    taxonomy.codes, taxonomy.titles, taxonomy.levels, strict=True
                )
                if level == MIN_LEVEL
            }
            figures["embeddings_poincare.png"] = poincare_disk_figure(
                embeddings,
                [taxonomy.codes[row] for row in rows],
                taxonomy.levels[rows],
                sectors,
                pl_module.config.loss.curvature,
            )
        with tempfile.TemporaryDirectory(prefix="naics-plots-") as folder:
            for name, figure in figures.items():
                tracking.log_artifact(save_png(figure, Path(folder) / name), "plots")


class StageProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, drawn on stdout, without Lightning's ``v_num``: for two loggers,
    the last four characters of their versions joined, which name nothing."""

    def get_metrics(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class EpochSummary(L.Callback):
    """Where stdout is not a terminal (a ``mlflow run`` log, a CI job, ``nohup``, results sent
    to a file): one log line per epoch with stage, epoch, the last training loss, ``val_loss``,
    Spearman and seconds. A bar redraws one line with carriage returns, so such a file would
    keep its every state, or its last, among the results. Rank 0 alone writes, once per epoch,
    after validation.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
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
    """A resumed stage: point the record of the best epoch at its file on this disk
    (:func:`find_best_on_this_disk`), or forget it where there is none.

    Resuming restores the checkpoint callback's record of the best epoch, but its file may be
    gone: a run resumed on another machine finds it only where the interrupted run logged it
    (``resume/best.ckpt``, logged since 2026-12-06, or ``last.ckpt`` itself), and Lightning
    restores the record's val_loss only when the checkpoint folder is the interrupted run's.
    Keeping such a record would end the stage naming a file that does not exist, or one that
    cannot be compared; forgetting it lets the resumed epochs choose a best that does.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        best, score = checkpoint.best_model_path, checkpoint.best_model_score
        if find_best_on_this_disk(checkpoint):
            return
        if score is None:
            problem = "came without its val_loss (another checkpoint folder)"
        else:
            problem = f"(val_loss {float(score):.4f}), is not on this disk"
        logger.warning(
            "the best checkpoint before the interruption, %s %s; the best of the resumed epochs "
            "is kept instead",
            Path(best).name,
            problem,
        )
        checkpoint.best_model_path = ""
        checkpoint.best_model_score = None
        checkpoint.best_k_models = {}
        checkpoint.kth_best_model_path = ""
        checkpoint.kth_value = torch.tensor(math.inf)


def find_best_on_this_disk(checkpoint: ModelCheckpoint) -> bool:
    """True where the restored record of the best epoch names a file on this disk and its
    val_loss, if need be once pointed at the file of the same name in the run's checkpoint
    folder, with the val_loss that file records; False where there is no such file.

    A run resumed on another machine restores the first machine's path and no val_loss. Its new
    folder holds the best file when the checkpoint it resumed from is the best epoch's, or when
    the interrupted run logged that epoch as ``resume/best.ckpt`` (``stage.py`` puts it there as
    the run starts).
    """
    best, score = checkpoint.best_model_path, checkpoint.best_model_score
    if not best or (Path(best).is_file() and score is not None):
        return True
    here = Path(checkpoint.dirpath) / Path(best).name
    if not here.is_file():
        return False
    score = read_checkpoint(here)["callbacks"][checkpoint.state_key]["best_model_score"]
    checkpoint.best_model_path = checkpoint.kth_best_model_path = str(here)
    checkpoint.best_model_score = checkpoint.kth_value = score
    checkpoint.best_k_models = {str(here): score}
    return True


class CommandSigtermHandler(L.Callback):
    """Keep the command's own SIGTERM handler through the fit, in place of Lightning's.

    Lightning installs its handler at each fit, after ``on_fit_start``. Under DDP that handler
    broadcasts from inside the signal handler: rank 0 then waits there for the other ranks while
    they wait for it in the step's all-reduce, and a ``kill`` of the leading process hung the
    chain until gloo's 30-minute timeout. The command's handler stops a fit as Ctrl-C does, which
    Lightning ends on every rank with the runs KILLED. Put back at the first hook after
    Lightning's (the sanity check, or training when there is none); Lightning itself restores the
    command's handler when the fit ends.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._handler = signal.getsignal(signal.SIGTERM)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signal.signal(signal.SIGTERM, self._handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signal.signal(signal.SIGTERM, self._handler)


class StopBetweenSteps(L.Callback):
    """From the first training step to the end of the fit, a first Ctrl-C or SIGTERM stops
    training before the next training step, after the next validation step or at the fit's end,
    never inside a step (:mod:`naics_mlflow.stopping` says why). Epoch-end work (metrics,
    checkpoints and their upload) finishes first."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stopping.wait_for_step_boundaries(True)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        stopping.stop_if_asked()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        stopping.stop_if_asked()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stopping.wait_for_step_boundaries(False)
        stopping.stop_if_asked()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        stopping.wait_for_step_boundaries(False)


class StopLaunchedRanksFirst(L.Callback):
    """When a fit stops on an exception (Ctrl-C or SIGTERM included), kill the ranks this process
    launched before Lightning's clean-up closes its connections
    (:func:`~naics_mlflow.distributed.stop_launched_ranks`)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        note_launched_ranks()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        stop_launched_ranks()
