"""The LightningModule: the encoder, the contrastive loss, and the optimiser with its schedule."""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup

from naics_mlflow.config import Config
from naics_mlflow.data.tokenization import CHANNELS
from naics_mlflow.distributed import mean_over_ranks, world_size
from naics_mlflow.errors import UserError
from naics_mlflow.model.checkpoint import CHECKPOINT_FORMAT
from naics_mlflow.model.encoder import MultiChannelEncoder
from naics_mlflow.model.lorentz import pairwise_distance
from naics_mlflow.model.loss import (
    batch_contrastive_loss,
    depth_loss,
    distortion_loss,
    neighbourhood_loss,
    pool_infonce,
)
from naics_mlflow.model.moe import load_balancing_loss


class NonFiniteLossError(UserError):
    """Training diverged: the loss is NaN or infinite."""


# What autocast computes the backbone's products in, by Lightning precision.
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
# The hierarchy terms, each logged as train/<name>_loss and val/<name>_loss, weighted by
# loss.<name>_weight.
HIERARCHY_TERMS = ("distortion", "neighbourhood", "depth")
# Loss terms that only some batches or settings have.
OPTIONAL_LOSSES = ("query_loss", *(f"{term}_loss" for term in HIERARCHY_TERMS))


class NaicsEmbedder(L.LightningModule):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = Config.from_dict(config)
        self.encoder = MultiChannelEncoder(self.config.model, self.config.loss.curvature)
        if self.config.training.head_only:
            self.encoder.freeze_adapters()
        elif self.config.training.compile_backbone:
            self.encoder.compile_backbone()
        # Checkpoints hold only trainable weights; the frozen backbone comes from its name.
        self.strict_loading = False
        # What the contrastive loss masks, set by the CurriculumNegatives callback: (N, N) bool,
        # [a, j] True when code j is a positive of anchor a; (N,) k-means ids of likely false
        # negatives, or None.
        self.positive_pairs: torch.Tensor | None = None
        self.code_clusters: torch.Tensor | None = None
        self.nonfinite_steps = 0  # steps skipped for a NaN or infinite loss, this run
        self.nonfinite_in_a_row = 0
        self.skip_optimizer_step = False

    def forward(self, tokens):
        return self.encoder(tokens)

    # --- training ------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        """Under mixed precision, the frozen backbone's weights take autocast's dtype once
        (:meth:`MultiChannelEncoder.cast_frozen_linears`), not at every call. They keep it: the
        fit's evaluations read them so, and the next stage rebuilds the backbone in float32."""
        autocast_dtype = AUTOCAST_DTYPES.get(str(self.trainer.precision))
        if autocast_dtype is not None:
            self.encoder.cast_frozen_linears(autocast_dtype)

    def _encode(self, batch: dict[str, Any], prefix: str = "") -> Any:
        """The batch's codes (``prefix=""``) or queries (``"query_"``) through the encoder: from
        their precomputed features in a head-only stage, else from their tokens."""
        if f"{prefix}features" in batch:
            return self.encoder.head(batch[f"{prefix}features"])
        return self.encoder(batch[f"{prefix}tokens"])

    def _losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        encoded = self._encode(batch)
        embeddings = encoded.embeddings
        contrastive, extra = self._contrastive_loss(batch, embeddings)
        utilisation = mean_over_ranks(encoded.expert_utilisation)
        load_balancing = (
            load_balancing_loss(utilisation, encoded.mean_gate_probability)
            * self.config.model.moe.load_balancing_coef
        )
        total = contrastive + load_balancing
        if "query_targets" in batch:
            extra["query_loss"] = self._query_loss(batch, embeddings)
            total = total + self.config.loss.query_weight * extra["query_loss"]
        for name, value in self._hierarchy_losses(batch, embeddings).items():
            extra[f"{name}_loss"] = value
            total = total + getattr(self.config.loss, f"{name}_weight") * value
        return {
            "contrastive_loss": contrastive,
            "load_balancing_loss": load_balancing,
            "total_loss": total,
            "expert_utilisation": utilisation,
            **extra,
        }

    def _hierarchy_losses(
        self, batch: dict[str, Any], embeddings: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The hierarchy terms with a weight above zero, over the batch's codes.

        The two pairwise terms share one distance matrix: with every code in the batch it is
        2,125 x 2,125, and computing it with its backward pass once instead of twice took, with
        the distortion term's masking, a third off a head-only step on a CPU (docs/results.md).
        In training it holds the rows of :meth:`_hierarchy_rows` only.
        """
        loss = self.config.loss
        weighted = [name for name in HIERARCHY_TERMS if getattr(loss, f"{name}_weight") > 0]
        pairwise = "distortion" in weighted or "neighbourhood" in weighted
        if pairwise:
            rows = self._hierarchy_rows(len(embeddings), embeddings.device)
            hyperbolic = pairwise_distance(embeddings[rows], embeddings, loss.curvature)
            tree_distance = batch["tree_distance"][rows]
        terms = {
            "distortion": lambda: distortion_loss(hyperbolic, tree_distance, loss.tree_scale),
            "neighbourhood": lambda: neighbourhood_loss(
                hyperbolic, tree_distance, loss.tree_scale, loss.neighbourhood_sharpness
            ),
            "depth": lambda: depth_loss(
                embeddings, batch["parent"], loss.curvature, loss.depth_margin
            ),
        }
        return {name: terms[name]() for name in weighted}

    def _hierarchy_rows(self, size: int, device: torch.device) -> torch.Tensor | slice:
        """The codes whose rows of pairs the hierarchy terms take this step: ``loss.hierarchy_rows``
        of them drawn at random in training, else all. Each term is a mean over rows, so a random
        subset estimates it without bias, and the columns keep every code in the gradient."""
        count = self.config.loss.hierarchy_rows
        if not self.training or count is None or count >= size:
            return slice(None)
        return torch.randperm(size, device=device)[:count]

    def _contrastive_loss(
        self, batch: dict[str, Any], embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        loss = self.config.loss
        contrastive = batch_contrastive_loss(
            embeddings,
            batch["rows"],
            batch["anchor"],
            batch["positive"],
            loss.curvature,
            loss.temperature,
            self.positive_pairs,
            self.code_clusters,
            loss.hard_negative_k,
        )
        extra: dict[str, Any] = {}
        if contrastive.false_negative_fraction is not None:
            extra["false_negative_fraction"] = contrastive.false_negative_fraction
        if world_size() > 1:
            extra["global_batch"] = _global_batch_statistics(
                len(batch["anchor"]), contrastive.pool_size, embeddings, loss.hard_negative_k
            )
        return contrastive.loss, extra

    def _query_loss(self, batch: dict[str, Any], code_embeddings: torch.Tensor) -> torch.Tensor:
        """InfoNCE of each query (an index item of a batch code, encoded as free text) against the
        batch's six-digit codes: the hard negatives a search must rank it above, siblings
        included."""
        queries = self._encode(batch, "query_").embeddings
        return pool_infonce(
            queries,
            code_embeddings[batch["query_targets"]],
            code_embeddings,
            batch["query_negatives"],
            self.config.loss.curvature,
            self.config.loss.temperature,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        finite = torch.isfinite(losses["total_loss"])
        # All ranks decide together: a rank that skipped or stopped alone would leave the others
        # waiting in a collective operation.
        if mean_over_ranks(finite.float()) < 1:
            value = losses["total_loss"].item() if not finite else "non-finite on another rank"
            return self._skip_nonfinite_step(value, batch_idx)
        self.nonfinite_in_a_row = 0
        batch_size = len(batch["anchor"])
        for name in ("contrastive_loss", "load_balancing_loss", "total_loss"):
            self.log(
                f"train/{name}", losses[name], prog_bar=name == "total_loss", batch_size=batch_size
            )
        for expert, share in enumerate(losses["expert_utilisation"]):
            self.log(f"train/moe/expert_{expert}_utilisation", share, batch_size=batch_size)
        for name in ("false_negative_fraction", *OPTIONAL_LOSSES):
            if name in losses:
                self.log(f"train/{name}", losses[name], batch_size=batch_size)
        for name, value in losses.get("global_batch", {}).items():
            self.log(f"train/global_batch/{name}", value, batch_size=batch_size)
        return losses["total_loss"]

    def _skip_nonfinite_step(self, value: float | str, batch_idx: int) -> torch.Tensor:
        """Count a NaN or infinite loss and skip its optimiser step; more than
        ``training.max_nonfinite_steps`` in a row stop the stage.

        Returns a zero loss over every trainable weight: its backward pass gives zero gradients,
        so data-parallel ranks still meet in their gradient all-reduce, and
        :meth:`optimizer_step` then leaves weights and optimiser state untouched.
        """
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        training, loss = self.config.training, self.config.loss
        if self.nonfinite_in_a_row > training.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the training loss was {value} for {self.nonfinite_in_a_row} steps in a row "
                f"(epoch {self.current_epoch}, batch {batch_idx}), more than "
                f"training.max_nonfinite_steps ({training.max_nonfinite_steps}); lower "
                f"training.learning_rate (now {training.learning_rate:g}) or raise "
                f"loss.temperature (now {loss.temperature:g}); checkpoints of earlier epochs are "
                "kept"
            )
        self.skip_optimizer_step = True
        return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, except after a skipped non-finite loss: the closure (forward and
        backward) still runs, the update does not."""
        loss = optimizer_closure()
        if self.skip_optimizer_step:
            self.skip_optimizer_step = False
            return
        optimizer.step(closure=lambda: loss)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The training objective on validation batches, as ``val/objective``: it depends on the
        batch size, the loss weights and ``limit_val_batches``, so ``val_loss`` is not it (see
        ``naics_mlflow.training.callbacks.TaxonomyEvaluation``)."""
        losses = self._losses(batch)
        batch_size = len(batch["anchor"])
        log = functools.partial(self.log, batch_size=batch_size, sync_dist=True)
        log("val/objective", losses["total_loss"])
        log("val/contrastive_loss", losses["contrastive_loss"])
        for name in OPTIONAL_LOSSES:
            if name in losses:
                log(f"val/{name}", losses[name])

    # --- optimisation --------------------------------------------------------------------

    def configure_optimizers(self):
        training = self.config.training
        parameters = [p for p in self.parameters() if p.requires_grad]
        if training.optimizer == "riemannian_adam":
            # Imported here: geoopt takes 0.2 s to import, and only this optimiser needs it.
            import geoopt

            optimizer = geoopt.optim.RiemannianAdam(
                parameters, lr=training.learning_rate, weight_decay=training.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(
                parameters, lr=training.learning_rate, weight_decay=training.weight_decay
            )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        # A short run (a smoke test, a quick-start stage) still gets a cosine phase.
        warmup_steps = min(training.warmup_steps, total_steps // 2)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # --- checkpoints ---------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.encoder.trainable_state_dict()
        checkpoint["state_dict"] = {f"encoder.{name}": t for name, t in trainable.items()}
        checkpoint["naics_embedder"] = {
            "format": CHECKPOINT_FORMAT,
            "base_model_name": self.config.model.base_model_name,
            "channels": list(CHANNELS),
        }


def _global_batch_statistics(
    anchors: int, pool_size: int, embeddings: torch.Tensor, hard_negative_k: int | None
) -> dict[str, float]:
    """What a data-parallel step contrasts, for sizing ``loss.hard_negative_k`` and the batch."""
    mebibyte = 2.0**20
    point_bytes = embeddings.shape[1] * embeddings.element_size()
    kept = pool_size if hard_negative_k is None else min(hard_negative_k, pool_size)
    return {
        "global_batch_size": float(anchors * world_size()),
        "global_k_negatives": float(kept),
        "global_negatives_memory_mb": pool_size * point_bytes / mebibyte,
        "similarity_matrix_memory_mb": anchors * pool_size * embeddings.element_size() / mebibyte,
        "global_hard_negatives_used": float(kept < pool_size),
    }
