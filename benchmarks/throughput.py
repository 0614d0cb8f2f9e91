"""Training throughput against the seed's design, inference speed, and memory.

    python benchmarks/throughput.py                       # CPU, MiniLM, batch 8, 5 timed steps
    python benchmarks/throughput.py --device cuda --json
    python benchmarks/throughput.py --batch-size 1 --negatives 8          # a 24 GB, 2-core CPU
    python benchmarks/throughput.py --skip-seed --length-buckets 2 8      # other numbers of passes
    python benchmarks/throughput.py --skip-seed --compile        # and with the backbone compiled
    python benchmarks/throughput.py --skip-seed --without-backbone-dropout  # adapters' dropout only
    python benchmarks/throughput.py --skip-seed model.lora.r=16           # KEY=VALUE overrides
    python benchmarks/throughput.py --skip-seed --skip-inference --profile 20   # op profile

Two training set-ups run in this one process on the same backbone, curriculum, batch of anchors
and number of negatives per anchor. The project's steps each take the next batch of a fit's
first epoch, as a fit's steps do, none repeating an earlier step's: every step has other codes,
so its passes have new shapes, and a step repeated on one batch would hide what a new shape
costs (on the H200, cuDNN's attention built a graph for each). The seed's step repeats the first
batch.

- ``seed``: the seed's design, re-created here. Four deep copies of the backbone, each with its
  own LoRA; every text padded to 512 tokens; every item of every triplet (anchor, positive,
  negatives) encoded on its own, with no reuse across the batch; the loss scores each anchor
  against its own sampled negatives only. Two choices are generous to it: the texts are tokenized
  once before timing, and each triplet's items go through a copy as one batch, backpropagated
  triplet by triplet (the seed's peak memory would be higher, not its speed).
- ``project``: this project's own step (``NaicsEmbedder`` on a ``NaicsDataModule`` batch): one
  backbone with four adapters, every channel's texts in ``model.length_buckets`` passes of
  similar length, each distinct code encoded once per step, in-batch negatives and the free-text
  query loss. It also runs as it ran before each of three changes, and the report gives each
  speed-up: ``project, one pass per channel`` (each channel's texts a pass of their own, padded
  to the channel's longest) and, on a GPU, ``project, frozen weights cast per call`` (before a
  mixed-precision fit cast the frozen backbone's weights once to bfloat16, autocast cast them at
  every call) and ``project, cuDNN attention allowed`` (before attention was kept off cuDNN's
  kernel, :mod:`naics_mlflow.model.attention`). ``--length-buckets`` times it with other
  numbers of passes (``project, length_buckets K``), ``--larger-batches`` at more anchors
  (``project, batch N``), ``--without-backbone-dropout`` with only the adapters' dropout
  (``project, backbone dropout off``: ``model.backbone_dropout`` false), and ``--compile`` last
  with the backbone compiled (``project, compiled backbone``: ``training.compile_backbone``; the
  time its first step spends compiling is reported apart).

On a CPU the seed's design needs more memory than most machines have: one triplet with 24
negatives is 104 sequences of 512 tokens whose activations autograd keeps at once, about 35 GB.
So before anything heavy runs, the benchmark estimates each set-up's memory (see
:func:`activation_bytes`) against what the machine has available, and scales the set-up down
until both fit: fewer negatives for both set-ups while the seed's does not fit (its peak depends
on the negatives, not the batch), then fewer anchors while the project's does not. It says what
it scaled and why before it starts (on stderr) and in its report, so a set-up that still runs out
of memory is never a silent death.

Both share the fusion (mixture of experts), the Lorentz projection and the hyperbolic InfoNCE.
Reported per set-up: anchor-negative pairs scored per second, sequences encoded per second,
seconds per optimizer step (median of the timed steps, warm-up excluded), peak memory and, on
a GPU, the share of the step the GPU is busy (:func:`gpu_busy_fraction`); then the ratio
project / seed. Each set-up's figures are also printed on stderr as it finishes, so that a run
stopped early keeps them. The project set-up runs first, so the process's peak resident memory
after it is its own. Then inference with the (untrained) project model: ``embed`` of all 2,125
codes and single-query ``search`` latency against precomputed code embeddings.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch
from inference import embed_seconds, latencies_ms  # benchmarks/inference.py, beside this file
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend

from naics_mlflow.config import load_config
from naics_mlflow.data.census import load_release
from naics_mlflow.data.curriculum import load_curriculum
from naics_mlflow.data.datamodule import NaicsDataModule
from naics_mlflow.data.features import mean_pool, pool_by_owner
from naics_mlflow.data.taxonomy import HOLDOUT_FILE
from naics_mlflow.data.tokenization import CHANNELS, ChannelTokens, channel_texts
from naics_mlflow.evaluation.retrieval import SearchEngine
from naics_mlflow.model import attention
from naics_mlflow.model.attention import SHAPE_AGNOSTIC_BACKENDS
from naics_mlflow.model.encoder import (
    MultiChannelEncoder,
    load_frozen_backbone,
    own_dropout_layers,
)
from naics_mlflow.model.lora import ChannelAdaptedBackbone
from naics_mlflow.model.loss import pool_infonce
from naics_mlflow.model.module import AUTOCAST_DTYPES, NaicsEmbedder
from naics_mlflow.training.memory import (
    FIT_OVERHEAD,
    GB,
    MEMORY_SHARE,
    activation_bytes,
    available_bytes,
    batch_token_sets,
    passes_activation_bytes,
)

REPO = Path(__file__).resolve().parents[1]
SEED_MAX_LENGTH = 512
SEARCH_QUERIES = 200
# Batches a step takes in turn, the set-ups one after another: more than all their steps
# together (57 with gpu_step.sh's flags), so that, as in a fit, no step repeats an earlier one's
# batch and shapes.
DISTINCT_BATCHES = 100


@dataclasses.dataclass
class StepCounts:
    pairs: int  # anchor-negative pairs the loss scored
    sequences: int  # texts run through the backbone


@dataclasses.dataclass
class SetupResult:
    name: str
    step_seconds: float
    pairs_per_second: float
    sequences_per_second: float
    mean_tokens: float
    peak_rss_mb: float
    peak_cuda_mb: float | None
    gpu_busy_fraction: float | None  # see gpu_busy_fraction()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The project trains in mixed precision on a GPU; every set-up gets the same.
AUTOCAST_DTYPE = AUTOCAST_DTYPES["bf16-mixed"]
# The project's step as it was before a fit cast the frozen weights once: autocast casts them at
# every call.
PER_CALL_CASTS = "project, frozen weights cast per call"
# The project's step as it ran before 2026-12-03: each channel's texts in a pass of their own.
PASS_PER_CHANNEL = "project, one pass per channel"
# The project's step as it ran before 2026-12-04: its attention free to take cuDNN's kernel, which
# builds a graph for each new shape (naics_mlflow.model.attention).
CUDNN_ATTENTION = "project, cuDNN attention allowed"
# The project's step with model.backbone_dropout false.
NO_BACKBONE_DROPOUT = "project, backbone dropout off"
# The project's step with training.compile_backbone.
COMPILED = "project, compiled backbone"


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPE, enabled=device.type == "cuda")


def to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor | ChannelTokens):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    return value


def time_steps(
    step: Callable[[], StepCounts], warmup: int, steps: int, device: torch.device
) -> tuple[list[float], list[StepCounts]]:
    """Seconds and counts of ``steps`` timed optimizer steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    seconds, counts = [], []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        counts.append(step())
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds, counts


