"""Check that the MLflow UI shows a chain as users meet it, with headless Chromium.

    python tools/ui_check.py --store sqlite:///mlflow.db --out ui-check/

Starts ``mlflow ui`` on the store, opens the experiment's runs in the Model training view and
each stage run of the newest chain, saves a screenshot of each page and checks the rendered
page: the chain's parent run is listed, its page shows its final stage's figures
(``final_stage/best_val_loss``), and each stage run's page shows its name and its ``val/``
metrics. Needs ``chromium`` (``apt-get install chromium``). Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from mlflow.tracking import MlflowClient

EXPERIMENT = "naics-embedder"
# The UI's own switch between its GenAI and model-training pages.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
METRICS = ("val/spearman", "val/ndcg_at_10", "val/objective")
CHAIN_METRIC = "final_stage/best_val_loss"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def render(chromium: str, url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it."""
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    common += ["--window-size=1600,1000", "--virtual-time-budget=20000"]
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, check=True)
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, check=True)
    return dom.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="tracking URI, e.g. sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("ui-check"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: chromium not found; install it (apt-get install chromium)", file=sys.stderr)
        return 2
    client = MlflowClient(args.store)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        print(f"error: no experiment {EXPERIMENT} in {args.store}", file=sys.stderr)
        return 2
    chains = client.search_runs(
        [experiment.experiment_id], "tags.role = 'chain'", order_by=["attributes.start_time DESC"]
    )
    if not chains:
        print(f"error: no chain run in {args.store}; train one first", file=sys.stderr)
        return 2
    parent = chains[0]
    stages = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            args.store,
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
    failures = 0
    try:
        for _ in range(120):
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            # Refused until the server listens; slow to answer while its workers start.
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.5)
        checks = []
        runs_page = render(chromium, f"{base}/runs?{MODEL_TRAINING_VIEW}", args.out / "runs.png")
        checks.append(
            (f"runs page lists the chain {parent.info.run_name}", parent.info.run_name in runs_page)
        )
        chain_page = render(
            chromium,
            f"{base}/runs/{parent.info.run_id}?{MODEL_TRAINING_VIEW}",
            args.out / "chain.png",
        )
        checks.append((f"chain run page shows {CHAIN_METRIC}", CHAIN_METRIC in chain_page))
        for stage in stages:
            name = stage.info.run_name
            page = render(
                chromium,
                f"{base}/runs/{stage.info.run_id}?{MODEL_TRAINING_VIEW}",
                args.out / f"stage_{name}.png",
            )
            checks.append((f"stage run {name} page shows its name", name in page))
            checks.append((f"stage run {name} page shows its parent", parent.info.run_name in page))
            for metric in METRICS:
                checks.append((f"stage run {name} page shows {metric}", metric in page))
        for description, passed in checks:
            print(f"{'ok  ' if passed else 'FAIL'} {description}")
            failures += not passed
        print(f"screenshots in {args.out}/")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
