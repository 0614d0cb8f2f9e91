"""Whether a stage's training step fits in the machine's memory, judged before its run opens.

A step that trains the adapters keeps every activation of the backbone until backward. On a CPU
that memory is the machine's, and a step that needs more than there is gets the process killed by
the kernel with no line at all, minutes into the stage. So a stage that trains adapters on the
CPU first estimates its largest batch (:func:`activation_bytes` over the passes the step runs)
and, where that cannot fit, refuses with one line that names a batch size that does. A chain
asks it of every stage it will train before the first one starts.

On a GPU the estimate (bfloat16, fused attention) is looser, so no stage is refused on it. A
step that runs out of memory anyway, on a GPU or where the estimate fell short on a CPU, ends in
one line too (:func:`out_of_memory_in_one_line`), not torch's traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from naics_mlflow.config import Config, TrainerConfig
from naics_mlflow.data.census import CensusRelease
from naics_mlflow.data.curriculum import CurriculumSpec
from naics_mlflow.data.datamodule import NaicsDataModule
from naics_mlflow.data.pretrained import load_pretrained
from naics_mlflow.data.tokenization import ChannelTokens, TextRows, padding_groups
from naics_mlflow.errors import UserError, gpu_memory_refused, memory_refused, refused_amount

GB = 1e9
# Share of the available memory a planned step may take: the estimate is not exact, and the
# allocator, the data and other processes need room too. A step that needs more than all of it
# is refused; the batch size offered instead fits within this share.
MEMORY_SHARE = 0.8
# A fit's peak resident memory beyond the process, against the activations autograd keeps: the
# step's transient buffers, the allocator's free lists and validation come on top. 1.1-1.6 in
# the MiniLM steps and fits measured on 2026-12-07 (docs/results.md).
FIT_OVERHEAD = 1.5
# Enough of epoch 0 to meet its largest batches (a quick-start epoch of 111 batches varies by 9%
# around its median), in about a second on a 2-core CPU.
ESTIMATED_BATCHES = 256
CGROUP = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")


class StepMemoryError(UserError):
    """A stage whose training step needs more memory than the machine has available."""


def system_available_bytes(meminfo: Path = MEMINFO) -> int:
    """Linux's estimate of the memory it can give processes without swapping (``MemAvailable``).
    Where there is no ``/proc/meminfo`` (macOS), the free pages, or where the system does not
    count those either, all its memory: a step is then refused only where no memory of this
    machine could hold it, never where it fits."""
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024
    pages = "SC_AVPHYS_PAGES" if "SC_AVPHYS_PAGES" in os.sysconf_names else "SC_PHYS_PAGES"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages)


def cgroup_headroom_bytes(root: Path = CGROUP) -> int | None:
    """What this process's control group may still take before its limit (a container's
    ``--memory``), or None where it has none. ``/proc/meminfo`` shows the whole host's memory
    inside a container, whose limit the kernel enforces all the same.

    Page cache counts as used in the group but is given back under pressure, so its inactive
    part is left out of the usage (as ``docker stats`` does). cgroup v2 files first, then v1's.
    """
    layouts = (  # (limit, usage, statistics, inactive page cache's key)
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        (
            "memory/memory.limit_in_bytes",
            "memory/memory.usage_in_bytes",
            "memory/memory.stat",
            "total_inactive_file",
        ),
    )
    for limit_file, usage_file, stat_file, inactive_key in layouts:
        if not (root / limit_file).is_file() or not (root / usage_file).is_file():
            continue
        limit = (root / limit_file).read_text().strip()
        # v1 writes "no limit" as the largest page-aligned 64-bit number.
        if limit == "max" or int(limit) >= 2**62:
            return None
        stat_path = root / stat_file
        stat = (
            dict(line.split() for line in stat_path.read_text().splitlines())
            if stat_path.is_file()
            else {}
        )
        used = int((root / usage_file).read_text()) - int(stat.get(inactive_key, 0))
        return max(int(limit) - used, 0)
    return None


def available_bytes(device: torch.device) -> int:
    """Memory a step can still take: free GPU memory, or on a CPU the system's available memory,
    or less where the process's control group leaves less."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    headroom = cgroup_headroom_bytes()
    available = system_available_bytes()
    return available if headroom is None else min(available, headroom)


