"""A LoRA step's memory on the CPU: what the memory check estimates, what autograd keeps for
backward, and the step's peak resident memory (docs/results.md, "A LoRA step's memory").

    python benchmarks/step_memory.py                                # MiniLM, 8 to 32 anchors
    python benchmarks/step_memory.py --batch-sizes 8 16 --curriculum finetune --data-dir data

Each batch size runs with the backbone's dropout on and off, each in a fresh process, so that one
step's peak is not hidden by an earlier, larger one. A process takes the first batch of epoch 0,
as a fit draws it, and reports:

- ``estimate``: the activations :mod:`naics_mlflow.training.memory` counts for the batch;
- ``saved``: the bytes of the tensors autograd keeps for backward in the step's forward pass,
  counted with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once);
- ``peak``: resident memory at its highest through forward and backward, beyond what the process
  held before the step.

A set-up whose step would need more than the machine has available (``FIT_OVERHEAD`` times the
estimate) is skipped with a line saying so, rather than run into the kernel's out-of-memory kill.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from naics_mlflow.config import load_config
from naics_mlflow.data.census import load_release
from naics_mlflow.data.curriculum import load_curriculum
from naics_mlflow.data.datamodule import NaicsDataModule
from naics_mlflow.model.module import NaicsEmbedder
from naics_mlflow.training.memory import (
    FIT_OVERHEAD,
    GB,
    available_bytes,
    batch_token_sets,
    passes_activation_bytes,
)

REPO = Path(__file__).resolve().parents[1]


def resident_bytes() -> tuple[int, int]:
    """This process's resident memory now and at its highest (``VmRSS``, ``VmHWM``)."""
    status = Path("/proc/self/status").read_text()
    now, highest = (
        int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")
    )
    return now * 1024, highest * 1024


def one_step(args: argparse.Namespace, batch_size: int, dropout: bool) -> dict:
    """One training step of epoch 0's first batch, in this process; its figures."""
    config = load_config(
        REPO / "conf" / "config.yaml",
        [
            f"dirs.data={args.data_dir}",
            f"data_loader.batch_size={batch_size}",
            f"model.backbone_dropout={str(dropout).lower()}",
        ],
    )
    curriculum = load_curriculum(REPO / "conf" / "text_curriculum" / f"{args.curriculum}.yaml")
    datamodule = NaicsDataModule(config, curriculum, load_release(), args.raw_dir)
    datamodule.prepare_data()
    datamodule.setup()
    module = NaicsEmbedder(config.to_dict()).train()
    # What the CurriculumNegatives callback hands the module when a stage trains.
    module.positive_pairs = torch.from_numpy(datamodule.sampler.positive_candidates)
    items = datamodule.training_items(epoch=0)
    batch = datamodule.collate(
        items, np.asarray(datamodule.epoch_order(items, epoch=0))[:batch_size]
    )
    estimate = passes_activation_bytes(
        batch_token_sets(batch),
        module.encoder.backbone.config,
        config.model.length_buckets,
        False,
        dropout,
    )
    figures = {"batch_size": batch_size, "dropout": dropout, "estimate_gb": estimate / GB}
    available = available_bytes(torch.device("cpu"))
    if FIT_OVERHEAD * estimate > available:
        return {
            **figures,
            "skipped": f"needs about {FIT_OVERHEAD * estimate / GB:.1f} GB, "
            f"{available / GB:.1f} GB available",
        }
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    before, _ = resident_bytes()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = module.training_step(batch, 0)
    loss.backward()
    _, highest = resident_bytes()
    return {
        **figures,
        "saved_gb": sum(saved.values()) / GB,
        "peak_gb": (highest - before) / GB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 24, 32])
    parser.add_argument("--curriculum", default="quickstart")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--raw-dir", default=os.environ.get("NAICS_RAW_DIR"))
    parser.add_argument("--one", nargs=2, metavar=("BATCH", "DROPOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args, int(args.one[0]), args.one[1] == "on")), flush=True)
        return
    command = [sys.executable, __file__, "--curriculum", args.curriculum]
    command += ["--data-dir", str(args.data_dir)]
    command += ["--raw-dir", args.raw_dir] if args.raw_dir else []
    for dropout in ("on", "off"):
        for batch_size in args.batch_sizes:
            found = subprocess.run(
                [*command, "--one", str(batch_size), dropout],
                capture_output=True,
                text=True,
                check=False,
            )
            label = f"batch {batch_size:>3}, dropout {dropout:>3}"
            if found.returncode != 0:
                print(f"{label}: failed\n{found.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(found.stdout.strip().splitlines()[-1])
            if "skipped" in row:
                print(f"{label}: skipped, {row['skipped']}", flush=True)
                continue
            print(
                f"{label}: estimate {row['estimate_gb']:6.2f} GB, saved {row['saved_gb']:6.2f} GB, "
                f"peak {row['peak_gb']:6.2f} GB ({row['peak_gb'] / row['saved_gb']:.2f}x saved)",
                flush=True,
            )


if __name__ == "__main__":
    main()
