"""Time `mlflow run .` with the environment it builds itself from python_env.yaml (pyenv and
virtualenv, no --env-manager local), as a new user runs it.

    python benchmarks/project_env.py     # the data entry point: builds the environment
    python benchmarks/project_env.py --entry-point chain --chain chain_quickstart

Runs in a fresh folder with its own sqlite store; needs pyenv with the Python version pinned in
python_env.yaml, virtualenv, the package registry, and the Census files (--raw-dir or
$NAICS_RAW_DIR). MLflow keeps the environment it built (under ~/.mlflow/envs), so the first run
pays for the build and later ones reuse it; both times are printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entry-point", default="data", choices=["data", "chain"])
    parser.add_argument("--chain", default="chain_quickstart")
    parser.add_argument("--raw-dir", default=os.environ.get("NAICS_RAW_DIR", "../shared/naics2022"))
    args = parser.parse_args()
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", args.entry_point]
    command += ["--experiment-name", "naics-embedder"]
    if args.entry_point == "chain":
        command += ["-P", f"chain={args.chain}"]
    for attempt in ("first run (builds the environment unless cached)", "second run (cached)"):
        with tempfile.TemporaryDirectory(prefix="naics-env-") as folder:
            env = {
                **os.environ,
                "NAICS_RAW_DIR": str(Path(args.raw_dir).resolve()),
                "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
                "HF_HUB_OFFLINE": "1",
            }
            started = time.perf_counter()
            result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            sys.exit(f"mlflow run failed after {seconds:.0f} s ({attempt})")
        print(f"mlflow run -e {args.entry_point}, {attempt}: {seconds:.0f} s")


if __name__ == "__main__":
    main()