def activation_bytes(backbone_config, length: int, on_gpu: bool, dropout: bool) -> int:
    """Bytes autograd keeps for one sequence of ``length`` tokens through the backbone until
    backward, ``dropout``: with the backbone's own dropout (``model.backbone_dropout``).

    On a CPU, per layer and token six hidden-size and two intermediate-size float32 vectors and,
    with dropout, the attention's scores, probabilities, dropout mask and dropped probabilities
    (13 bytes a score and head); without it the CPU's fused attention kernel keeps no score
    matrix. On MiniLM batches of 4 to 16 anchors of the quick start's relations that came within
    2% of the tensors autograd saved (2026-12-07, docs/results.md).

    On a GPU the step runs under bfloat16 autocast and the fused attention kernels keep no score
    matrix: 2 bytes a value of 12 hidden-size and 3 intermediate-size vectors. The H200's peaks
    were two thirds of that at every set-up timed on 2026-12-04 (14.3 GB for 21.4 at 32 anchors
    in 4 passes).
    """
    c = backbone_config
    if on_gpu:
        return 2 * c.num_hidden_layers * length * (12 * c.hidden_size + 3 * c.intermediate_size)
    per_layer = 4 * length * (6 * c.hidden_size + 2 * c.intermediate_size)
    if dropout:
        per_layer += 13 * c.num_attention_heads * length**2
    return c.num_hidden_layers * per_layer


def batch_token_sets(batch: dict) -> list[ChannelTokens]:
    """The texts a collated batch runs through the backbone: its codes' and, in a stage that
    trains on queries, its query items'."""
    return [tokens for tokens in (batch["tokens"], batch.get("query_tokens")) if tokens is not None]


def passes_activation_bytes(
    token_sets: list[ChannelTokens], backbone_config, passes: int, on_gpu: bool, dropout: bool
) -> int:
    """A step's activations when each of ``token_sets`` (a batch's codes, its queries) runs as
    ``passes`` passes split where they pad least, as ``MultiChannelEncoder.encode_texts`` runs
    them."""
    return sum(
        len(rows) * activation_bytes(backbone_config, int(longest), on_gpu, dropout)
        for tokens in token_sets
        for rows, longest in padding_groups(TextRows.of(tokens).lengths, passes)
    )


def largest_step_bytes(
    datamodule: NaicsDataModule, batch_size: int, backbone_config, passes: int
) -> int:
    """The activations of the largest of epoch 0's first :data:`ESTIMATED_BATCHES` batches of
    ``batch_size`` anchors on a CPU, drawn as a fit draws them, and of no more batches than the
    fit trains on an epoch (``training.trainer.limit_train_batches``)."""
    dropout = datamodule.config.model.backbone_dropout
    items = datamodule.training_items(epoch=0)
    order = np.asarray(datamodule.epoch_order(items, epoch=0))
    limit = datamodule.config.training.trainer.limit_train_batches
    batches = min(ESTIMATED_BATCHES, batches_trained(limit, math.ceil(len(order) / batch_size)))
    largest = 0
    for start in range(0, batches * batch_size, batch_size):
        batch = datamodule.collate(items, order[start : start + batch_size])
        step = passes_activation_bytes(
            batch_token_sets(batch), backbone_config, passes, False, dropout
        )
        largest = max(largest, step)
    return largest


def batches_trained(limit: int | float, batches: int) -> int:
    """How many of an epoch's ``batches`` a fit trains on under ``limit``, Lightning's
    ``limit_train_batches``: a number of batches, or a fraction of the epoch (at least one)."""
    if isinstance(limit, float):
        return max(1, int(batches * limit))
    return min(limit, batches)


def trains_on_cpu(accelerator: str) -> bool:
    """Whether a stage of ``training.trainer.accelerator`` trains on the CPU: asked to, or left
    to ``auto`` where torch sees no GPU (one asked for where there is none is refused first)."""
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def processes_on_this_machine(trainer: TrainerConfig) -> int:
    """Training processes that share this machine's memory: one per device on a CPU."""
    return trainer.devices if isinstance(trainer.devices, int) else 1


def keeps_backbone_activations_on_cpu(config: Config) -> bool:
    """Whether a stage trains the adapters on the CPU: the only steps this module judges."""
    return not config.training.head_only and trains_on_cpu(config.training.trainer.accelerator)


def check_stage_fits_memory(
    config: Config,
    curriculum: CurriculumSpec,
    release: CensusRelease,
    raw_dir: str | None,
    chain: str | None,
) -> None:
    """:func:`check_step_fits_memory` for a stage not yet started: a chain asks it of every stage
    it will train before the first one trains, so that a later stage that cannot fit stops the
    chain in seconds, not after the hours its earlier stages take. ``chain``: the ``chain_name``
    of the chain file the stages come from, if they do."""
    if not keeps_backbone_activations_on_cpu(config):
        return
    datamodule = NaicsDataModule(config, curriculum, release, raw_dir)
    datamodule.prepare_data()
    datamodule.setup()
    backbone_config = load_pretrained(AutoConfig, config.model.base_model_name)
    check_step_fits_memory(config, datamodule, backbone_config, chain=chain)


