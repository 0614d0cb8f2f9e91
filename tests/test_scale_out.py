"""Scaling out on real engines: Lightning's DDP over two gloo processes, a real ``mlflow server``
subprocess on loopback that concurrent chains share, and the tracking store's failures: missing,
unusable, made by several commands at once, or on a disk that refuses artifacts."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import requests
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from naics_mlflow import tracking
from naics_mlflow.model.checkpoint import read_checkpoint, weights_digest
from naics_mlflow.tracking import ArtifactWriteError
from tests.commands import (
    environment,
    error_line,
    file_size_limited,
    ok,
    run_cli,
    run_cli_concurrently,
    start_cli,
)

TWO_PROCESSES = [
    "training.trainer.devices=2",
    "training.trainer.strategy=ddp",
    "training.trainer.accelerator=cpu",
]
BATCH_SIZE = 16  # the tiny conf's data_loader.batch_size


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _all_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, order_by=["attributes.start_time ASC"])


def _best_digest(client: MlflowClient, run, folder: Path) -> str:
    path = client.download_artifacts(
        run.info.run_id, f"ckpt/{run.data.tags['best_checkpoint']}", str(folder)
    )
    return weights_digest(torch.load(path, weights_only=True)["state_dict"])


def _write_chain(workdir: Path, name: str, stages: str) -> None:
    (workdir / "conf" / "text_curriculum" / f"{name}.yaml").write_text(
        f"chain_name: {name}\nstages:\n{stages}"
    )


# --- data-parallel training -----------------------------------------------------------------


def test_two_process_chain_keeps_one_record_and_its_checkpoints_load_anywhere(tiny_workdir):
    workdir = tiny_workdir
    ok(run_cli(workdir, "train", "-c", "01_stage", "training.trainer.max_epochs=1"))  # one process
    chain = ok(
        run_cli(
            workdir,
            "train-curriculum",
            "--curricula",
            "02_stage,03_stage",
            "--from-checkpoint",
            "01_stage",
            *TWO_PROCESSES,
        )
    )
    assert chain.stdout.count("parent run") == 1  # rank 0 alone reports

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = _all_runs(client)
    # One run for the single stage, then the chain's parent and its two stages: rank 1 opened none.
    assert [r.data.tags.get("stage", r.data.tags.get("role")) for r in runs] == [
        "01_stage",
        "chain",
        "02_stage",
        "03_stage",
    ]
    assert all(r.info.status == "FINISHED" for r in runs)
    single, _, second, third = runs
    # A one-process checkpoint starts a two-process stage ...
    assert second.data.tags["init_weights_digest"] == _best_digest(client, single, workdir / "d")
    for stage in (second, third):
        metrics, params = stage.data.metrics, stage.data.params
        assert params["training.trainer.devices"] == "2"
        # Each rank's pool is its batch's unique codes (anchors, positives, sampled negatives),
        # padded to the larger of the two, so the gathered pool is twice one padded pool.
        most_codes = BATCH_SIZE * (2 + int(params["curriculum.n_negatives"]))
        pool = metrics["train/global_batch/global_k_negatives"]
        assert metrics["train/global_batch/global_batch_size"] == 2 * BATCH_SIZE
        assert pool % 2 == 0 and 2 * BATCH_SIZE < pool <= 2 * most_codes
        point_bytes = 4 * (int(params["model.embedding_dim"]) + 1)
        assert metrics["train/global_batch/global_negatives_memory_mb"] == pytest.approx(
            pool * point_bytes / 2**20
        )
        assert metrics["train/global_batch/global_hard_negatives_used"] == 0
    # ... and a two-process checkpoint serves in one process.
    found = ok(run_cli(workdir, "search", "grow soybeans", "--from-checkpoint", "03_stage"))
    assert len(found.stdout.strip().splitlines()) == 1 + 5


# Imported by the process Lightning starts as rank 1, before the command runs: it imports what
# the command will, then leaves it 250 MB more to map, less than its data's set-up takes. Rank 1
# then runs out of memory for real as the fit starts, and rank 0 loses the process it waits for.
_RANK_1_SHORT_OF_MEMORY = """
import os
if os.environ.get("LOCAL_RANK") == "1":
    import resource
    import lightning, mlflow, torch, transformers
    import naics_mlflow.cli, naics_mlflow.training.stage
    status = open("/proc/self/status").read().splitlines()
    mapped = int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 250 * 10**6, hard))
