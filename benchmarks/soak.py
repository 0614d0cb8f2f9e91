"""Soak: a long tiny-backbone chain killed with SIGKILL again and again, resumed each time.

    python benchmarks/soak.py                       # 100 epochs, at least 10 kills
    python benchmarks/soak.py --epochs 40 --kills 4

Runs the real command line in a fresh working folder with its own sqlite store and data folder,
so the first kills can land in the data build. Each run of ``train-curriculum --chain`` is killed
(the whole process group, as a crashed machine would) after a random time; the next run resumes
the chain. After the last kill a run is left to finish. Then it checks and prints:

- the parent run has every stage FINISHED exactly once,
- each stage's epochs, over all its runs, cover 0 .. max_epochs - 1 without a gap,
- no more epochs were trained twice than there were kills: a kill costs at most the epoch it
  landed in (the figure is printed as "epochs repeated"),
- every checkpoint in the store and on disk reads back whole.

Needs the Census files (--raw-dir or $NAICS_RAW_DIR). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from naics_mlflow.data.build import build_data  # noqa: E402
from naics_mlflow.data.census import load_release  # noqa: E402
from naics_mlflow.data.taxonomy import load_taxonomy  # noqa: E402
from naics_mlflow.model.checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from tests.conftest import make_tiny_backbone, tiny_settings, write_tiny_conf  # noqa: E402

STAGES = ("01_stage", "02_stage")


def prepare(workdir: Path, raw_dir: Path, epochs: int) -> None:
    """A tiny backbone (built from a throwaway data build), a tiny conf/ and the soak chain; the
    chain's own data folder starts empty."""
    release = load_release(REPO / "conf" / "data.yaml")
    scratch = workdir / "scratch-data"
    build_data(raw_dir, scratch, release)
    backbone = make_tiny_backbone(workdir / "tiny-bert", load_taxonomy(scratch))
    write_tiny_conf(workdir, tiny_settings(backbone, workdir / "data"))
    per_stage = [epochs // len(STAGES) + (i < epochs % len(STAGES)) for i in range(len(STAGES))]
    (workdir / "conf" / "text_curriculum" / "chain_soak.yaml").write_text(
        "chain_name: chain_soak\nstages:\n"
        + "".join(
            f"  - name: {name}\n    max_epochs: {count}\n"
            for name, count in zip(STAGES, per_stage, strict=True)
        )
    )


def run_chain(workdir: Path, env: dict[str, str], kill_after: float | None, log) -> str:
    """One ``train-curriculum`` run: ``killed``, ``finished`` or ``failed``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "naics_mlflow", "train-curriculum", "--chain", "chain_soak"],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "killed"
    return "finished" if process.returncode == 0 else "failed"


def reached(client: MlflowClient) -> str:
    """Where the chain was when it was killed: the newest stage run and its last logged epoch."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, "tags.stage != ''", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        return "before any stage run (data build, start-up)"
    epoch = runs[0].data.metrics.get("epoch")
    done = "no epoch logged yet" if epoch is None else f"epoch {int(epoch)} logged"
    return f"{runs[0].data.tags['stage']}, {done}"


def repeated_epochs(client: MlflowClient, runs: list) -> int:
    """How many epochs were logged by more than one run of their stage: work a kill cost.
    (Lightning logs ``epoch`` with every step's metrics, so a run's epochs are counted once.)"""
    logged = [
        (run.data.tags.get("stage"), epoch)
        for run in runs
        for epoch in {int(m.value) for m in client.get_metric_history(run.info.run_id, "epoch")}
    ]
    return len(logged) - len(set(logged))


def check(
    workdir: Path, client: MlflowClient, epochs_per_stage: dict[str, int], kills: int
) -> list[str]:
    problems = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("role") == "chain"]
    if len(parents) != 1 or parents[0].info.status != "FINISHED":
        problems.append(f"expected one FINISHED parent run, got {[p.info.status for p in parents]}")
    for stage, epochs in epochs_per_stage.items():
        stage_runs = [r for r in runs if r.data.tags.get("stage") == stage]
        finished = [r for r in stage_runs if r.info.status == "FINISHED"]
        if len(finished) != 1:
            problems.append(f"{stage}: {len(finished)} FINISHED runs, expected exactly 1")
        seen = {
            int(m.value)
            for r in stage_runs
            for m in client.get_metric_history(r.info.run_id, "epoch")
        }
        if seen != set(range(epochs)):
            problems.append(f"{stage}: epochs {sorted(set(range(epochs)) - seen)} never logged")
        for run in stage_runs:
            for artifact in client.list_artifacts(run.info.run_id, "ckpt"):
                local = client.download_artifacts(
                    run.info.run_id, artifact.path, str(workdir / "check" / run.info.run_id)
                )
                problems += _unreadable(Path(local))
    stage_runs = [r for r in runs if r.data.tags.get("stage") in epochs_per_stage]
    if (repeated := repeated_epochs(client, stage_runs)) > kills:
        problems.append(f"{repeated} epochs trained twice after {kills} kills")
    for path in (workdir / "checkpoints").rglob("*.ckpt"):
        problems += _unreadable(path)
    return problems