def check_step_fits_memory(
    config: Config,
    datamodule: NaicsDataModule,
    backbone_config,
    available: int | None = None,
    chain: str | None = None,
) -> None:
    """Raise :class:`StepMemoryError` where a stage that trains the adapters on the CPU has a
    batch whose step needs more than ``available`` bytes (by default what this machine has
    available now, beyond what the process already holds). The line names the largest batch
    size that fits within :data:`MEMORY_SHARE` of it, or head-only training where none does, to
    be set under the stage's overrides in the file of ``chain`` where the stage is one of its."""
    if not keeps_backbone_activations_on_cpu(config):
        return
    if available is None:
        available = available_bytes(torch.device("cpu"))
    processes = processes_on_this_machine(config.training.trainer)
    passes = config.model.length_buckets

    def needed(batch_size: int) -> int:
        activations = largest_step_bytes(datamodule, batch_size, backbone_config, passes)
        return int(processes * FIT_OVERHEAD * activations)

    batch_size = config.data_loader.batch_size
    need = needed(batch_size)
    if need <= available:
        return
    # The largest batch size that fits with room to spare: a step's codes grow with its anchors,
    # not in proportion.
    fits, too_large = 0, batch_size
    while too_large - fits > 1:
        middle = (fits + too_large) // 2
        if needed(middle) <= MEMORY_SHARE * available:
            fits = middle
        else:
            too_large = middle
    stage = datamodule.curriculum.name
    settings = [f"data_loader.batch_size={fits} (about {needed(fits) / GB:.1f} GB)"] if fits else []
    settings.append("training.head_only=true")
    remedy = ("" if fits else "no batch size fits; ") + "set " + " or ".join(settings)
    if chain is not None:
        remedy += f" in chain {chain}'s file, under stage {stage}'s overrides"
    on = f"the CPU in {processes} processes" if processes > 1 else "the CPU"
    raise StepMemoryError(
        f"stage {stage} trains the backbone's adapters on {on}, and its largest batch of "
        f"data_loader.batch_size={batch_size} needs about {need / GB:.1f} GB for the step where "
        f"this machine has {available / GB:.1f} GB available; {remedy}, or train on a GPU"
    )


@contextlib.contextmanager
def out_of_memory_in_one_line(config: Config, stage: str, chain: str | None) -> Iterator[None]:
    """Raise :class:`StepMemoryError` where the fit inside runs out of memory: the batch size is
    the setting to change, and torch's traceback (pages of it, through Lightning's loops) does
    not say so. ``chain``: as for :func:`check_step_fits_memory`."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not memory_refused(exc):
            raise
        raise StepMemoryError(_out_of_memory_line(config, stage, chain, exc)) from exc


def _out_of_memory_line(
    config: Config, stage: str, chain: str | None, exc: RuntimeError | MemoryError
) -> str:
    # Which memory ran out is the error's to say: a stage on a GPU can run out of the machine's
    # own memory too, where a bigger GPU would not help.
    gpu_memory = gpu_memory_refused(exc)
    on_cpu = not gpu_memory and trains_on_cpu(config.training.trainer.accelerator)
    batch_size = config.data_loader.batch_size
    # Half is a first step down, not a promise: what a smaller batch needs depends on its texts.
    settings = (
        [f"a smaller data_loader.batch_size ({batch_size // 2}, say)"] if batch_size > 1 else []
    )
    if on_cpu and not config.training.head_only:
        settings.append("training.head_only=true")
    remedy = "set " + " or ".join(settings) if settings else "no smaller batch is left"
    if chain is not None and settings:
        remedy += f" in chain {chain}'s file, under stage {stage}'s overrides"
    if gpu_memory:
        where, elsewhere = "GPU memory", "a GPU with more memory"
    elif on_cpu:
        where, elsewhere = "memory on the CPU", "a GPU"
    else:
        where, elsewhere = "the machine's memory (not the GPU's)", "a machine with more memory"
    return (
        f"stage {stage} ran out of {where} while it trained at "
        f"data_loader.batch_size={batch_size}{refused_amount(exc)}; its MLflow run is FAILED; "
        f"{remedy}, or train on {elsewhere}"
    )