def measure(
    name: str,
    step: Callable[[], StepCounts],
    mean_tokens: float,
    args: argparse.Namespace,
    device: torch.device,
) -> SetupResult:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, counts = time_steps(step, args.warmup, args.steps, device)
    on_cuda = device.type == "cuda"
    median = statistics.median(seconds)
    result = SetupResult(
        name=name,
        step_seconds=median,
        pairs_per_second=sum(c.pairs for c in counts) / sum(seconds),
        sequences_per_second=sum(c.sequences for c in counts) / sum(seconds),
        mean_tokens=mean_tokens,
        peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else None,
        gpu_busy_fraction=gpu_busy_fraction(step, median, device) if on_cuda else None,
    )
    tell(f"throughput: {json.dumps(dataclasses.asdict(result))}")
    return result


def gpu_busy_fraction(
    step: Callable[[], StepCounts], step_seconds: float, device: torch.device
) -> float:
    """The share of a step's time that the GPU spends running its work: the durations of one
    step's kernels, copies and fills as the torch profiler records them, over the median step
    time measured without the profiler (whose own host overhead would lengthen the step). A step
    whose host launches work slower than the GPU runs it scores well below 1."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        synchronize(device)
    device_events = [e for e in profiler.events() if e.device_type == DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in device_events) / 1e6 / step_seconds


# --- memory ------------------------------------------------------------------------------------


def on_gpu(module: torch.nn.Module) -> bool:
    return next(module.parameters()).device.type == "cuda"


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def seed_bytes(module: NaicsEmbedder, negatives: int) -> int:
    """The seed's peak beyond the process: four backbone copies, and one triplet's
    ``(2 + negatives) x 4`` sequences of 512 tokens (it backpropagates triplet by triplet)."""
    backbone = module.encoder.backbone
    sequences = (2 + negatives) * len(CHANNELS)
    return len(CHANNELS) * parameter_bytes(backbone) + sequences * activation_bytes(
        backbone.config, SEED_MAX_LENGTH, on_gpu(module), dropout=True
    )


def project_bytes(
    module: NaicsEmbedder, batch: dict, pass_counts: list[int], pass_per_channel: bool
) -> int:
    """The project's step beyond the process, padded as the most padded of the ways it is to
    run: every channel's texts in each of ``pass_counts`` passes, and one pass per channel if
    ``pass_per_channel``. On a CPU with what a fit holds beyond the activations
    (``FIT_OVERHEAD``); the GPU's estimate is already above its peaks."""
    config = module.encoder.backbone.config
    gpu = on_gpu(module)
    dropout = module.config.model.backbone_dropout
    token_sets = batch_token_sets(batch)
    ways = [
        passes_activation_bytes(token_sets, config, count, gpu, dropout) for count in pass_counts
    ]
    if pass_per_channel:
        ways.append(
            sum(
                texts.input_ids.shape[0]
                * activation_bytes(config, texts.input_ids.shape[1], gpu, dropout)
                for tokens in token_sets
                for texts in tokens.texts.values()
            )
        )
    return int(max(ways) * (1 if gpu else FIT_OVERHEAD))