"""


def test_a_rank_that_fails_stops_the_leading_process_in_one_line(tiny_workdir, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_RANK_1_SHORT_OF_MEMORY)
    env = environment(tiny_workdir)
    env["PYTHONPATH"] = str(site)
    env["MALLOC_ARENA_MAX"] = "2"  # as in run_cli's capped commands
    # One tokenizer thread: threads that each allocate as they please make where rank 1 first
    # meets its limit vary from run to run.
    env["TOKENIZERS_PARALLELISM"] = "false"

    result = subprocess.run(
        [sys.executable, "-m", "naics_mlflow", "train", "-c", "01_stage", *TWO_PROCESSES],
        cwd=tiny_workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    # Lightning's launcher kills rank 0 once rank 1 has ended, which may come before its exit.
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # Rank 1's own line is the memory check's (tests/test_training_memory.py); short of memory,
    # the tokenizer's threads may instead abort it, with no line of ours.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[-1:] == [
        "error: stage 01_stage stopped: another of its training processes ended, and this one "
        "cannot go on without it; that process's own error says why"
    ], result.stderr[-3000:]
    (run,) = _all_runs(MlflowClient(f"sqlite:///{tiny_workdir}/mlflow.db"))
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("RankEndedError: stage 01_stage stopped")


def test_sigterm_to_the_leading_process_stops_a_two_process_chain(tiny_workdir, tmp_path):
    """``kill PID``, ``timeout``, ``docker stop``: SIGTERM to rank 0 alone. Lightning's own
    handler broadcast from inside the signal handler while rank 1 waited in the step's
    all-reduce, and the chain hung until gloo's 30-minute timeout; rank 1, once stopped, also
    printed a traceback as if it had crashed."""
    _write_chain(
        tiny_workdir,
        "chain_term",
        "  - name: 01_stage\n    max_epochs: 1\n  - name: 02_stage\n    max_epochs: 200\n",
    )
    log = tmp_path / "chain.log"
    process = start_cli(
        tiny_workdir, "train-curriculum", "--chain", "chain_term", *TWO_PROCESSES, output=log
    )
    stage_dir = tiny_workdir / "checkpoints" / "sequential_01-02_chain_term" / "02_stage"
    try:
        deadline = time.monotonic() + 300
        while not any(stage_dir.glob("*/last.ckpt")):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGTERM
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    runs = _all_runs(MlflowClient(f"sqlite:///{tiny_workdir}/mlflow.db"))
    statuses = [(r.data.tags.get("stage", r.data.tags.get("role")), r.info.status) for r in runs]
    assert statuses == [("chain", "KILLED"), ("01_stage", "FINISHED"), ("02_stage", "KILLED")]


# --- a shared tracking server ---------------------------------------------------------------


class TrackingServer(NamedTuple):
    uri: str
    process: subprocess.Popen


@pytest.fixture()
def tracking_server(tmp_path: Path):
    """``mlflow server`` on a free loopback port with a sqlite backend and an artifact root in
    ``tmp_path``; stopped at the end unless a test stopped it."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
                *("--port", str(port), "--workers", "1"),
                *("--backend-store-uri", f"sqlite:///{tmp_path}/server.db"),
                *("--artifacts-destination", str(tmp_path / "server-artifacts")),
            ],
            cwd=tmp_path,
            env=environment(tmp_path, tracking_uri=None),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start in 90 s"
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening, or still starting
                pass
            time.sleep(0.5)
        yield TrackingServer(uri, server)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def test_concurrent_chains_share_a_tracking_server(tiny_workdir, tracking_server):
    workdir = tiny_workdir
    server = tracking_server.uri
    # One epoch a stage: what is checked is that the chains' records and files stay apart.
    _write_chain(
        workdir,
        "chain_a",
        "  - name: 01_stage\n    max_epochs: 1\n  - name: 02_stage\n    max_epochs: 1\n",
    )
    _write_chain(
        workdir, "chain_b", "  - name: 02_stage\n    max_epochs: 1\n    learning_rate: 1e-2\n"
    )
    env = environment(workdir, server)
    chains = {
        name: subprocess.Popen(
            [sys.executable, "-m", "naics_mlflow", "train-curriculum", "--chain", name],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("chain_a", "chain_b")
    }
    for process in chains.values():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-4000:]

    client = MlflowClient(server)
    runs = _all_runs(client)
    parents = {r.data.tags["chain"]: r for r in runs if r.data.tags.get("role") == "chain"}
    assert sorted(parents) == ["chain_a", "chain_b"]
    stage_runs = [r for r in runs if "stage" in r.data.tags]
    assert sorted((r.data.tags["chain"], r.data.tags["stage"]) for r in stage_runs) == [
        ("chain_a", "01_stage"),
        ("chain_a", "02_stage"),
        ("chain_b", "02_stage"),
    ]
    for run in stage_runs:
        chain = run.data.tags["chain"]
        assert run.data.tags["mlflow.parentRunId"] == parents[chain].info.run_id
        assert run.info.status == "FINISHED"
        # The logged best checkpoint is the one this chain wrote, not the other's.
        sequence = "01-02" if chain == "chain_a" else "02"
        local = (
            workdir
            / "checkpoints"
            / f"sequential_{sequence}_{chain}"
            / run.data.tags["stage"]
            / run.info.run_id
            / run.data.tags["best_checkpoint"]
        )
        local_digest = weights_digest(torch.load(local, weights_only=True)["state_dict"])
        assert _best_digest(client, run, workdir / "dl" / chain) == local_digest

    # Discovery by stage name picks the lowest best_val_loss of both chains, over HTTP.
    second_stages = [r for r in stage_runs if r.data.tags["stage"] == "02_stage"]
    best = min(second_stages, key=lambda r: r.data.metrics["best_val_loss"])
    ok(
        run_cli(
            workdir,
            "train",
            "-c",
            "03_stage",
            "--from-checkpoint",
            "02_stage",
            "training.trainer.max_epochs=1",
            tracking_uri=server,
        )
    )
    (third,) = [r for r in _all_runs(client) if r.data.tags.get("stage") == "03_stage"]
    assert third.data.tags["init_weights_digest"] == _best_digest(client, best, workdir / "best")
    listed = ok(run_cli(workdir, "runs", "--stage", "02_stage", tracking_uri=server))
    assert len(listed.stdout.strip().splitlines()) == 1 + 2
    served = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mlflow, pandas as pd\n"
            f"model = mlflow.pyfunc.load_model('runs:/{parents['chain_b'].info.run_id}/model')\n"
            "print(len(model.predict(pd.DataFrame({'text': ['grow soybeans']}))))",
        ],
        cwd=workdir,
        env=environment(workdir, server),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr[-2000:]
    assert served.stdout.strip().splitlines()[-1] == "5"


