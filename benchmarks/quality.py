"""Train a chain and print the evaluation table: the trained model against the untrained backbone
and BM25 on the held-out index items and the NAICS 2017 unseen phrasings.

    python benchmarks/quality.py                          # chain_quickstart, on the CPU
    python benchmarks/quality.py --chain chain_default    # on a GPU

Runs the real command line in a fresh working folder (its own sqlite store, removed at the end
unless --workdir names a folder to keep), so nothing mixes with your runs; needs the Census files
(--raw-dir or $NAICS_RAW_DIR).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], workdir: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=workdir, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chain", default="chain_quickstart")
    parser.add_argument("--config", type=Path, default=REPO / "conf" / "config.yaml")
    parser.add_argument("--raw-dir", default=os.environ.get("NAICS_RAW_DIR", "../shared/naics2022"))
    parser.add_argument(
        "--unseen-queries",
        type=Path,
        default=REPO.parent / "shared" / "eval" / "naics2017_index_unseen.csv",
    )
    parser.add_argument("--workdir", type=Path, help="keep the store and checkpoints here")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "naics_mlflow"]
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(str(args.workdir.resolve()))
        if args.workdir is not None
        else tempfile.TemporaryDirectory(prefix="naics-quality-")
    ) as folder:
        workdir = Path(folder)
        env = {
            **os.environ,
            "NAICS_RAW_DIR": str(Path(args.raw_dir).resolve()),
            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db",
            "HF_HUB_OFFLINE": "1",
        }
        config = ["--config", str(args.config.resolve())]
        train_seconds = run(
            [*cli, "train-curriculum", "--chain", args.chain, *config], workdir, env
        )
        chain = (args.config.parent / "text_curriculum" / f"{args.chain}.yaml").read_text()
        final_stage = [
            line.split(":", 1)[1].strip()
            for line in chain.splitlines()
            if line.strip().startswith("- name:")
        ][-1]
        evaluate_seconds = run(
            [
                *cli,
                "evaluate",
                "--from-checkpoint",
                final_stage,
                *config,
                "--unseen-queries",
                str(args.unseen_queries.resolve()),
            ],
            workdir,
            env,
        )
    print(
        f"\n{args.chain}: training {train_seconds / 60:.1f} min, "
        f"evaluation {evaluate_seconds / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