def seed_negatives_that_fit(module: NaicsEmbedder, negatives: int, budget: float) -> int:
    """The most negatives, up to ``negatives``, whose seed set-up fits ``budget``; 0 if none."""
    while negatives > 0 and seed_bytes(module, negatives) > budget:
        negatives -= 1
    return negatives


def tell(message: str) -> None:
    """A line on stderr at once, so that it is there even if the process is killed later."""
    print(message, file=sys.stderr, flush=True)


# --- the project's step ------------------------------------------------------------------------


def adamw(module: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=learning_rate)


def first_batches(
    datamodule: NaicsDataModule, items, order: np.ndarray, size: int, count: int
) -> list[tuple[dict, int]]:
    """Up to ``count`` consecutive batches of ``size`` anchors (at least one) as a fit's first
    epoch takes them, each with its anchor-sampled-negative pairs: the seed's unit of work (the
    project's loss scores each anchor against every code of the batch, which is more).

    Every step of a fit has other codes, so its passes have shapes of their own; a step timed
    on one batch over and over would hide what a new shape costs (a GPU kernel's set-up, say).
    """
    starts = range(0, max(len(order) - size, 0) + 1, size)[:count]
    return [
        (
            datamodule.collate(items, order[start : start + size]),
            int((items.negatives[order[start : start + size]] >= 0).sum()),
        )
        for start in starts
    ]


def project_step(module: NaicsEmbedder, batches: list[tuple[dict, int]], device: torch.device):
    """The project's training step, on each of ``batches`` in turn (the next call the next
    batch, whichever set-up makes it); returns (step, mean real tokens per sequence)."""
    optimizer = adamw(module, module.config.training.learning_rate)
    turns = []
    real_tokens = 0
    for batch, pairs in batches:
        texts = [
            text_batch
            for tokens in (batch["tokens"], batch.get("query_tokens"))
            if tokens is not None
            for text_batch in tokens.texts.values()
        ]
        sequences = sum(len(text_batch.owner) for text_batch in texts)
        real_tokens += sum(int(text_batch.attention_mask.sum()) for text_batch in texts)
        turns.append((to_device(batch, device), StepCounts(pairs=pairs, sequences=sequences)))
    cycle = itertools.cycle(turns)

    def step() -> StepCounts:
        batch, counts = next(cycle)
        with autocast(device):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return counts

    return step, real_tokens / sum(counts.sequences for _, counts in turns)


