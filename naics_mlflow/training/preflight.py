"""What would stop a stage or a chain as it starts, checked by the command line before the
training stack (Lightning and MLflow: several seconds of imports) is loaded and before the
tracking store is opened: a setting this machine cannot run, or a folder it cannot write, then
fails in a couple of seconds and leaves no store or run behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from naics_mlflow.config import Config, TrainerConfig
from naics_mlflow.errors import UserError


class UnwritableFolderError(UserError):
    """A folder a stage writes to (checkpoints, logs) that cannot be made or written."""


def check_stage_can_start(config: Config) -> None:
    """Raise a :class:`UserError` for what would stop a stage with ``config`` as it starts:
    GPUs the machine does not have, nodes that cannot find each other, or ``dirs.checkpoints``
    or ``dirs.outputs`` (the TensorBoard logs) that cannot be made and written."""
    _check_gpus(config.training.trainer)
    _check_nodes(config.training.trainer)
    _check_writable(Path(config.dirs.checkpoints), "checkpoints", "dirs.checkpoints")
    _check_writable(Path(config.dirs.outputs), "TensorBoard logs", "dirs.outputs")


def check_chain_can_start(configs: Sequence[Config]) -> None:
    """:func:`check_stage_can_start` for each stage's config, in order, and the device the last
    one's ``search.device`` names: the chain ends by building its model for search there, and a
    device that cannot should fail now, not after hours of training."""
    from naics_mlflow.model.merged import inference_device  # loads transformers: chains only

    for config in configs:
        check_stage_can_start(config)
    inference_device(configs[-1].search.device)


def _check_gpus(trainer: TrainerConfig) -> None:
    """Lightning would fail inside the run, with a traceback, on GPUs that are not there."""
    asks_for_gpus = trainer.accelerator in ("gpu", "cuda")
    available = torch.cuda.device_count()
    if asks_for_gpus and available == 0:
        raise UserError(
            f"training.trainer.accelerator is {trainer.accelerator}, but torch sees no CUDA GPU "
            "on this machine; set it to auto (a GPU where there is one, else the CPU) or cpu"
        )
    on_gpus = asks_for_gpus or (trainer.accelerator == "auto" and available > 0)
    if on_gpus and isinstance(trainer.devices, int) and trainer.devices > available:
        raise UserError(
            f"training.trainer.devices is {trainer.devices}, but this machine has {available} "
            f"CUDA GPU(s); set it to {available} or fewer"
        )


def _check_nodes(trainer: TrainerConfig) -> None:
    """Several machines find node 0 through ``MASTER_ADDR`` or a job scheduler's environment;
    with neither, Lightning's default (this machine) makes rank 0 wait for the others forever,
    printing nothing."""
    if trainer.num_nodes == 1 or "MASTER_ADDR" in os.environ:
        return
    # Lightning's own detection of the schedulers it supports; imported only here, where the
    # answer is needed, as importing it loads Lightning whole.
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    schedulers = (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment, MPIEnvironment)
    if any(scheduler.detect() for scheduler in schedulers):
        return
    raise UserError(
        f"training.trainer.num_nodes is {trainer.num_nodes}, but nothing tells this process "
        "where node 0 is (no MASTER_ADDR, nor a SLURM, torchrun, LSF or MPI job), so it would "
        "wait for the other nodes forever; start the command on every node with MASTER_ADDR "
        "(node 0's address), MASTER_PORT and NODE_RANK set, or set training.trainer.num_nodes=1"
    )


def _check_writable(folder: Path, what: str, setting: str) -> None:
    """Make ``folder`` and write a file in it: a folder the stage cannot use should cost seconds,
    not a trained epoch and a FAILED run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UnwritableFolderError(
            f"cannot write {what} to {folder} ({exc.strerror or type(exc).__name__}); set "
            f"{setting} to a writable folder"
        ) from exc