def test_a_tracking_server_lost_mid_run_ends_the_stage_in_one_line(tiny_workdir, tracking_server):
    env = environment(tiny_workdir, tracking_server.uri)
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # MLflow's own retries would take minutes
    training = subprocess.Popen(
        [
            *(sys.executable, "-m", "naics_mlflow", "train", "-c", "01_stage"),
            "training.trainer.max_epochs=500",
        ],
        cwd=tiny_workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = MlflowClient(tracking_server.uri)
    deadline = time.monotonic() + 120
    while not any(run.data.metrics.get("epoch", 0) >= 1 for run in _all_runs(client)):
        assert training.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    os.killpg(tracking_server.process.pid, signal.SIGKILL)
    tracking_server.process.wait()
    lost = time.monotonic()
    _, stderr = training.communicate(timeout=120)
    assert time.monotonic() - lost < 60
    assert training.returncode == 2
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"error: lost the MLflow tracking store {tracking_server.uri} while logging to run "
    )
    # No promise that does not hold for this command (train starts a stage anew).
    assert line.endswith(
        "; local checkpoints are kept: once the store is back, run the same command again"
    )
    (last,) = (tiny_workdir / "checkpoints").rglob("last.ckpt")
    assert read_checkpoint(last)["naics_embedder"]  # the training state on disk still loads


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(503, "maintenance")

    def log_message(self, *args) -> None:
        """Quiet."""