def _unreadable(path: Path) -> list[str]:
    try:
        read_checkpoint(path)
    except CheckpointError as exc:
        return [str(exc)]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=100, help="epochs over the whole chain")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs before the last run")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="shortest run before a kill")
    parser.add_argument("--max-seconds", type=float, default=25.0, help="longest run before a kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw-dir", default=os.environ.get("NAICS_RAW_DIR", "../shared/naics2022"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    with tempfile.TemporaryDirectory(prefix="naics-soak-") as folder:
        workdir = Path(folder)
        prepare(workdir, Path(args.raw_dir).resolve(), args.epochs)
        env = {
            **os.environ,
            "NAICS_RAW_DIR": str(Path(args.raw_dir).resolve()),
            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db",
            "HF_HUB_OFFLINE": "1",
        }
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        started = time.perf_counter()
        outcomes = []
        with (workdir / "soak.log").open("w") as log:
            while outcomes.count("killed") < args.kills:
                kill_after = rng.uniform(args.min_seconds, args.max_seconds)
                outcomes.append(run_chain(workdir, env, kill_after, log))
                where = reached(client) if (workdir / "mlflow.db").exists() else "no store yet"
                print(
                    f"run {len(outcomes):>3}: {outcomes[-1]} after {kill_after:4.1f} s ({where})",
                    flush=True,
                )
                if outcomes[-1] != "killed":
                    break
            if outcomes[-1] == "killed":
                outcomes.append(run_chain(workdir, env, None, log))
                print(f"run {len(outcomes):>3}: {outcomes[-1]} (left to finish)")
        elapsed = time.perf_counter() - started
        chain = (workdir / "conf" / "text_curriculum" / "chain_soak.yaml").read_text()
        counts = [int(line.split(":")[1]) for line in chain.splitlines() if "max_epochs" in line]
        kills = outcomes.count("killed")
        problems = check(workdir, client, dict(zip(STAGES, counts, strict=True)), kills)
        experiments = [e.experiment_id for e in client.search_experiments()]
        stage_runs = [
            r for r in client.search_runs(experiments) if r.data.tags.get("stage") in STAGES
        ]
        print()
        print(f"epochs            {args.epochs} ({', '.join(map(str, counts))} per stage)")
        print(
            f"runs              {len(outcomes)}: {kills} killed, "
            f"{outcomes.count('failed')} failed, {outcomes.count('finished')} finished"
        )
        print(f"stage runs        {len(stage_runs)} (one per start of a stage, resumed or not)")
        print(f"epochs repeated   {repeated_epochs(client, stage_runs)} (at most one a kill)")
        print(f"wall time         {elapsed / 60:.1f} min")
        print(f"checks            {'all passed' if not problems else 'FAILED'}")
        for problem in problems:
            print(f"  - {problem}")
        if outcomes[-1] != "finished":
            tail = (workdir / "soak.log").read_text().splitlines()[-30:]
            print("the last run did not finish; the end of its output:", *tail, sep="\n")
            problems.append("unfinished")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