@contextlib.contextmanager
def cudnn_attention_allowed():
    """The backbone's attention free to take cuDNN's kernel too, as before 2026-12-04: PyTorch's
    first choice on Hopper GPUs."""
    with mock.patch.object(
        attention, "SHAPE_AGNOSTIC_BACKENDS", [*SHAPE_AGNOSTIC_BACKENDS, SDPBackend.CUDNN_ATTENTION]
    ):
        yield


@contextlib.contextmanager
def one_pass_per_channel(encoder: MultiChannelEncoder):
    """``encoder`` computes its channel features as it did before its passes mixed the channels:
    one pass per channel that has texts, padded to that channel's longest."""

    def channel_features(tokens: ChannelTokens) -> dict[str, torch.Tensor]:
        features = {}
        for index, channel in enumerate(CHANNELS):
            texts = tokens.texts[channel]
            channel_of_row = torch.full_like(texts.owner, index)
            pooled = torch.zeros((0, encoder.hidden_size), device=texts.owner.device)
            if len(texts.owner):
                hidden = encoder.backbone(texts.input_ids, texts.attention_mask, channel_of_row)
                pooled = mean_pool(hidden, texts.attention_mask)
            features[channel] = pool_by_owner(pooled, texts.owner, tokens.size)
        return features

    encoder.channel_features = channel_features
    try:
        yield
    finally:
        del encoder.channel_features


@contextlib.contextmanager
def backbone_dropout_off(encoder: MultiChannelEncoder):
    """``encoder`` trains as with ``model.backbone_dropout`` false: only the adapters drop out."""
    layers = own_dropout_layers(encoder.backbone)
    rates = [layer.p for layer in layers]
    for layer in layers:
        layer.p = 0.0
    try:
        yield
    finally:
        for layer, rate in zip(layers, rates, strict=True):
            layer.p = rate