@pytest.fixture()
def refusing_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture()
def no_training_stack(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing Lightning fails: a command run in it that refuses the
    store in one line refused it before importing the training stack (five seconds or more)."""
    package = tmp_path / "no_training_stack" / "lightning"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the training stack was imported')")
    return {"PYTHONPATH": str(package.parent)}


def test_a_tracking_server_that_is_down_or_refuses_fails_in_one_line(
    tiny_workdir, refusing_server, no_training_stack
):
    down = f"http://127.0.0.1:{_free_port()}"
    for command in (["runs"], ["train", "-c", "01_stage"], ["train-curriculum"]):
        started = time.monotonic()
        line = error_line(
            run_cli(tiny_workdir, *command, tracking_uri=down, more_env=no_training_stack)
        )
        assert time.monotonic() - started < 30
        assert line.startswith(f"error: cannot reach the MLflow tracking server at {down} ")
    line = error_line(run_cli(tiny_workdir, "runs", tracking_uri=refusing_server))
    assert line.startswith(f"error: the MLflow tracking server at {refusing_server} refused")
    assert "HTTP 503" in line


def test_a_tracking_store_mlflow_cannot_use_fails_in_one_line(
    tiny_workdir, tmp_path, no_training_stack
):
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("kept too")
    other_application = tmp_path / "customers.db"
    with contextlib.closing(sqlite3.connect(other_application)) as connection, connection:
        connection.execute("CREATE TABLE customers (name TEXT)")
        connection.execute("INSERT INTO customers VALUES ('kept')")
    cases = [
        (f"sqlite:///{blocker}/mlflow.db", "cannot write the tracking store", "(Not a directory)"),
        ("nosuchscheme://store", "cannot use the MLflow tracking store", "unsupported URI"),
        (str(tmp_path / "mlruns"), "cannot use the MLflow tracking store", "filesystem tracking"),
        (f"sqlite:///{not_a_database}", "cannot use the MLflow tracking store", "(file is not a"),
        (f"sqlite:///{other_application}", "the tracking store", "(its tables: customers)"),
    ]
    for uri, start, reason in cases:
        for command in (["runs"], ["train", "-c", "01_stage"]):
            result = run_cli(tiny_workdir, *command, tracking_uri=uri, more_env=no_training_stack)
            line = error_line(result)
            assert line.startswith(f"error: {start} {uri} ") and reason in line, line
    assert blocker.read_text() == "kept"
    assert not_a_database.read_text() == "kept too"
    with contextlib.closing(sqlite3.connect(other_application)) as connection:
        tables = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        assert tables.fetchall() == [("customers",)]
        assert connection.execute("SELECT name FROM customers").fetchall() == [("kept",)]
    assert not (tmp_path / "mlruns").exists()


def test_a_deleted_experiment_is_refused_with_how_to_restore_it(tiny_workdir):
    """The configured experiment, or a checkpoint run's, in the MLflow trash: MLflow's traceback
    ("must be in the 'active' state"), for `evaluate` once its work was done. A search that finds
    no active run says how many lie in the trash: it read as if there had never been any."""
    client = MlflowClient(f"sqlite:///{tiny_workdir}/mlflow.db")
    experiment_id = client.create_experiment(
        "naics-embedder", artifact_location=(tiny_workdir / "mlartifacts").as_uri()
    )
    run_id = client.create_run(experiment_id, tags={"stage": "01_stage"}).info.run_id
    client.set_terminated(run_id)
    checkpoint = tiny_workdir / "best.ckpt"
    checkpoint.write_bytes(b"refused before it is read")
    client.log_artifact(run_id, str(checkpoint), "ckpt")
    client.delete_experiment(experiment_id)
    other_id = client.create_experiment("other")
    deleted_runs = [
        client.create_run(other_id, start_time=started, tags={"stage": "02_stage"}).info.run_id
        for started in (1_000, 2_000)
    ]
    for deleted_run in deleted_runs:
        client.delete_run(deleted_run)
    results = run_cli_concurrently(
        tiny_workdir,
        [
            ["train", "-c", "01_stage"],
            ["search", "a bakery", "--from-checkpoint", f"runs:/{run_id}/ckpt"],
            ["search", "a bakery", "--from-checkpoint", "01_stage"],
            ["runs"],
            ["runs", "--stage", "02_stage"],
        ],
    )
    deleted = (
        "experiment 'naics-embedder' is deleted (in the MLflow trash); restore it with "
        f"`mlflow experiments restore --experiment-id {experiment_id}`"
    )
    assert error_line(results[0]) == f"error: {deleted}, or name another in mlflow.experiment_name"
    assert error_line(results[1]) == (
        f"error: run {run_id} is deleted with its experiment: {deleted}, or give another checkpoint"
    )
    store = f"sqlite:///{tiny_workdir}/mlflow.db"
    with_experiment = (
        "1 with its deleted experiment 'naics-embedder': restore it with "
        f"`mlflow experiments restore --experiment-id {experiment_id}`"
    )
    assert error_line(results[2]) == (
        f"error: no finished run of stage '01_stage' with a logged checkpoint in {store} "
        f"(1 in the MLflow trash: {with_experiment}); train that stage first, or pass a "
        "checkpoint file or a runs:/<run_id>/ckpt URI"
    )
    runs_deleted = (
        "2 deleted: restore each with `mlflow runs restore --run-id <id>`, "
        f"the newest is {deleted_runs[1]}"
    )
    assert ok(results[3]).stdout.strip() == (
        f"no stage runs in {store} (3 in the MLflow trash: {with_experiment}; {runs_deleted})"
    )
    assert ok(results[4]).stdout.strip() == (
        f"no runs of stage '02_stage' in {store} (2 in the MLflow trash: {runs_deleted})"
    )
    assert [
        run.info.run_id for run in client.search_runs([experiment_id], run_view_type=ViewType.ALL)
    ] == [run_id]


def test_a_lookup_where_there_is_no_store_says_so_and_creates_none(tiny_workdir):
    """A stage, run or registered model named in a folder without the default sqlite store (the
    wrong working folder, most often) is refused with the store's path, and no empty store is
    left behind by the look."""
    results = run_cli_concurrently(
        tiny_workdir,
        [
            ["search", "a bakery", "--from-checkpoint", "quickstart"],
            ["train-curriculum", "--chain", "chain_default", "--from-checkpoint", "quickstart"],
            ["embed", "--from-checkpoint", "runs:/0123abcd/ckpt"],
            ["search", "a bakery", "--from-checkpoint", "models:/naics/1"],
            ["runs"],
        ],
        tracking_uri=None,
    )
    store = tiny_workdir / "mlflow.db"
    failures = ["look up stage 'quickstart'"] * 2 + [
        "download runs:/0123abcd/ckpt",
        "download models:/naics/1",
    ]
    for failure, result in zip(failures, results, strict=False):
        assert error_line(result) == (
            f"error: cannot {failure}: the tracking store sqlite:///mlflow.db does not exist "
            f"({store}); run from the folder you trained in, point MLFLOW_TRACKING_URI at your "
            "store, or pass a checkpoint file"
        )
    assert ok(results[-1]).stdout == "no stage runs in sqlite:///mlflow.db\n"
    assert not store.exists()


def test_a_sqlite_store_named_with_options_is_read(tiny_workdir):
    """SQLAlchemy's ``?option=value`` is no part of the file's name: the store is there."""
    uri = f"sqlite:///{tiny_workdir}/options.db?timeout=30"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("options"), tags={"stage": "01_stage"})
    listed = ok(run_cli(tiny_workdir, "runs", tracking_uri=uri)).stdout
    assert run.info.run_id[:12] in listed


def test_a_store_another_process_keeps_locked_is_one_line_that_says_so(tiny_workdir):
    """A program holding a write on the store (or a network share that cannot lock): the line
    told the user to point MLFLOW_TRACKING_URI elsewhere, as for a store MLflow cannot use."""
    store = tiny_workdir / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        refused = run_cli(tiny_workdir, "runs")
    finally:
        holder.close()
    assert error_line(refused) == (
        f"error: the tracking store sqlite:///{store} is locked: another process has held it "
        "for over 5 s (a command writing to it, a program that has it open), or its file system "
        "cannot lock files (a network share); run the command again once that process is done, "
        "or use a tracking server (mlflow server) for many commands at once or several machines"
    )
    ok(run_cli(tiny_workdir, "runs"))  # the lock released, the same store serves


def test_commands_that_make_a_new_store_at_once_all_use_it(tmp_path):
    """Four processes opening a sqlite store that is not there yet, as a sweep started in a fresh
    folder does: every one goes on with one complete store (MLflow's own set-up interleaved
    their migrations and left the store half-migrated for good)."""
    opening = "from naics_mlflow import tracking; print(tracking.use_experiment('naics'))"
    for attempt in range(2):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", opening],
                cwd=folder,
                env=environment(folder, tracking_uri=None),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        outputs = [process.communicate(timeout=120) for process in processes]
        for process, (_, stderr) in zip(processes, outputs, strict=True):
            assert process.returncode == 0, stderr[-2000:]
        assert len({stdout for stdout, _ in outputs}) == 1
        assert sorted(path.name for path in folder.iterdir()) == ["mlflow.db"]
        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        assert [experiment.name for experiment in client.search_experiments()] == [
            "naics",
            "Default",
        ]


def test_an_artifact_write_the_disk_refuses_is_one_line_naming_where(tmp_path, monkeypatch):
    """A full disk under a local artifact store (here a file size limit, which the kernel
    enforces the same way): MLflow let the bare OSError through as a traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = tracking.use_experiment("naics")
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(bytes(200_000))
    with tracking.run(experiment_id, "01_stage", {"stage": "01_stage"}) as active:
        run_id = active.info.run_id
        with file_size_limited(100_000), pytest.raises(ArtifactWriteError) as refused:
            tracking.log_checkpoint(run_id, checkpoint)
    assert str(refused.value) == (
        f"cannot write the artifacts of run {run_id} to "
        f"{(tmp_path / 'mlartifacts').as_uri()}/{run_id}/artifacts (File too large); free space "
        "there, then run the same command again (train-curriculum resumes a chain from its last "
        "checkpoint)"
    )


def test_a_sqlite_store_whose_file_refuses_writes_is_one_line_naming_it(tiny_workdir):
    """The store's own writes refused, as on a full disk (here by a file size limit set just past
    its size): MLflow raised 'database or disk is full' or 'disk I/O error' with its tracebacks,
    from wherever the command first wrote."""
    store = tiny_workdir / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()
    limit = store.stat().st_size + 1000  # not a whole page: the next page is written short
    refused = run_cli(tiny_workdir, "train", "-c", "01_stage", file_size_limit=limit)
    line = error_line(refused)
    # sqlite's reason is 'database or disk is full' for a write cut short, 'disk I/O error' for
    # one refused whole; which comes first depends on its pages.
    assert line.startswith(f"error: the tracking store sqlite:///{store} cannot write {store} (")
    assert line.endswith(
        "); free space on its disk, then run the same command again (train-curriculum resumes a "
        "chain from its last checkpoint)"
    )
    assert "Traceback" not in refused.stderr


def test_a_new_sqlite_store_its_disk_refuses_is_one_line_and_leaves_no_file(tiny_workdir):
    """A first command on a full disk: MLflow's migrations, which make a new store's tables
    (about 1 MB), raised SQLAlchemy's 'disk I/O error' with its traceback."""
    store = tiny_workdir / "mlflow.db"
    refused = run_cli(tiny_workdir, "train", "-c", "01_stage", file_size_limit=200_000)
    assert error_line(refused) == (
        f"error: cannot create the tracking store sqlite:///{store}: the disk refused to write "
        f"{store} (disk I/O error); free space on its disk, or point MLFLOW_TRACKING_URI at a "
        "store elsewhere"
    )
    assert "Traceback" not in refused.stderr
    assert not [path for path in tiny_workdir.iterdir() if path.name.startswith("mlflow.db")]


# A chain's parent run between its stages, as a script: it logs once the test has stopped the
# server.
_LOGGING_AFTER_THE_SERVER_STOPS = """
import sys
from naics_mlflow import tracking

with tracking.run(tracking.use_experiment("naics"), "chain", {"role": "chain"}):
    print("open", flush=True)
    sys.stdin.readline()
    tracking.set_tags({"final_stage": "02_stage"})
"""


def test_a_tracking_server_lost_between_stages_ends_in_one_line(tmp_path, tracking_server):
    """Between a chain's stages its store calls are the parent run's own, outside any stage:
    MLflow's error came as a traceback, after recording the failure had retried as long
    again."""
    env = environment(tmp_path, tracking_server.uri)
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # MLflow's own retries would take minutes
    chain = subprocess.Popen(
        [sys.executable, "-c", _LOGGING_AFTER_THE_SERVER_STOPS],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert chain.stdout.readline() == "open\n", chain.communicate(timeout=60)[1][-3000:]
    os.killpg(tracking_server.process.pid, signal.SIGKILL)
    tracking_server.process.wait()
    lost = time.monotonic()
    _, stderr = chain.communicate("\n", timeout=120)
    assert time.monotonic() - lost < 60
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(
            "naics_mlflow.tracking.store.TrackingStoreError: lost the MLflow tracking store "
            f"{tracking_server.uri} while logging to run "
        )
    )
