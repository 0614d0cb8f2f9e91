"""The LightningModule: the encoder, the contrastive loss, and the optimiser with its schedule."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import geoopt
import lightning as L
import numpy as np
import torch

from naics_mlflow.config import Config, merge
from naics_mlflow.data.features import CodeFeatures
from naics_mlflow.data.tokenization import CHANNELS
from naics_mlflow.data.validation import VALIDATION_TEMPERATURE
from naics_mlflow.distributed import gather_across_ranks, mean_over_ranks, world_size
from naics_mlflow.errors import UserError
from naics_mlflow.evaluation.metrics import hierarchy_metrics, sample_codes
from naics_mlflow.model.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_compatible,
    read_checkpoint,
)
from naics_mlflow.model.encoder import MultiChannelEncoder
from naics_mlflow.model.lorentz import logmap0
from naics_mlflow.model.loss import (
    candidate_infonce,
    depth_loss,
    distortion_loss,
    false_negative_mask,
    hardest_negatives,
    hyperbolic_infonce,
    kmeans_clusters,
    neighbourhood_loss,
    pool_negative_mask,
    pooled_infonce,
)
from naics_mlflow.model.moe import load_balancing_loss


class NonFiniteLossError(UserError):
    """Training diverged: the loss is NaN or infinite."""


# Codes per pass of the head when embedding the whole taxonomy without gradients.
EMBED_BATCH_SIZE = 1024
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
        # Checkpoints hold only trainable weights; the frozen backbone comes from its name.
        self.strict_loading = False
        self.code_clusters: torch.Tensor | None = None  # (N,) k-means ids for false negatives
        # (N, N) bool, [a, j] True when code j is a positive of anchor a: masks global negatives.
        self.positive_pairs: torch.Tensor | None = None
        self.nonfinite_steps = 0  # steps skipped for a NaN or infinite loss, this run
        self.nonfinite_in_a_row = 0
        self.skip_optimizer_step = False
        # Rows and embeddings of the codes the last validation epoch evaluated (for pictures).
        self.last_evaluated: tuple[np.ndarray, torch.Tensor] | None = None

    def forward(self, tokens):
        return self.encoder(tokens)

    # --- training ------------------------------------------------------------------------

    def _encode(self, batch: dict[str, Any], prefix: str = "") -> Any:
        """The batch's codes (``prefix=""``) or queries (``"query_"``) through the encoder: from
        their precomputed features in a head-only stage, else from their tokens."""
        if f"{prefix}features" in batch:
            return self.encoder.head(batch[f"{prefix}features"])
        return self.encoder(batch[f"{prefix}tokens"])

    def _losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        encoded = self._encode(batch)
        embeddings = encoded.embeddings
        if world_size() > 1:
            contrastive, extra = self._global_contrastive_loss(batch, embeddings)
        else:
            contrastive, extra = self._local_contrastive_loss(batch, embeddings)
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
        """The hierarchy terms with a weight above zero, over the batch's codes."""
        loss = self.config.loss
        terms = {
            "distortion": lambda: distortion_loss(
                embeddings, batch["tree_distance"], loss.curvature, loss.tree_scale
            ),
            "neighbourhood": lambda: neighbourhood_loss(
                embeddings,
                batch["tree_distance"],
                loss.curvature,
                loss.tree_scale,
                loss.neighbourhood_sharpness,
            ),
            "depth": lambda: depth_loss(
                embeddings, batch["parent"], loss.curvature, loss.depth_margin
            ),
        }
        return {name: term() for name, term in terms.items() if getattr(loss, f"{name}_weight") > 0}

    def _local_contrastive_loss(
        self, batch: dict[str, Any], embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each anchor against its own sampled negatives and the batch's other positives."""
        loss_config = self.config.loss
        anchor = embeddings[batch["anchor"]]
        positive = embeddings[batch["positive"]]
        negatives = embeddings[batch["negatives"]]
        valid = batch["negative_valid"]
        extra = {}
        if self.code_clusters is not None:
            negative_clusters = self.code_clusters[batch["negative_rows"].clamp(min=0)]
            anchor_clusters = self.code_clusters[batch["anchor_rows"]]
            false_negatives = valid & false_negative_mask(anchor_clusters, negative_clusters)
            extra["false_negative_fraction"] = false_negatives.sum() / valid.sum().clamp(min=1)
            valid = valid & ~false_negatives
        if loss_config.hard_negative_k is not None:
            keep, valid = hardest_negatives(
                anchor, negatives, valid, loss_config.hard_negative_k, loss_config.curvature
            )
            negatives = negatives.gather(1, keep.unsqueeze(-1).expand(-1, -1, negatives.shape[-1]))
        contrastive = hyperbolic_infonce(
            anchor,
            positive,
            negatives,
            loss_config.curvature,
            loss_config.temperature,
            negative_valid=valid,
            in_batch_negatives=batch["in_batch_negatives"],
        )
        return contrastive, extra

    def _global_contrastive_loss(
        self, batch: dict[str, Any], embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Global negatives: each anchor against every positive and sampled negative of every
        rank's batch (or the ``loss.hard_negative_k`` nearest of them), gathered so that the
        gradient reaches the rank each one came from."""
        loss_config = self.config.loss
        anchor = embeddings[batch["anchor"]]
        positive = embeddings[batch["positive"]]
        local_pool = torch.cat([positive, embeddings[batch["negatives"]].flatten(0, 1)])
        pool = gather_across_ranks(local_pool)
        pool_rows = gather_across_ranks(
            torch.cat([batch["positive_rows"], batch["negative_rows"].flatten()])
        )
        valid = pool_negative_mask(
            batch["anchor_rows"], batch["positive_rows"], pool_rows, self.positive_pairs
        )
        extra: dict[str, Any] = {}
        if self.code_clusters is not None:
            false_negatives = valid & false_negative_mask(
                self.code_clusters[batch["anchor_rows"]],
                self.code_clusters[pool_rows.clamp(min=0)].unsqueeze(0),
            )
            extra["false_negative_fraction"] = false_negatives.sum() / valid.sum().clamp(min=1)
            valid = valid & ~false_negatives
        k = loss_config.hard_negative_k
        contrastive = pooled_infonce(
            anchor, positive, pool, valid, loss_config.curvature, loss_config.temperature, k
        )
        mebibyte = 2.0**20
        extra["global_batch"] = {
            "global_batch_size": float(len(anchor) * world_size()),
            "global_k_negatives": float(len(pool) if k is None else min(k, len(pool))),
            "global_negatives_memory_mb": pool.numel() * pool.element_size() / mebibyte,
            "similarity_matrix_memory_mb": len(anchor) * len(pool) * pool.element_size() / mebibyte,
            "global_hard_negatives_used": float(k is not None and k < len(pool)),
        }
        return contrastive, extra

    def _query_loss(self, batch: dict[str, Any], code_embeddings: torch.Tensor) -> torch.Tensor:
        """InfoNCE of each query (an index item of a batch code, encoded as free text) against the
        batch's six-digit codes: the hard negatives a search must rank it above, siblings
        included."""
        queries = self._encode(batch, "query_").embeddings
        return candidate_infonce(
            queries,
            code_embeddings,
            batch["query_targets"],
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
        :meth:`on_validation_epoch_end`)."""
        losses = self._losses(batch)
        batch_size = len(batch["anchor"])
        log = functools.partial(self.log, batch_size=batch_size, sync_dist=True)
        log("val/objective", losses["total_loss"])
        log("val/contrastive_loss", losses["contrastive_loss"])
        for name in OPTIONAL_LOSSES:
            if name in losses:
                log(f"val/{name}", losses[name])

    # --- whole-taxonomy passes -----------------------------------------------------------

    @torch.no_grad()
    def embed_codes(self, features: CodeFeatures, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), D+1) embeddings of codes from their channel features, in eval mode."""
        was_training = self.training
        self.eval()
        rows = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        chunks = []
        for chunk in rows.split(EMBED_BATCH_SIZE):
            features_of = {c: t.to(self.device) for c, t in features.of_codes(chunk).items()}
            chunks.append(self.encoder.head(features_of).embeddings)
        self.train(was_training)
        return torch.cat(chunks)

    def _embed_current(self, rows: np.ndarray) -> torch.Tensor:
        """Embeddings of the codes at ``rows`` with the weights as they are now: from a head-only
        stage's precomputed features, else from a backbone pass over those codes' texts only."""
        datamodule = self.trainer.datamodule
        if datamodule.code_features is not None:
            return self.embed_codes(datamodule.code_features, rows)
        features = self.encoder.code_features(datamodule.tokens.subset(rows))
        return self.embed_codes(features, np.arange(len(rows)))

    def on_fit_start(self) -> None:
        positive_pairs = self.trainer.datamodule.sampler.positive_candidates
        self.positive_pairs = torch.from_numpy(positive_pairs).to(self.device)

    def on_train_epoch_start(self) -> None:
        loss_config = self.config.loss
        start = loss_config.fn_curriculum_start_epoch
        epoch = self.current_epoch
        if start is None or epoch < start:
            return
        if (epoch - start) % loss_config.fn_cluster_every_n_epochs == 0:
            datamodule = self.trainer.datamodule
            rows = np.arange(datamodule.taxonomy.size)
            tangent = logmap0(self._embed_current(rows), loss_config.curvature)
            clusters = min(loss_config.fn_num_clusters, len(rows))
            self.code_clusters = kmeans_clusters(tangent, clusters, seed=self.config.training.seed)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        datamodule = self.trainer.datamodule
        taxonomy = datamodule.taxonomy
        sample = sample_codes(
            taxonomy.size, self.config.model.eval_sample_size, self.config.training.seed
        )
        validation = datamodule.validation_set
        rows = np.union1d(sample, validation.rows)
        embedded = self._embed_current(rows)

        def embeddings_of(codes: np.ndarray) -> torch.Tensor:
            return embedded[torch.from_numpy(np.searchsorted(rows, codes))]

        metrics = hierarchy_metrics(
            embeddings_of(sample),
            taxonomy.distance[np.ix_(sample, sample)],
            taxonomy.levels[sample],
            self.config.loss.curvature,
        )
        valid = validation.negatives >= 0
        # Padding points at the anchor itself: finite coordinates, masked out of the softmax.
        negatives = np.where(valid, validation.negatives, validation.anchor[:, None])
        val_loss = hyperbolic_infonce(
            embeddings_of(validation.anchor),
            embeddings_of(validation.positive),
            embeddings_of(negatives),
            self.config.loss.curvature,
            VALIDATION_TEMPERATURE,
            negative_valid=torch.from_numpy(valid).to(embedded.device),
        )
        # The same on every rank (each embeds the same codes); synced all the same, so that every
        # rank's checkpoint callback sees exactly one value.
        self.log_dict(metrics, sync_dist=True)
        self.log("val_loss", val_loss, sync_dist=True, prog_bar=True)
        self.last_evaluated = (sample, embeddings_of(sample).cpu())

    # --- optimisation --------------------------------------------------------------------

    def configure_optimizers(self):
        training = self.config.training
        parameters = [p for p in self.parameters() if p.requires_grad]
        if training.optimizer == "riemannian_adam":
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

        def warmup_then_cosine(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine)
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


def load_trainable_weights(module: NaicsEmbedder, path: Path) -> None:
    """Initialise ``module``'s adapters, experts and projection from a checkpoint's weights."""
    _load_state(module, check_compatible(path, module.config), path)


def _load_state(module: NaicsEmbedder, checkpoint: dict[str, Any], path: Path) -> None:
    saved = {k.removeprefix("encoder."): v for k, v in checkpoint["state_dict"].items()}
    expected = module.encoder.trainable_state_dict()
    for name in sorted(set(saved) | set(expected)):
        if name not in saved or name not in expected or saved[name].shape != expected[name].shape:
            raise CheckpointError(
                f"{path} does not fit this model at '{name}'; use the configuration it was "
                "trained with"
            )
    module.encoder.load_state_dict(saved, strict=False)


def load_embedder(path: Path, backbone_location: str | None = None) -> NaicsEmbedder:
    """The trained model in a checkpoint, built from the configuration saved with it, in eval
    mode: what ``embed``, ``search``, ``evaluate`` and the served model use.

    ``backbone_location`` loads the same backbone from another place (the copy a served model
    carries) instead of the name the checkpoint records.
    """
    checkpoint = read_checkpoint(path)
    tree = checkpoint["hyper_parameters"]["config"]
    if backbone_location is not None:
        tree = merge(tree, {"model": {"base_model_name": backbone_location}})
    config = Config.from_dict(tree, f"the config saved in {path}")
    module = NaicsEmbedder(config.to_dict())
    _load_state(module, checkpoint, path)
    return module.eval()