def profile(step: Callable[[], StepCounts], device: torch.device, rows: int) -> str:
    """The torch profiler's table of one step's costliest ops (by self time on the device)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


# --- the seed's design -------------------------------------------------------------------------


class SeedEncoder(torch.nn.Module):
    """Four backbone copies, one LoRA each; fusion and projection borrowed from the project."""

    def __init__(self, project: NaicsEmbedder) -> None:
        super().__init__()
        model_config = project.config.model
        backbone = load_frozen_backbone(model_config.base_model_name, model_config.backbone_dropout)
        self.copies = torch.nn.ModuleDict(
            {
                channel: ChannelAdaptedBackbone(
                    copy.deepcopy(backbone), project.config.model, (channel,)
                )
                for channel in CHANNELS
            }
        )
        self.fusion = copy.deepcopy(project.encoder.fusion)
        self.projection = copy.deepcopy(project.encoder.projection)

    def forward(self, tokens: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        pooled = [
            mean_pool(self.copies[c](ids, mask, torch.zeros_like(ids[:, 0])), mask)
            for c, (ids, mask) in ((c, tokens[c]) for c in CHANNELS)
        ]
        return self.projection(self.fusion(torch.cat(pooled, dim=-1)).output)


def seed_step(
    project: NaicsEmbedder,
    datamodule: NaicsDataModule,
    batch: dict,
    sampled_negatives: np.ndarray,
    device,
):
    """The seed's step on the same anchors, positives and sampled negatives (``(B, K)`` code
    rows, -1 for padding) as ``batch``."""
    encoder = SeedEncoder(project).to(device)
    optimizer = adamw(encoder, project.config.training.learning_rate)
    tokenizer = datamodule.tokenizer
    # The seed read a code's index items as one text.
    texts = {
        **channel_texts(datamodule.taxonomy),
        "examples": ["; ".join(items) for items in datamodule.taxonomy.examples],
    }
    rows = batch["rows"].numpy()
    anchors, positives = batch["anchor_rows"].numpy(), batch["positive_rows"].numpy()
    # Per anchor: code rows of (anchor, positive, valid negatives...).
    triplets = [
        np.array([anchor, positive, *negatives[negatives >= 0]])
        for anchor, positive, negatives in zip(anchors, positives, sampled_negatives, strict=True)
    ]
    padded = {
        channel: tokenizer(
            [texts[channel][row] for row in rows],
            padding="max_length",
            truncation=True,
            max_length=SEED_MAX_LENGTH,
            return_tensors="pt",
        )
        for channel in CHANNELS
    }
    position = {row: i for i, row in enumerate(rows.tolist())}
    triplet_tokens = [
        {
            channel: tuple(
                padded[channel][key][[position[row] for row in triplet]].to(device)
                for key in ("input_ids", "attention_mask")
            )
            for channel in CHANNELS
        }
        for triplet in triplets
    ]
    temperature = project.config.loss.temperature
    curvature = project.config.loss.curvature
    sequences = sum(len(triplet) for triplet in triplets) * len(CHANNELS)
    pairs = sum(len(triplet) - 2 for triplet in triplets)

    def step() -> StepCounts:
        for tokens in triplet_tokens:
            with autocast(device):
                embeddings = encoder(tokens)
            negatives = torch.ones(1, len(embeddings) - 2, dtype=torch.bool, device=device)
            loss = pool_infonce(
                embeddings[:1], embeddings[1:2], embeddings[2:], negatives, curvature, temperature
            )
            (loss / len(triplet_tokens)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepCounts(pairs=pairs, sequences=sequences)

    real = sum(
        int(padded[c]["attention_mask"][[position[r] for r in t]].sum())
        for c in CHANNELS
        for t in triplets
    )
    return step, real / sequences


# --- inference ---------------------------------------------------------------------------------


def inference(module: NaicsEmbedder, datamodule: NaicsDataModule, data_dir: Path):
    """(codes embedded per second, search p50 ms, search p95 ms), measured as
    ``benchmarks/inference.py`` measures a trained model."""
    taxonomy = datamodule.taxonomy
    engine = SearchEngine.build(module, taxonomy, module.config.search)
    codes_per_second = taxonomy.size / embed_seconds(module, engine, taxonomy)
    queries = pd.read_parquet(data_dir / HOLDOUT_FILE)["text"].tolist()[:SEARCH_QUERIES]
    engine.search(queries[:5])  # warm-up
    wall = latencies_ms(lambda query: engine.search([query]), queries)[:, 0]
    p50, p95 = np.percentile(wall, [50, 95])
    return codes_per_second, float(p50), float(p95)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backbone", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=8, help="anchors per step")
    parser.add_argument(
        "--larger-batches",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also time the project's step at these numbers of anchors (where they fit)",
    )
    parser.add_argument(
        "--length-buckets",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help="also time the project's step with its texts in K passes (model.length_buckets)",
    )
    parser.add_argument(
        "--without-backbone-dropout",
        action="store_true",
        help="also time the project's step with only the adapters' dropout "
        "(model.backbone_dropout false)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="last, also time the project's step with its backbone compiled "
        "(training.compile_backbone)",
    )
    parser.add_argument("--negatives", type=int, default=24, help="sampled negatives per anchor")
    parser.add_argument("--curriculum", default="03_stage")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--raw-dir", default=os.environ.get("NAICS_RAW_DIR"))
    parser.add_argument("--skip-seed", action="store_true", help="only the project's set-up")
    parser.add_argument("--skip-inference", action="store_true", help="only training steps")
    parser.add_argument(
        "--profile", type=int, metavar="N", help="print the N costliest ops of one project step"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    if any(size < 1 for size in args.larger_batches):
        parser.error(f"--larger-batches takes numbers of anchors >= 1, got {args.larger_batches}")
    if any(count < 1 for count in args.length_buckets):
        parser.error(f"--length-buckets takes numbers of passes >= 1, got {args.length_buckets}")
    device = torch.device(args.device)
    torch.manual_seed(0)

    config = load_config(
        REPO / "conf" / "config.yaml",
        [
            f"model.base_model_name={args.backbone}",
            f"data_loader.batch_size={args.batch_size}",
            f"dirs.data={args.data_dir}",
            *args.overrides,
        ],
    )
    module = NaicsEmbedder(config.to_dict()).to(device)
    budget = MEMORY_SHARE * available_bytes(device)
    scaled = []
    negatives = args.negatives
    if not args.skip_seed:
        negatives = seed_negatives_that_fit(module, args.negatives, budget)
        if negatives == 0:
            raise SystemExit(
                f"the seed's set-up needs {seed_bytes(module, 1) / GB:.1f} GB even with one "
                f"negative, {budget / GB:.1f} GB can be used here; run with --skip-seed"
            )
        if negatives < args.negatives:
            scaled.append(
                f"negatives {args.negatives} -> {negatives}: the seed's set-up needs "
                f"{seed_bytes(module, args.negatives) / GB:.1f} GB at {args.negatives}, "
                f"{budget / GB:.1f} GB can be used here"
            )
    curriculum = dataclasses.replace(
        load_curriculum(REPO / "conf" / "text_curriculum" / f"{args.curriculum}.yaml"),
        n_negatives=negatives,
    )
    datamodule = NaicsDataModule(config, curriculum, load_release(), args.raw_dir)
    datamodule.prepare_data()
    datamodule.setup()
    # What the CurriculumNegatives callback hands the module when a stage trains.
    module.positive_pairs = torch.from_numpy(datamodule.sampler.positive_candidates).to(device)
    items = datamodule.training_items(epoch=0)
    # Batches as the first of a fit's epoch draws them: consecutive items share their anchor, so
    # the first items alone would hold a tenth of the codes (and texts) a real batch holds.
    order = np.asarray(datamodule.epoch_order(items, epoch=0))
    batch_size = args.batch_size
    batch = datamodule.collate(items, order[:batch_size])
    pass_counts = [module.encoder.length_buckets, *args.length_buckets]
    while batch_size > 1 and project_bytes(module, batch, pass_counts, True) > budget:
        batch_size //= 2
        batch = datamodule.collate(items, order[:batch_size])
    if batch_size < args.batch_size:
        scaled.append(
            f"batch {args.batch_size} -> {batch_size}: the project's step needs more than "
            f"{budget / GB:.1f} GB at a larger batch"
        )
    tell(
        f"throughput: batch {batch_size} x {negatives} negatives; estimated peak beyond the "
        f"process: project {project_bytes(module, batch, pass_counts, True) / GB:.1f} GB"
        + ("" if args.skip_seed else f", seed {seed_bytes(module, negatives) / GB:.1f} GB")
        + f"; {budget / GB:.1f} GB usable"
        + "".join(f"\nthroughput: scaled down, {line}" for line in scaled)
    )

    results = []
    sampled_negatives = items.negatives[order[:batch_size]]
    step, mean_tokens = project_step(
        module, first_batches(datamodule, items, order, batch_size, DISTINCT_BATCHES), device
    )
    if device.type == "cuda":
        results.append(measure(PER_CALL_CASTS, step, mean_tokens, args, device))
        module.encoder.cast_frozen_linears(AUTOCAST_DTYPE)  # what a mixed-precision fit does
    with one_pass_per_channel(module.encoder):
        results.append(measure(PASS_PER_CHANNEL, step, mean_tokens, args, device))
    results.append(measure("project", step, mean_tokens, args, device))
    if device.type == "cuda":
        with cudnn_attention_allowed():
            results.append(measure(CUDNN_ATTENTION, step, mean_tokens, args, device))
    for size in args.larger_batches:
        if size > len(items):
            tell(f"throughput: batch {size} skipped: the curriculum has {len(items)} anchors")
            continue
        larger = datamodule.collate(items, order[:size])
        if project_bytes(module, larger, [module.encoder.length_buckets], False) > budget:
            tell(f"throughput: batch {size} skipped: its step needs more than {budget / GB:.1f} GB")
            continue
        larger_step, larger_tokens = project_step(
            module, first_batches(datamodule, items, order, size, DISTINCT_BATCHES), device
        )
        results.append(measure(f"project, batch {size}", larger_step, larger_tokens, args, device))
    # After the larger batches, whose pairs/s are the goal's measure: a run stopped by a time
    # limit loses these first.
    default_buckets = module.encoder.length_buckets
    for buckets in args.length_buckets:
        module.encoder.length_buckets = buckets
        results.append(
            measure(f"project, length_buckets {buckets}", step, mean_tokens, args, device)
        )
    module.encoder.length_buckets = default_buckets
    if args.without_backbone_dropout:
        with backbone_dropout_off(module.encoder):
            results.append(measure(NO_BACKBONE_DROPOUT, step, mean_tokens, args, device))
    compile_seconds = None
    if args.compile:
        module.encoder.compile_backbone()
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        compile_seconds = time.perf_counter() - start
        tell(f"throughput: the compiled backbone's first step took {compile_seconds:.1f} s")
        results.append(measure(COMPILED, step, mean_tokens, args, device))
    if args.profile:
        print(profile(step, device, args.profile))
    if not args.skip_seed:
        step, mean_tokens = seed_step(module, datamodule, batch, sampled_negatives, device)
        results.append(measure("seed", step, mean_tokens, args, device))

    report = {
        "machine": machine(device),
        "backbone": args.backbone,
        "batch_size": batch_size,
        "negatives": negatives,
        "scaled_down": scaled,
        "timed_steps": args.steps,
        "overrides": args.overrides,
        "setups": [dataclasses.asdict(r) for r in results],
    }
    if not args.skip_inference:
        codes_per_second, p50, p95 = inference(module, datamodule, args.data_dir)
        report["embed_codes_per_second"] = codes_per_second
        report["embed_all_codes_seconds"] = datamodule.taxonomy.size / codes_per_second
        report["search_p50_ms"] = p50
        report["search_p95_ms"] = p95
    pairs_per_second = {r.name: r.pairs_per_second for r in results}
    if "seed" in pairs_per_second:
        report["ratio_pairs_per_second"] = pairs_per_second["project"] / pairs_per_second["seed"]
    if PER_CALL_CASTS in pairs_per_second:
        report["cast_once_speed_up"] = (
            pairs_per_second["project"] / pairs_per_second[PER_CALL_CASTS]
        )
    report["mixed_passes_speed_up"] = (
        pairs_per_second["project"] / pairs_per_second[PASS_PER_CHANNEL]
    )
    if CUDNN_ATTENTION in pairs_per_second:
        report["shape_agnostic_attention_speed_up"] = (
            pairs_per_second["project"] / pairs_per_second[CUDNN_ATTENTION]
        )
    if NO_BACKBONE_DROPOUT in pairs_per_second:
        report["backbone_dropout_off_speed_up"] = (
            pairs_per_second[NO_BACKBONE_DROPOUT] / pairs_per_second["project"]
        )
    if COMPILED in pairs_per_second:
        report["compile_first_step_seconds"] = compile_seconds
        report["compiled_speed_up"] = pairs_per_second[COMPILED] / pairs_per_second["project"]
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"{report['machine']}, {args.backbone}, batch {batch_size}, "
        f"{negatives} negatives, median of {args.steps} steps"
    )
    for line in scaled:
        print(f"scaled down to fit memory: {line}")
    width = max(len(r.name) for r in results)
    header = f"{'set-up':{width}} {'pairs/s':>10} {'seq/s':>10} {'s/step':>9} {'tokens':>7}"
    header += f" {'RSS MB':>8}"
    print(header + (f" {'CUDA MB':>8} {'GPU busy':>8}" if device.type == "cuda" else ""))
    for r in results:
        line = (
            f"{r.name:{width}} {r.pairs_per_second:10.1f} {r.sequences_per_second:10.1f} "
            f"{r.step_seconds:9.3f} {r.mean_tokens:7.1f} {r.peak_rss_mb:8.0f}"
        )
        if r.peak_cuda_mb is not None:
            line += f" {r.peak_cuda_mb:8.0f} {r.gpu_busy_fraction:8.0%}"
        print(line)
    if "ratio_pairs_per_second" in report:
        print(f"pairs/s ratio project/seed: {report['ratio_pairs_per_second']:.1f}x")
    if "cast_once_speed_up" in report:
        print(f"frozen weights cast once, against per call: {report['cast_once_speed_up']:.2f}x")
    print(
        "all channels in length_buckets passes, against one pass per channel: "
        f"{report['mixed_passes_speed_up']:.2f}x"
    )
    if "shape_agnostic_attention_speed_up" in report:
        print(
            "attention without cuDNN's kernel, against with it: "
            f"{report['shape_agnostic_attention_speed_up']:.2f}x"
        )
    if "backbone_dropout_off_speed_up" in report:
        print(
            "only the adapters' dropout, against the backbone's too: "
            f"{report['backbone_dropout_off_speed_up']:.2f}x"
        )
    if "compiled_speed_up" in report:
        print(
            f"compiled backbone, against eager: {report['compiled_speed_up']:.2f}x (its first "
            f"step, compiling, {report['compile_first_step_seconds']:.1f} s)"
        )
    if "search_p95_ms" in report:
        print(
            f"embed all {datamodule.taxonomy.size} codes: {report['embed_all_codes_seconds']:.1f} s"
            f" ({report['embed_codes_per_second']:.0f} codes/s)"
        )
        print(
            "search, single queries against precomputed codes: "
            f"p50 {report['search_p50_ms']:.1f} ms, p95 {report['search_p95_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
