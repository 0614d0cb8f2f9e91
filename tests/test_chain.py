"""Sequential training with the tiny backbone: chains, nested runs, checkpoint references and
resumption, all against real sqlite stores and real subprocesses."""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import openpyxl
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from naics_mlflow import tracking
from naics_mlflow.errors import UserError
from naics_mlflow.model.checkpoint import CHECKPOINT_FORMAT, weights_digest
from naics_mlflow.references import CheckpointReferenceError, resolve_checkpoint
from naics_mlflow.tracking.runs import process_identity, this_process
from naics_mlflow.training.chain import read_chain_start, read_store_state
from naics_mlflow.training.start import EarlierRun, How, StageStart, StoreState
from tests.commands import (
    environment,
    error_line,
    file_size_limited,
    ok,
    run_cli,
    run_cli_concurrently,
    runs_table,
    start_cli,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def workdir(tiny_workdir: Path) -> Path:
    return tiny_workdir


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir}/mlflow.db")


def _runs(workdir: Path, filter_string: str = "") -> list:
    client = _client(workdir)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string, order_by=["attributes.start_time ASC"])


def _write_chain(workdir: Path, name: str, stages: str) -> None:
    (workdir / "conf" / "text_curriculum" / f"{name}.yaml").write_text(
        f"chain_name: {name}\nstages:\n{stages}"
    )


def _best_digest(workdir: Path, run) -> str:
    client = _client(workdir)
    path = client.download_artifacts(
        run.info.run_id, f"ckpt/{run.data.tags['best_checkpoint']}", str(workdir / "dl")
    )
    return weights_digest(torch.load(path, weights_only=True)["state_dict"])


def test_mlflow_run_chain_nests_three_stages(workdir):
    _write_chain(
        workdir,
        "chain_test",
        "  - name: 01_stage\n    max_epochs: 2\n    learning_rate: 1e-3\n"
        "  - name: 02_stage\n    max_epochs: 1\n    learning_rate: 5e-4\n"
        "  - name: 03_stage\n    max_epochs: 1\n",
    )
    client = _client(workdir)
    client.create_experiment("naics-embedder", artifact_location=(workdir / "art").as_uri())
    launched = ok(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mlflow",
                "run",
                str(REPO_ROOT),
                "-e",
                "chain",
                "--env-manager",
                "local",
                "--experiment-name",
                "naics-embedder",
                "-P",
                "chain=chain_test",
                "-P",
                f"config={workdir}/conf/config.yaml",
            ],
            cwd=workdir,
            env=environment(workdir),
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    # A log holds lines: neither Lightning's bar nor MLflow's download bars.
    assert "it/s" not in launched.stdout + launched.stderr
    assert "stage 02_stage epoch 1/1: train_loss " in launched.stderr
    runs = _runs(workdir)
    parents = [r for r in runs if r.data.tags.get("role") == "chain"]
    assert len(parents) == 1 and len(runs) == 4
    parent = parents[0]
    assert parent.data.params["chain"] == "chain_test"  # the launcher's run is the parent
    assert parent.data.tags["sequence"] == "01-02-03"
    children = [r for r in runs if r is not parent]
    assert [r.data.tags["stage"] for r in children] == ["01_stage", "02_stage", "03_stage"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    epochs = [r.data.params["training.trainer.max_epochs"] for r in children]
    rates = [r.data.params["training.learning_rate"] for r in children]
    assert epochs == ["2", "1", "1"]
    assert rates[:2] == ["0.001", "0.0005"]
    assert rates[2] == "0.001"  # no per-stage value: the base config's (tiny) learning rate
    first, second, third = children
    # The chain's row in the UI shows its final stage's summary: its best epoch's figures.
    shown = ("best_val_loss", "best/epoch", "best/val/spearman", "best/val/ndcg_at_10")
    shown += ("best/val/mean_distortion",)
    assert parent.data.metrics == {
        f"final_stage/{name}": third.data.metrics[name] for name in shown
    }
    assert "init_checkpoint" not in first.data.tags
    assert second.data.tags["init_weights_digest"] == _best_digest(workdir, first)
    assert third.data.tags["init_weights_digest"] == _best_digest(workdir, second)
    predict = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mlflow, pandas as pd\n"
            f"model = mlflow.pyfunc.load_model('runs:/{parent.info.run_id}/model')\n"
            "print(len(model.predict(pd.DataFrame({'text': ['grow soybeans']}))))",
        ],
        cwd=workdir,
        env=environment(workdir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predict.returncode == 0, predict.stderr[-2000:]
    assert predict.stdout.strip().splitlines()[-1] == "5"  # the chain's model, in its parent run
    assert list(
        (workdir / "checkpoints" / "sequential_01-02-03_chain_test" / "02_stage").glob(
            f"{second.info.run_id}/02_stage-epoch=00-val_loss=*.ckpt"
        )
    )


def test_command_line_overrides_beat_chain_values_and_runs_lists_the_stage(workdir):
    _write_chain(
        workdir,
        "chain_one",
        "  - name: 01_stage\n    max_epochs: 3\n    overrides:\n      data_loader.batch_size: 32\n",
    )
    trained = ok(
        run_cli(
            workdir, "train-curriculum", "--chain", "chain_one", "training.trainer.max_epochs=1"
        )
    )
    (child,) = _runs(workdir, "tags.stage = '01_stage'")
    # The chain's last lines give each stage's best epoch's figures.
    best = {name: child.data.metrics[f"best/val/{name}"] for name in ("spearman", "ndcg_at_10")}
    assert (
        f"01_stage         run {child.info.run_id}  best_val_loss "
        f"{child.data.metrics['best_val_loss']:.4f}  spearman {best['spearman']:.4f}  "
        f"ndcg_at_10 {best['ndcg_at_10']:.4f}"
    ) in trained.stdout.splitlines()
    assert child.data.params["training.trainer.max_epochs"] == "1"
    assert child.data.params["data_loader.batch_size"] == "32"

    result = ok(run_cli(workdir, "runs", "--chain", "chain_one"))
    header, *rows = result.stdout.strip().splitlines()
    assert header.split()[:4] == ["run_id", "stage", "parent", "status"]
    assert len(rows) == 1 and "01_stage" in rows[0] and "FINISHED" in rows[0]
    assert f"runs:/{child.info.run_id}/ckpt" in rows[0]
    assert f"{child.data.metrics['best_val_loss']:.4f}" in rows[0]
    nothing = ok(run_cli(workdir, "runs", "--stage", "02_stage", "--chain", "chain_one")).stdout
    assert nothing.startswith("no runs of stage '02_stage' of chain 'chain_one' in sqlite")


def _identity_of_an_ended_process() -> str:
    """The ``process`` tag a run written by a process of this machine that has since ended holds:
    one started and killed here."""
    gone = subprocess.Popen(["sleep", "60"])
    identity = process_identity(gone.pid)
    gone.kill()
    gone.wait()
    return identity


def test_runs_shows_when_each_run_started_and_records_one_whose_process_died_as_killed(workdir):
    """A process killed outright (SIGKILL, the kernel's out-of-memory killer) cannot end its run,
    which `runs` and the MLflow UI showed RUNNING for ever. `runs` records it KILLED, ended at its
    last metric, and leaves the runs of a live process or of another machine as they are. Each
    row gives when the run started (local time) and, once it ended, how long it ran."""
    client = _client(workdir)
    experiment = client.create_experiment("dead writers")
    gone_identity = _identity_of_an_ended_process()

    started = datetime.datetime.fromtimestamp(1).strftime("%Y-%m-%d %H:%M")  # local time

    def running(stage: str, process: str) -> str:
        return client.create_run(
            experiment, start_time=1_000, tags={"stage": stage, "process": process}
        ).info.run_id

    died = running("01_stage", gone_identity)
    client.log_metric(died, "val_loss", 2.0, timestamp=5_000)
    client.log_metric(died, "val_loss", 1.5, timestamp=9_000, step=1)
    died_before_logging = running("02_stage", gone_identity)
    alive = running("01_stage", this_process())
    elsewhere = running("01_stage", "another-machine:1:2")
    finished = {}
    for seconds, shown in ((843, "14m03s"), (3_723, "1h02m")):
        run_id = running("03_stage", this_process())
        client.set_terminated(run_id, "FINISHED", end_time=1_000 + 1_000 * seconds)
        finished[run_id[:12]] = ("FINISHED", started, shown)

    listed = ok(run_cli(workdir, "runs"))
    ended = {run_id: client.get_run(run_id).info for run_id in (died, died_before_logging)}
    assert {(info.status, info.end_time) for info in ended.values()} == {
        ("KILLED", 9_000),
        ("KILLED", 1_000),
    }
    for run_id in (alive, elsewhere):
        assert client.get_run(run_id).info.status == "RUNNING"
    rows = {row["run_id"]: row for row in runs_table(listed.stdout)}
    assert (
        {run_id: (row["status"], row["started"], row["duration"]) for run_id, row in rows.items()}
        == {
            died[:12]: ("KILLED", started, "8s"),  # to its last metric
            died_before_logging[:12]: ("KILLED", started, "0s"),
            alive[:12]: ("RUNNING", started, "-"),
            elsewhere[:12]: ("RUNNING", started, "-"),
            **finished,
        }
    )
    pid = gone_identity.split(":")[1]
    assert (
        f"run {died} ({ended[died].run_name}) was RUNNING, but its process (pid {pid} on this "
        "machine) has ended: recorded as KILLED"
    ) in listed.stderr


def test_runs_lists_a_dead_writers_run_that_the_store_refuses_to_end(workdir):
    """A store this user may read but not write (another user's runs on a team server, a
    read-only file; here a sqlite trigger refusing updates of runs) still lists its runs: the run
    stays RUNNING, and one warning says why."""
    client = _client(workdir)
    experiment = client.create_experiment("read only")
    gone_identity = _identity_of_an_ended_process()
    tags = {"stage": "01_stage", "process": gone_identity}
    run_id = client.create_run(experiment, tags=tags).info.run_id
    with contextlib.closing(sqlite3.connect(workdir / "mlflow.db")) as database:
        database.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON runs BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        database.commit()
    listed = ok(run_cli(workdir, "runs"))
    (row,) = runs_table(listed.stdout)
    assert (row["run_id"], row["status"]) == (run_id[:12], "RUNNING")
    assert f"run {run_id} " in listed.stderr
    assert "has ended; the store refused to record it as KILLED (" in listed.stderr
    assert client.get_run(run_id).info.status == "RUNNING"


def test_a_live_process_that_proc_hides_is_not_taken_for_dead():
    """Where /proc hides other users' processes (mounted hidepid=2, as on shared servers), a run
    that another user's live process writes was taken for a dead one's: `runs` would end it
    KILLED, and a chain would take it over. Checked as an unprivileged user under such a /proc,
    in a mount namespace of its own."""
    if os.geteuid() != 0:
        pytest.skip("mounting a /proc that hides processes needs root")
    alive = subprocess.Popen(["sleep", "60"])
    try:
        identities = [process_identity(alive.pid), _identity_of_an_ended_process()]
        check = (
            "from naics_mlflow.tracking.runs import died_on_this_machine, process_identity\n"
            f"print(process_identity({alive.pid}), *map(died_on_this_machine, {identities!r}))"
        )
        result = subprocess.run(
            [
                *("unshare", "--mount", "sh", "-c"),
                'mount -t proc -o hidepid=2 proc /proc && exec "$@"',
                *("sh", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
                *(sys.executable, "-c", check),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        alive.kill()
        alive.wait()
    refused = ("Operation not permitted", "Permission denied")
    if result.returncode != 0 and any(reason in result.stderr for reason in refused):
        # No mount namespace here, or a checkout that only its owner can read.
        pytest.skip(f"cannot check as an unprivileged user here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stderr
    # Hidden from the checking user; the live one is not taken for dead, the ended one is.
    assert result.stdout.split() == ["None", "False", "True"]


def test_a_chain_fine_tunes_the_adapters_of_the_head_only_stage_before_it(workdir):
    """chain_default's shape: a head-only stage, then a stage that trains the adapters from its
    best checkpoint (their B still zero, so it starts where the head-only model ends)."""
    _write_chain(
        workdir,
        "chain_probe_then_tune",
        "  - name: quickstart\n    max_epochs: 1\n    overrides:\n"
        "      training.head_only: true\n      data_loader.all_codes_in_batch: true\n"
        "  - name: finetune\n    max_epochs: 1\n    overrides:\n"
        "      training.trainer.limit_train_batches: 2\n",
    )
    ok(run_cli(workdir, "train-curriculum", "--chain", "chain_probe_then_tune"))
    head_only, fine_tuned = _runs(workdir, "tags.stage != ''")
    assert [r.data.tags["stage"] for r in (head_only, fine_tuned)] == ["quickstart", "finetune"]
    assert fine_tuned.data.tags["init_weights_digest"] == _best_digest(workdir, head_only)
    adapters = {}
    for run in (head_only, fine_tuned):
        path = _client(workdir).download_artifacts(
            run.info.run_id, f"ckpt/{run.data.tags['best_checkpoint']}", str(workdir / "dl")
        )
        state = torch.load(path, weights_only=True)["state_dict"]
        adapters[run.data.tags["stage"]] = [t for n, t in state.items() if "lora_B" in n]
    assert adapters["quickstart"] and not any(t.any() for t in adapters["quickstart"])
    assert all(t.any() for t in adapters["finetune"])


def test_a_chain_whose_stages_differ_in_layer_sizes_stops_before_training(workdir):
    _write_chain(
        workdir,
        "chain_mismatch",
        "  - name: 01_stage\n    max_epochs: 1\n"
        "  - name: 02_stage\n    max_epochs: 1\n    overrides:\n"
        "      model.moe.hidden_dim: 16\n",
    )
    line = error_line(run_cli(workdir, "train-curriculum", "--chain", "chain_mismatch"))
    assert line == (
        "error: stage 02_stage has model.moe.hidden_dim=16 but starts from 01_stage, which has "
        "32; give both the same value (a chain file's overrides, per stage)"
    )
    assert _runs(workdir) == []


def test_a_copied_stage_file_that_kept_its_name_stops_before_training(workdir):
    """As the guide suggests, to train a stage again: copy its file under another name. One that
    kept ``name: 01_stage`` inside ended in a traceback from the chain's plan."""
    stages = workdir / "conf" / "text_curriculum"
    shutil.copyfile(stages / "01_stage.yaml", stages / "01_again.yaml")
    line = error_line(run_cli(workdir, "train-curriculum", "--curricula", "01_stage,01_again"))
    assert line == (
        "error: conf/text_curriculum/01_again.yaml: name is '01_stage', but the file is "
        "01_again.yaml; "
        "set name: 01_again, or name the file 01_stage.yaml (a stage's runs are named and found "
        "by it)"
    )
    assert _runs(workdir) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_chain_whose_model_needs_a_missing_gpu_stops_before_training(workdir):
    _write_chain(workdir, "chain_one", "  - name: 01_stage\n    max_epochs: 1\n")
    line = error_line(
        run_cli(workdir, "train-curriculum", "--chain", "chain_one", "search.device=cuda")
    )
    assert line.startswith("error: search.device is cuda, but torch sees no CUDA GPU here")
    assert not (workdir / "mlflow.db").exists()  # refused before the store was opened


def test_runs_of_a_stage_in_one_group_keep_their_own_checkpoints(workdir):
    """Two runs of 01_stage with other settings share the group sequential_01; neither may
    overwrite the other's local files, which each run uploads as its own."""
    for rate in ("1e-2", "1e-4"):
        ok(
            run_cli(
                workdir,
                "train-curriculum",
                "--curricula",
                "01_stage",
                f"training.learning_rate={rate}",
                "training.trainer.max_epochs=1",
            )
        )
    runs = _runs(workdir, "tags.stage = '01_stage'")
    assert {r.data.tags["run_group"] for r in runs} == {"sequential_01"}
    digests = []
    for run in runs:
        folder = workdir / "checkpoints" / "sequential_01" / "01_stage" / run.info.run_id
        for name in (tracking.LAST_CHECKPOINT, run.data.tags["best_checkpoint"]):
            logged = _client(workdir).download_artifacts(
                run.info.run_id, f"ckpt/{name}", str(workdir / "dl" / run.info.run_id)
            )
            local = weights_digest(torch.load(folder / name, weights_only=True)["state_dict"])
            assert local == weights_digest(torch.load(logged, weights_only=True)["state_dict"])
        digests.append(local)
    assert len(runs) == 2 and digests[0] != digests[1]


def test_from_checkpoint_references(workdir):
    """A stage name picks the lowest val_loss; runs:/ URIs and files work; bad ones fail."""
    for rate in ("1e-2", "1e-4"):
        ok(
            run_cli(
                workdir,
                "train",
                "-c",
                "01_stage",
                f"training.learning_rate={rate}",
                "training.trainer.max_epochs=1",
            )
        )
    first, second = _runs(workdir)
    losses = {r.info.run_id: r.data.metrics["best_val_loss"] for r in (first, second)}
    assert losses[first.info.run_id] != losses[second.info.run_id]
    best = min((first, second), key=lambda r: r.data.metrics["best_val_loss"])

    result = ok(
        run_cli(
            workdir,
            "train-curriculum",
            "--curricula",
            "02_stage",
            "--from-checkpoint",
            "01_stage",
            "training.trainer.max_epochs=1",
        )
    )
    assert best.info.run_id in result.stderr and "lowest" in result.stderr
    (stage_two,) = _runs(workdir, "tags.stage = '02_stage'")
    assert stage_two.data.tags["init_weights_digest"] == _best_digest(workdir, best)

    uri = f"runs:/{first.info.run_id}/ckpt"
    ok(
        run_cli(
            workdir,
            "train",
            "-c",
            "02_stage",
            "--from-checkpoint",
            uri,
            "training.trainer.max_epochs=1",
        )
    )
    tags = second.data.tags
    local = (
        workdir
        / "checkpoints"
        / tags["run_group"]
        / "01_stage"
        / second.info.run_id
        / tags["best_checkpoint"]
    )
    ok(
        run_cli(
            workdir,
            "train",
            "-c",
            "02_stage",
            "--from-checkpoint",
            str(local),
            "training.trainer.max_epochs=1",
        )
    )
    by_uri, by_file = _runs(workdir, "tags.stage = '02_stage'")[1:]
    assert by_uri.data.tags["init_weights_digest"] == _best_digest(workdir, first)
    assert by_file.data.tags["init_weights_digest"] == _best_digest(workdir, second)

    empty_run = _client(workdir).create_run(first.info.experiment_id).info.run_id
    garbage = workdir / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    other_backbone = workdir / "other.ckpt"
    checkpoint = torch.load(local, weights_only=True)
    checkpoint["hyper_parameters"]["config"]["model"]["base_model_name"] = "bert-base-uncased"
    torch.save(checkpoint, other_backbone)
    # In the trash, its checkpoint still downloads, but the stage's lookup passes it over, and
    # export and evaluate, which log into or under it, failed on MLflow's traceback.
    _client(workdir).delete_run(first.info.run_id)
    before = len(_runs(workdir))
    refused = [
        (f"runs:/{first.info.run_id}/ckpt", f"run {first.info.run_id} is deleted (in the MLflow"),
        ("04_stage", "no finished run of stage '04_stage'"),
        ("runs:/0123456789abcdef0123456789abcdef/ckpt", "cannot download"),
        (f"runs:/{empty_run}/ckpt", "cannot download"),
        ("missing/file.ckpt", "does not exist"),
        (str(workdir), "is a folder; give a checkpoint file in it"),
        (str(garbage), "not a readable checkpoint"),
        (str(other_backbone), "model.base_model_name=bert-base-uncased"),
    ]
    # Each is refused before anything is trained (checked below), so they can run side by side.
    *results, single = run_cli_concurrently(
        workdir,
        [
            *(
                ["train-curriculum", "--curricula", "02_stage", "--from-checkpoint", reference]
                for reference, _ in refused
            ),
            ["train", "-c", "02_stage", "--from-checkpoint", str(garbage)],
        ],
    )
    for (reference, expected), result in zip(refused, results, strict=True):
        assert result.returncode == 2, (reference, result.stderr[-2000:])
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith("error: ") and expected in message, (reference, message)
    assert single.returncode == 2 and "not a readable checkpoint" in single.stderr
    assert len(_runs(workdir)) == before  # nothing was trained


def _stage_runs(workdir: Path, stage: str) -> list:
    return _runs(workdir, f"tags.stage = '{stage}'")


def _assert_stopped_in_seconds(workdir: Path, stage_run, log: Path, stopped: float) -> None:
    """A chain stopped by SIGTERM or Ctrl-C at ``stopped`` (``time.monotonic()``): stage run
    ``stage_run`` and the chain's parent run are KILLED, and the log's last lines say so and how
    to go on."""
    # Stopped inside a step, it once took 43 s and once hung: the signal had left TensorBoard's
    # writer thread unwoken, to be joined at its next 120 s flush.
    assert time.monotonic() - stopped < 60
    assert _client(workdir).get_run(stage_run.info.run_id).info.status == "KILLED"
    (parent,) = _runs(workdir, "tags.role = 'chain'")
    assert parent.info.status == "KILLED"
    assert log.read_text().splitlines()[-3:] == [
        f"stopped: MLflow run {stage_run.info.run_id} (02_stage) is KILLED",
        f"stopped: MLflow run {parent.info.run_id} ({parent.info.run_name}) is KILLED",
        "the same command resumes the chain from the last epoch it finished",
    ]


def _wait_for_logged_checkpoint(
    workdir: Path, process: subprocess.Popen, stage_dir: Path, logged: str = "ckpt/last.ckpt"
) -> None:
    """Until the run of the stage whose checkpoints go to ``stage_dir`` has logged the artifact
    ``logged``. The store is only asked once the stage has written its first local last.ckpt
    (the uploads follow), and then only for that run's artifacts (a new run's folder is named by
    its id): each question is quick, so that the stage is stopped in the epochs that follow, not
    after its last."""
    client = _client(workdir)
    folder = logged.rpartition("/")[0]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        written = [path.parent.name for path in stage_dir.glob(f"*/{tracking.LAST_CHECKPOINT}")]
        if written and any(a.path == logged for a in client.list_artifacts(written[0], folder)):
            return
        time.sleep(0.2)
    assert process.poll() is None, "the chain ended before it could be stopped"
    raise AssertionError(f"no {logged} logged from {stage_dir} in 300 s")


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_stopped_chain_resumes_where_it_stopped(workdir, stop):
    """Ctrl-C's SIGINT is checked where a stage is stopped twice (below)."""
    # A learning rate too small to change a weight: no epoch's val_loss beats the first's, so
    # every later epoch's end uploads that epoch's file as resume/best.ckpt.
    _write_chain(
        workdir,
        "chain_kill",
        "  - name: 01_stage\n    max_epochs: 1\n"
        "  - name: 02_stage\n    max_epochs: 6\n    learning_rate: 1.0e-30\n",
    )
    log = workdir / "chain.log"
    process = start_cli(workdir, "train-curriculum", "--chain", "chain_kill", output=log)
    client = _client(workdir)
    stage_dir = workdir / "checkpoints" / "sequential_01-02_chain_kill" / "02_stage"
    try:
        _wait_for_logged_checkpoint(workdir, process, stage_dir, "resume/best.ckpt")
        os.killpg(process.pid, stop)  # to the whole process group, as a shell's job control does
        stopped = time.monotonic()
        process.wait(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -stop  # ended by the signal, as a shell expects
    (killed,) = _stage_runs(workdir, "02_stage")
    if stop == signal.SIGTERM:  # `kill`, `timeout`, a preemption
        _assert_stopped_in_seconds(workdir, killed, log, stopped)
    else:
        assert killed.info.status == "RUNNING"  # what a dead process leaves behind
    (stage_one,) = _stage_runs(workdir, "01_stage")
    # What a resume on another machine would need: the best epoch so far, the first.
    best_so_far = client.download_artifacts(
        killed.info.run_id, "resume/best.ckpt", str(workdir / "dl")
    )
    assert torch.load(best_so_far, weights_only=True)["epoch"] == 0

    ok(run_cli(workdir, "train-curriculum", "--chain", "chain_kill"))
    assert [r.info.run_id for r in _stage_runs(workdir, "01_stage")] == [stage_one.info.run_id]
    old, resumed = _stage_runs(workdir, "02_stage")
    assert client.get_run(old.info.run_id).info.status == "KILLED"
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from"] == old.info.run_id
    # It continued in the interrupted run's folder, where Lightning's record of the best holds.
    assert (stage_dir / old.info.run_id / resumed.data.tags["best_checkpoint"]).is_file()
    assert resumed.data.tags["mlflow.parentRunId"] == old.data.tags["mlflow.parentRunId"]
    epochs = [m.value for m in client.get_metric_history(resumed.info.run_id, "epoch")]
    assert min(epochs) >= 1 and max(epochs) == 5  # continued, not restarted
    assert resumed.data.tags["best_checkpoint"].startswith("02_stage-epoch=00")
    # Its best epoch is in ckpt/ now, so neither run keeps a copy for a resume.
    assert client.list_artifacts(old.info.run_id, "resume") == []
    assert client.list_artifacts(resumed.info.run_id, "resume") == []
    (parent,) = _runs(workdir, "tags.role = 'chain'")
    assert parent.info.status == "FINISHED"

    if stop == signal.SIGKILL:
        # The chain has finished either way, so how it was stopped changes nothing here: once.
        ok(run_cli(workdir, "train-curriculum", "--chain", "chain_kill", "--resume", "false"))
        assert len(_stage_runs(workdir, "01_stage")) == 2
        assert len(_stage_runs(workdir, "02_stage")) == 3
        assert len(_runs(workdir, "tags.role = 'chain'")) == 2


def _whole_models(workdir: Path, run) -> list:
    """The models named ``model`` that ``run`` logged and whose upload finished."""
    logged = _client(workdir).search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = 'model'",
    )
    return [model for model in logged if model.status == LoggedModelStatus.READY]


def test_a_chain_stopped_as_it_logs_its_model_logs_it_when_run_again(workdir):
    """A Ctrl-C after the last stage finished, while the chain embedded the codes or uploaded its
    model: the same command again reused every stage and, its parent run taken to hold the
    model, logged none, so the chain had nothing to serve; a model whose upload was cut short
    read PENDING for ever."""
    _write_chain(workdir, "chain_end", "  - name: 01_stage\n    max_epochs: 1\n")
    log = workdir / "chain_end.log"
    process = start_cli(workdir, "train-curriculum", "--chain", "chain_end", output=log)
    try:
        # Said once the stage has ended and the codes are embedded, as the model's logging
        # starts: read from the command's output, which a store the command is writing to at
        # that moment could answer too late.
        while "embedded 2125 codes" not in log.read_text():
            assert process.poll() is None, "the chain ended before it logged its model"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    (parent,) = _runs(workdir, "tags.role = 'chain'")
    assert _whole_models(workdir, parent) == [], "the model was logged before the stop"
    # What a stop during the upload leaves, whether or not this stop came then.
    cut_short = _client(workdir).create_logged_model(
        parent.info.experiment_id, name="model", source_run_id=parent.info.run_id
    )

    ok(run_cli(workdir, "train-curriculum", "--chain", "chain_end"))
    assert len(_stage_runs(workdir, "01_stage")) == 1  # reused
    assert len(_whole_models(workdir, parent)) == 1
    # Not left to read as still uploading: gone.
    listed = _client(workdir).search_logged_models([parent.info.experiment_id])
    assert cut_short.model_id not in {model.model_id for model in listed}
    ok(run_cli(workdir, "train-curriculum", "--chain", "chain_end"))
    assert len(_whole_models(workdir, parent)) == 1  # held already: not logged twice
    assert _runs(workdir, "tags.role = 'chain'")[0].info.status == "FINISHED"


def _global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_a_killed_stage_resumes_on_another_machine_from_its_last_epoch(workdir):
    """The store's last.ckpt is the one the epoch just wrote, not the epoch's before: a machine
    lost mid-stage (a kill, a spot instance taken back) costs only the epoch it was in, even where
    the resume runs on a machine without the first one's checkpoint folder."""
    _write_chain(
        workdir,
        "chain_moved",
        "  - name: 01_stage\n    max_epochs: 1\n  - name: 02_stage\n    max_epochs: 6\n",
    )
    process = start_cli(workdir, "train-curriculum", "--chain", "chain_moved")
    stage_dir = workdir / "checkpoints" / "sequential_01-02_chain_moved" / "02_stage"
    try:
        _wait_for_logged_checkpoint(workdir, process, stage_dir)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    (killed,) = _stage_runs(workdir, "02_stage")
    # It shows its best so far, as a running run does.
    val_losses = _client(workdir).get_metric_history(killed.info.run_id, "val_loss")
    assert killed.data.metrics["best_val_loss"] == pytest.approx(min(m.value for m in val_losses))
    logged = _client(workdir).download_artifacts(
        killed.info.run_id, f"ckpt/{tracking.LAST_CHECKPOINT}", str(workdir / "dl")
    )
    (on_disk,) = stage_dir.glob(f"*/{tracking.LAST_CHECKPOINT}")
    assert _global_step(Path(logged)) == _global_step(on_disk)

    # Another machine: the same store, its files elsewhere, none of the first one's folders.
    elsewhere = workdir / "machine_b"
    moved = [f"dirs.checkpoints={elsewhere / 'checkpoints'}", f"dirs.outputs={elsewhere / 'out'}"]
    shutil.rmtree(workdir / "checkpoints")
    resumed_there = ok(run_cli(workdir, "train-curriculum", "--chain", "chain_moved", *moved))
    assert len(_runs(workdir, "tags.role = 'chain'")) == 1  # the same chain, not a new one
    # The best epoch before the stop is kept: the store's last.ckpt where that is its epoch,
    # else resume/best.ckpt. (Lightning's warning about the moved folder is not repeated.)
    state = torch.load(logged, map_location="cpu", weights_only=True)
    (record,) = (r for r in state["callbacks"].values() if r.get("monitor") == "val_loss")
    assert "came without its val_loss" not in resumed_there.stderr
    assert "dirpath has changed" not in resumed_there.stderr
    _, resumed = _stage_runs(workdir, "02_stage")
    assert resumed.data.tags["resumed_from"] == killed.info.run_id
    assert resumed.info.status == "FINISHED"
    epochs = [m.value for m in _client(workdir).get_metric_history(resumed.info.run_id, "epoch")]
    assert min(epochs) >= 1 and max(epochs) == 5
    assert resumed.data.metrics["best_val_loss"] <= float(record["best_model_score"]) + 1e-6


@pytest.mark.parametrize("best_so_far_logged", [True, False], ids=["today", "older-run"])
def test_a_stage_stopped_after_its_last_epoch_ends_on_another_machine(workdir, best_so_far_logged):
    """Each epoch writes last.ckpt, the best one or not: Lightning 2.6 wrote it only with a new
    best, and a stopped stage repeated every epoch since its best.

    A run stopped after its last epoch's last.ckpt was uploaded, but before it ended, has no
    epoch left to train when resumed; on another machine its best file is not on the disk. The
    resumed run keeps the best epoch the interrupted run logged as ``resume/best.ckpt``; a run
    logged before that file was (``older-run``) keeps the epoch it resumed from, where it failed
    on every retry naming the other machine's file."""
    # A learning rate too small to change a weight: the second epoch's val_loss is no better,
    # so the stage's best is its first epoch, not the one it resumes from.
    _write_chain(
        workdir,
        "chain_moved",
        "  - name: 01_stage\n    max_epochs: 1\n"
        "  - name: 02_stage\n    max_epochs: 2\n    learning_rate: 1.0e-30\n",
    )
    ok(run_cli(workdir, "train-curriculum", "--chain", "chain_moved"))
    client = _client(workdir)
    (stopped,) = _stage_runs(workdir, "02_stage")
    last_logged = client.download_artifacts(
        stopped.info.run_id, f"ckpt/{tracking.LAST_CHECKPOINT}", str(workdir / "dl")
    )
    # Its last.ckpt is its last epoch's, though that epoch was not its best.
    best_before = stopped.data.tags["best_checkpoint"]
    assert best_before.startswith("02_stage-epoch=00")
    assert torch.load(last_logged, weights_only=True)["epoch"] == 1
    # What such a stop leaves in the store: the stage's and the chain's runs KILLED, the last
    # epoch's last.ckpt logged, no best checkpoint named.
    client.delete_tag(stopped.info.run_id, "best_checkpoint")
    for run in (stopped, *_runs(workdir, "tags.role = 'chain'")):
        client.set_terminated(run.info.run_id, "KILLED")
    if best_so_far_logged:
        # The copy of the best epoch that the last epoch's end uploaded, which only the stage's
        # own end deletes: a stop before then leaves it in the store.
        (best_file,) = (workdir / "checkpoints").rglob(best_before)
        copy = workdir / "uploaded" / tracking.BEST_SO_FAR
        copy.parent.mkdir()
        shutil.copyfile(best_file, copy)
        client.log_artifact(stopped.info.run_id, str(copy), tracking.BEST_SO_FAR_ARTIFACT_PATH)
    shutil.rmtree(workdir / "checkpoints")

    elsewhere = workdir / "machine_b"
    moved = [f"dirs.checkpoints={elsewhere / 'checkpoints'}", f"dirs.outputs={elsewhere / 'out'}"]
    resumed_there = ok(run_cli(workdir, "train-curriculum", "--chain", "chain_moved", *moved))
    _, resumed = _stage_runs(workdir, "02_stage")
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from"] == stopped.info.run_id
    assert not client.get_metric_history(resumed.info.run_id, "epoch")  # nothing trained again
    history = {
        name: client.get_metric_history(stopped.info.run_id, name)
        for name in ("val_loss", "val/spearman")
    }
    not_on_disk = f"the best checkpoint before the interruption, {best_before}, is not on this disk"
    if best_so_far_logged:
        kept_epoch, kept_weights = 0, _best_digest(workdir, stopped)  # its tag read before
        assert resumed.data.tags["best_checkpoint"] == best_before
        assert not_on_disk not in resumed_there.stderr
        said = f"the best epoch before the interruption, {best_before}, is kept"
        assert said in resumed_there.stderr
    else:
        # Said in one line where the epoch kept is not the best before the stop.
        kept_epoch = 1
        kept_weights = weights_digest(torch.load(last_logged, weights_only=True)["state_dict"])
        assert not_on_disk in resumed_there.stderr
        assert (
            resumed.data.tags["best_checkpoint"]
            == f"02_stage-epoch=01-val_loss={history['val_loss'][1].value:.4f}.ckpt"
        )
    assert _best_digest(workdir, resumed) == kept_weights
    assert resumed.data.metrics["best_val_loss"] == pytest.approx(
        history["val_loss"][kept_epoch].value
    )
    # Its summary is that epoch's, read from the checkpoint: this run trained no epoch.
    assert stopped.data.metrics["best/epoch"] == 0
    assert resumed.data.metrics["best/epoch"] == kept_epoch
    assert resumed.data.metrics["best/val/spearman"] == pytest.approx(
        history["val/spearman"][kept_epoch].value
    )


def test_a_chain_is_found_again_by_the_data_it_trained_on(workdir, raw_dir):
    """A chain builds its data before it is identified, so that it is found again once built;
    on other data (a rebuild by another version, other workbooks) it is another chain, as on
    other settings, where it used to reuse the stages trained on the first data."""
    _write_chain(workdir, "chain_data", "  - name: 01_stage\n    max_epochs: 1\n")
    command = ["train-curriculum", "--chain", "chain_data"]
    not_built = f"dirs.data={workdir / 'data_here'}"
    ok(run_cli(workdir, *command, not_built))
    again = ok(run_cli(workdir, *command, not_built))
    assert "stage 01_stage already finished in run" in again.stderr

    other_raw = workdir / "raw"
    shutil.copytree(raw_dir, other_raw)
    workbook_path = other_raw / "2022_NAICS_Cross_References.xlsx"
    workbook_path.chmod(0o644)
    workbook = openpyxl.load_workbook(workbook_path)
    workbook.active.delete_rows(2)  # one cross-reference less
    workbook.save(workbook_path)
    other_data = f"dirs.data={workdir / 'other_data'}"
    on_other_data = ok(run_cli(workdir, *command, "--raw-dir", str(other_raw), other_data))
    assert "already finished" not in on_other_data.stderr
    assert len(_runs(workdir, "tags.role = 'chain'")) == 2
    first, second = _stage_runs(workdir, "01_stage")
    assert first.data.tags["data_digest"] != second.data.tags["data_digest"]


def test_a_chain_being_trained_is_not_taken_over_by_a_second_command(workdir):
    """The same command started again while the first runs (a second terminal, a retried job)
    is refused; otherwise it would mark the live runs KILLED and train them a second time."""
    _write_chain(
        workdir,
        "chain_twice",
        "  - name: 01_stage\n    max_epochs: 1\n  - name: 02_stage\n    max_epochs: 200\n",
    )
    command = ["train-curriculum", "--chain", "chain_twice"]
    first = start_cli(workdir, *command)
    try:
        deadline = time.monotonic() + 300
        while not _stage_runs(workdir, "02_stage") and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        runs_before = len(_runs(workdir))
        second = run_cli(workdir, *command)
        assert first.poll() is None, "the chain ended before the second command was refused"
        assert error_line(second).startswith(
            f"error: this chain is being trained now by process {first.pid} on this machine (run "
        )
        (stage_run,) = _stage_runs(workdir, "02_stage")
        assert stage_run.info.status == "RUNNING"  # not marked KILLED, not taken over
        assert len(_runs(workdir)) == runs_before
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_a_stage_stopped_twice_keeps_its_best_epoch_from_before_the_second_stop(workdir):
    """A resumed run continues in the checkpoint folder the interrupted run wrote to, where
    Lightning restores the record of the best epoch. A run resumed from a resumed run used to
    open a new folder, and the best epoch before its stop was dropped."""
    _write_chain(
        workdir,
        "chain_twice",
        "  - name: 01_stage\n    max_epochs: 1\n  - name: 02_stage\n    max_epochs: 6\n",
    )
    logs = [workdir / f"command{n}.log" for n in range(2)]
    for log in logs:  # stopped after two epochs of 02_stage, twice, by Ctrl-C
        process = start_cli(workdir, "train-curriculum", "--chain", "chain_twice", output=log)
        try:
            deadline = time.monotonic() + 300
            while log.read_text().count("stage 02_stage epoch") < 2:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
            stopped = time.monotonic()
            assert process.wait(timeout=90) == -signal.SIGINT
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        _assert_stopped_in_seconds(workdir, _stage_runs(workdir, "02_stage")[-1], log, stopped)
    finished = ok(run_cli(workdir, "train-curriculum", "--chain", "chain_twice"))

    first, second, last = _stage_runs(workdir, "02_stage")
    assert [r.data.tags.get("resumed_from") for r in (first, second, last)] == [
        None,
        first.info.run_id,
        second.info.run_id,
    ]
    assert {r.data.tags["checkpoint_folder"] for r in (first, second, last)} == {first.info.run_id}
    assert last.info.status == "FINISHED"
    # Lightning restores the record's val_loss only in the folder it was written in. (A stop
    # between saving a better epoch and last.ckpt may still leave the record naming a file since
    # replaced: "is not on this disk", an epoch that the resumed run trains again.)
    for output in (logs[1].read_text(), finished.stdout + finished.stderr):
        assert "came without its val_loss" not in output


def test_a_second_command_resuming_the_chain_while_the_first_reads_the_store_is_refused(workdir):
    """Reading the store, which downloads every interrupted run's last.ckpt, takes a while; a
    command that started the same resume meanwhile is found when this one is about to open its
    runs. Otherwise both would continue the interrupted run, in one checkpoint folder."""
    _write_chain(
        workdir,
        "chain_race",
        "  - name: 01_stage\n    max_epochs: 1\n  - name: 02_stage\n    max_epochs: 200\n",
    )
    command = [sys.executable, "-m", "naics_mlflow", "train-curriculum", "--chain", "chain_race"]
    stage_dir = workdir / "checkpoints" / "sequential_01-02_chain_race" / "02_stage"
    interrupted = start_cli(workdir, *command[3:])
    try:
        _wait_for_logged_checkpoint(workdir, interrupted, stage_dir)
    finally:
        os.killpg(interrupted.pid, signal.SIGKILL)
        interrupted.wait()
    (stopped_run,) = _stage_runs(workdir, "02_stage")

    # The first command's output goes to a pipe the test has filled: its first line, announcing
    # the download of the interrupted run's last.ckpt, holds it still (the kernel reports it
    # waiting in the pipe's write) until the pipe is read.
    output, output_end = os.pipe()
    os.set_blocking(output_end, False)
    filler = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filler += os.write(output_end, b"." * (4096 if filler % 4096 == 0 else 1))
    os.set_blocking(output_end, True)
    first = subprocess.Popen(
        command,
        cwd=workdir,
        env=environment(workdir),
        stdout=subprocess.DEVNULL,
        stderr=output_end,
        start_new_session=True,
    )
    os.close(output_end)
    second = None
    try:
        deadline = time.monotonic() + 300
        while "pipe_write" not in Path(f"/proc/{first.pid}/wchan").read_text():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = start_cli(workdir, *command[3:], output=workdir / "second.log")
        while not [r for r in _stage_runs(workdir, "02_stage") if "resumed_from" in r.data.tags]:
            assert second.poll() is None and time.monotonic() < deadline, (
                workdir / "second.log"
            ).read_text()[-3000:]
            time.sleep(0.2)
        assert first.poll() is None
        with os.fdopen(output, "rb") as pipe:
            assert pipe.read(filler) == b"." * filler
            assert first.wait(timeout=60) == 2
            lines = pipe.read().decode().splitlines()
        assert lines[0].startswith("reading the last.ckpt of run "), lines
        assert lines[-1].startswith(
            f"error: this chain is being trained now by process {second.pid} on this machine"
        )
        assert second.poll() is None, (workdir / "second.log").read_text()[-3000:]
        old, resumed = _stage_runs(workdir, "02_stage")
        assert old.info.run_id == stopped_run.info.run_id
        assert resumed.data.tags["resumed_from"] == old.info.run_id
        assert resumed.info.status == "RUNNING"  # the second command's, not taken over
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture()
def store(tmp_path, monkeypatch) -> MlflowClient:
    """A sqlite store in ``tmp_path`` that this process's tracking functions use."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def _interrupted_run(client: MlflowClient, tmp_path: Path, last_ckpt: bytes) -> str:
    experiment = tracking.use_experiment("naics-embedder")
    run = client.create_run(experiment, tags={"chain_hash": "abc", "stage": "02_stage"})
    folder = tmp_path / run.info.run_id
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(last_ckpt)
    client.log_artifact(run.info.run_id, str(folder / "last.ckpt"), "ckpt")
    client.set_terminated(run.info.run_id, "KILLED")
    return run.info.run_id


def _resumed_stage_start(tmp_path: Path) -> StageStart:
    """How stage 02_stage of chain ``abc`` starts on resuming, its folder under ``tmp_path``."""
    (start,) = read_chain_start(
        {"02_stage": tmp_path / "checkpoints"},
        "abc",
        tmp_path / "downloads",
        resume=True,
        init_checkpoint=None,
    ).stages
    return start


def test_a_partially_uploaded_last_checkpoint_is_never_resumed(store, tmp_path):
    buffer = io.BytesIO()
    torch.save({"naics_embedder": {"format": CHECKPOINT_FORMAT}}, buffer)
    whole = _interrupted_run(store, tmp_path, buffer.getvalue())
    _interrupted_run(store, tmp_path, buffer.getvalue()[:200])  # later, and cut short

    start = _resumed_stage_start(tmp_path)
    assert start.how is How.RESUME and start.run_id == whole
    assert torch.load(start.checkpoint, weights_only=True)["naics_embedder"]


def _checkpoint_at(step: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"naics_embedder": {"format": CHECKPOINT_FORMAT}, "global_step": step}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "logged", ["behind", "cut short", "missing", "as far", "resumed run", "resumed, older code"]
)
def test_an_interrupted_run_continues_from_the_last_checkpoint_on_this_disk_where_it_is_further(
    store, tmp_path, logged
):
    """Each epoch's last.ckpt is written on the training machine's disk and then uploaded: a
    stop during the upload left the logged one an epoch behind (or, with no earlier one, none),
    a kill could leave it cut short, and the stage lost an epoch, or all of them. A run that
    itself resumed another writes in that run's folder."""
    logged_files = {
        "behind": [("last.ckpt", _checkpoint_at(4))],
        "cut short": [("last.ckpt", _checkpoint_at(8)[:200])],
        "missing": [],
        "as far": [("last.ckpt", _checkpoint_at(8))],
        "resumed run": [("last.ckpt", _checkpoint_at(4))],
        "resumed, older code": [("last.ckpt", _checkpoint_at(4))],
    }[logged]
    tags = {"chain_hash": "abc", "stage": "02_stage"}
    if logged.startswith("resumed"):
        tags["resumed_from"] = "b" * 32
    if logged == "resumed run":  # a run resumed from one that had resumed another
        tags["checkpoint_folder"] = "a" * 32
    run_id = _chain_run(store, tmp_path, 1, "KILLED", tags, logged_files)
    folder = tags.get("checkpoint_folder", tags.get("resumed_from", run_id))
    on_this_disk = tmp_path / "checkpoints" / folder / "last.ckpt"
    on_this_disk.parent.mkdir(parents=True)
    on_this_disk.write_bytes(_checkpoint_at(8))

    start = _resumed_stage_start(tmp_path)
    assert start.how is How.RESUME and start.run_id == run_id
    chosen = on_this_disk if logged != "as far" else tmp_path / "downloads"
    assert Path(start.checkpoint).is_relative_to(chosen)
    assert torch.load(start.checkpoint, weights_only=True)["global_step"] == 8


def _lose_logged_file(client: MlflowClient, run_id: str, artifact: str) -> None:
    """The run's logged ``artifact`` gone from its artifact folder, its name still listed there
    (a clean-up or a lost mount under the store), as a link to nothing."""
    logged = Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / artifact
    logged.unlink()
    logged.symlink_to(logged.parent / "gone")


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_last_checkpoint_the_store_cannot_hand_over_ends_in_one_line(store, tmp_path):
    """MLflow let the store's error (here a bare OSError) through as a traceback, at the start
    of a chain resumed on another machine. The line names the run and the artifact, and deleting
    that run, as it says, lets the chain start the stage again."""
    run_id = _interrupted_run(store, tmp_path, _checkpoint_at(4))
    _lose_logged_file(store, run_id, "ckpt/last.ckpt")

    with pytest.raises(tracking.TrackingStoreError) as error:
        _resumed_stage_start(tmp_path)
    assert _one_line(error).startswith(
        f"cannot read ckpt/last.ckpt of run {run_id} from the tracking store "
        f"{tracking.tracking_uri()} ([Errno 2] No such file or directory: "
    )
    assert _one_line(error).endswith(
        "run the command again once the store serves it, or, where it is gone for good, "
        f"delete that run (mlflow runs delete --run-id {run_id})"
    )
    deleted = subprocess.run(
        [sys.executable, "-m", "mlflow", "runs", "delete", "--run-id", run_id],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deleted.returncode == 0, deleted.stderr[-3000:]
    assert _resumed_stage_start(tmp_path).how is How.FROM_SCRATCH


def test_a_best_checkpoint_the_store_cannot_hand_over_ends_in_one_line(store, tmp_path):
    """Both ways a best checkpoint is read from a run: a stage name given to --from-checkpoint,
    and a resumed stage's best epoch from before its interruption."""
    finished = _finished_stage_run(store, tmp_path, 0.5)
    _lose_logged_file(store, finished, "ckpt/best.ckpt")
    with pytest.raises(tracking.TrackingStoreError) as error:
        resolve_checkpoint("03_stage", tmp_path / "downloads")
    assert _one_line(error).startswith(f"cannot read ckpt/best.ckpt of run {finished} from ")

    interrupted = _interrupted_run(store, tmp_path, _checkpoint_at(4))
    (tmp_path / "best.ckpt").write_bytes(_checkpoint_at(2))
    store.log_artifact(interrupted, str(tmp_path / "best.ckpt"), "resume")
    _lose_logged_file(store, interrupted, "resume/best.ckpt")
    with pytest.raises(tracking.TrackingStoreError) as error:
        tracking.download_best_so_far(interrupted, tmp_path / "downloads")
    assert _one_line(error).startswith(f"cannot read resume/best.ckpt of run {interrupted} from ")


def test_a_copy_for_a_resume_the_store_will_not_delete_is_kept_with_one_warning(
    store, tmp_path, caplog
):
    """A finished stage deletes its ``resume/best.ckpt`` (tested where stages finish); a store
    that refuses leaves the stage finished, with one line that says what is left."""
    run_id = _interrupted_run(store, tmp_path, _checkpoint_at(4))
    (tmp_path / "best.ckpt").write_bytes(_checkpoint_at(2))
    store.log_artifact(run_id, str(tmp_path / "best.ckpt"), "resume")
    logged = Path(urlparse(store.get_run(run_id).info.artifact_uri).path) / "resume/best.ckpt"
    # Undeletable even by root, where the file system and the process's rights allow the flag.
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(logged)]).returncode:
        pytest.skip("chattr +i is not available or not permitted here")
    try:
        with caplog.at_level(logging.WARNING, logger=tracking.__name__):
            tracking.drop_best_so_far(run_id)
    finally:
        subprocess.run(["chattr", "-i", str(logged)], check=True)
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith(
        f"run {run_id} keeps resume/best.ckpt, a copy of its best epoch for a resume, which the "
        "store would not delete ("
    )
    assert warning.endswith("); deleting it by hand loses nothing")
    assert [a.path for a in store.list_artifacts(run_id, "resume")] == ["resume/best.ckpt"]
    tracking.drop_best_so_far(run_id)
    assert store.list_artifacts(run_id, "resume") == []


def test_a_run_the_store_fails_ends_failed_not_finished(store, tmp_path):
    """A run whose work the store failed, as a resumed chain's parent run does when a reused
    stage's best checkpoint cannot be downloaded (a full disk under the download folder; here a
    file size limit), was left open for a store that might not answer: MLflow's exit hook then
    ended it FINISHED, and the record said the chain had done its work."""
    run_id = _interrupted_run(store, tmp_path, bytes(200_000))
    experiment = tracking.use_experiment("naics-embedder")
    with (
        pytest.raises(tracking.TrackingStoreError) as refused,
        tracking.run(experiment, "chain", {}) as parent,
        file_size_limited(100_000),
    ):
        tracking.download_checkpoint(store.get_run(run_id), "last.ckpt", tmp_path / "dl")
    assert mlflow.active_run() is None  # nothing left for the exit hook to end FINISHED
    ended = store.get_run(parent.info.run_id)
    assert ended.info.status == "FAILED"
    assert ended.data.tags["error"] == f"TrackingStoreError: {refused.value}"


def test_a_checkpoint_download_the_disk_refuses_is_one_line_naming_where(store, tmp_path):
    """A full disk under the download folder (here a file size limit, which the kernel enforces
    the same way): the line names the folder and the disk's own error, which MLflow's opening
    line of its error leaves out."""
    run_id = _interrupted_run(store, tmp_path, bytes(200_000))
    run = store.get_run(run_id)
    with file_size_limited(100_000), pytest.raises(tracking.TrackingStoreError) as refused:
        tracking.download_checkpoint(run, "last.ckpt", tmp_path / "downloads")
    assert _one_line(refused).startswith(
        f"cannot download ckpt/last.ckpt of run {run_id} from the tracking store "
        f"{tracking.tracking_uri()} into {tmp_path / 'downloads' / run_id} ([Errno 27] File too "
        "large: "
    )
    assert "); free space there if that disk is full, else run the command again" in str(
        refused.value
    )


def _chain_run(
    client: MlflowClient, tmp_path: Path, start_time: int, status: str, tags: dict, files=()
) -> str:
    """A run of ``status`` started at ``start_time`` that logged ``files`` under ``ckpt/``."""
    experiment = tracking.use_experiment("naics-embedder")
    run_id = client.create_run(experiment, start_time, tags).info.run_id
    for name, content in files:
        (tmp_path / run_id).mkdir(exist_ok=True)
        (tmp_path / run_id / name).write_bytes(content)
        client.log_artifact(run_id, str(tmp_path / run_id / name), "ckpt")
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def test_the_store_state_says_whether_the_parent_run_holds_its_model_whole(store, tmp_path):
    experiment = tracking.use_experiment("naics-embedder")
    parent = store.create_run(experiment, tags={"chain_hash": "abc", "role": "chain"}).info.run_id

    def holds_model() -> bool:
        folders = {"01_stage": tmp_path / "checkpoints"}
        return read_store_state("abc", folders, tmp_path / "downloads").parent_holds_model

    assert not holds_model()
    other = store.create_logged_model(experiment, name="other", source_run_id=parent)
    store.finalize_logged_model(other.model_id, "READY")
    uploading = store.create_logged_model(experiment, name="model", source_run_id=parent)
    assert not holds_model()  # a model whose files are still uploading, or were cut short
    store.finalize_logged_model(uploading.model_id, "READY")
    assert holds_model()


def test_the_store_state_holds_this_chains_runs_newest_first(store, tmp_path):
    """What the start decision reads: this chain hash's runs only, which finished ones logged
    their best checkpoint, and the whole last.ckpt of each interrupted one."""
    buffer = io.BytesIO()
    torch.save({"naics_embedder": {"format": CHECKPOINT_FORMAT}}, buffer)
    whole = buffer.getvalue()
    one = {"chain_hash": "abc", "stage": "01_stage", "best_checkpoint": "best.ckpt"}
    two = {"chain_hash": "abc", "stage": "02_stage"}
    _chain_run(store, tmp_path, 1, "FINISHED", {"chain_hash": "abc", "role": "chain"})
    parent = _chain_run(store, tmp_path, 2, "KILLED", {"chain_hash": "abc", "role": "chain"})
    _chain_run(store, tmp_path, 3, "FINISHED", {"chain_hash": "xyz", "role": "chain"})
    logged = _chain_run(store, tmp_path, 4, "FINISHED", one, [("best.ckpt", whole)])
    not_logged = _chain_run(store, tmp_path, 5, "FINISHED", one)
    _chain_run(store, tmp_path, 6, "FINISHED", {**one, "chain_hash": "xyz"}, [("best.ckpt", whole)])
    killed = _chain_run(store, tmp_path, 7, "KILLED", two, [("last.ckpt", whole)])
    cut = _chain_run(store, tmp_path, 8, "FAILED", two, [("last.ckpt", whole[:200])])
    running = _chain_run(store, tmp_path, 9, "RUNNING", two)

    folders = {name: tmp_path / "checkpoints" for name in ("01_stage", "02_stage", "03_stage")}
    state = read_store_state("abc", folders, tmp_path / "downloads")
    assert state.parent_run_id == parent
    assert state.stage_runs["01_stage"] == [
        EarlierRun(not_logged, "FINISHED", best_checkpoint_logged=False),
        EarlierRun(logged, "FINISHED", best_checkpoint_logged=True),
    ]
    running_run, cut_run, killed_run = state.stage_runs["02_stage"]
    assert running_run == EarlierRun(running, "RUNNING")
    assert cut_run == EarlierRun(cut, "FAILED")
    assert (killed_run.run_id, killed_run.status) == (killed, "KILLED")
    assert torch.load(killed_run.last_checkpoint, weights_only=True)["naics_embedder"]
    assert state.stage_runs["03_stage"] == []
    assert read_store_state("new", folders, tmp_path / "downloads") == StoreState(
        None, {"01_stage": [], "02_stage": [], "03_stage": []}
    )


def test_a_checkpoint_tag_cannot_reach_outside_the_download_folder(store, tmp_path):
    experiment = tracking.use_experiment("naics-embedder")
    run = store.get_run(store.create_run(experiment).info.run_id)
    with pytest.raises(CheckpointReferenceError, match="not a file name"):
        tracking.download_checkpoint(run, "../../escaped.ckpt", tmp_path / "downloads")
    assert not list(tmp_path.rglob("escaped.ckpt"))


def test_a_name_with_a_quote_cannot_change_a_run_search(store):
    experiment = tracking.use_experiment("naics-embedder")
    store.create_run(experiment, tags={"stage": "01_stage"})
    with pytest.raises(CheckpointReferenceError, match="is not a stage name"):
        tracking.best_run_of_stage("x' OR tags.stage != '")
    with pytest.raises(UserError, match="is not a valid chain name"):
        tracking.tag_equals("chain", "a'b")
    assert tracking.tag_equals("stage", "03_stage") == "tags.stage = '03_stage'"


def test_an_experiment_is_opened_on_its_runs_and_a_launchers_other_one_is_named(
    store, monkeypatch, caplog
):
    experiment = tracking.use_experiment("naics-embedder")
    assert store.get_experiment(experiment).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    # mlflow run without --experiment-name: its run sits in Default and cannot move.
    launcher = store.create_run("0")
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    assert tracking.use_experiment("naics-embedder") == "0"
    assert store.get_experiment("0").tags["mlflow.experimentKind"] == "custom_model_development"
    assert "add --experiment-name naics-embedder to mlflow run" in caplog.text


def test_commands_starting_together_open_one_experiment_without_error(store):
    # Chains started at once on a shared store each find the experiment (made in the UI, say)
    # untagged and tag it; the store refuses the second insert of the same tag.
    threads_per_experiment = 6
    for attempt in range(25):
        name = f"naics-embedder-{attempt}"
        store.create_experiment(name)
        barrier = threading.Barrier(threads_per_experiment)
        opened: list[str] = []
        errors: list[BaseException] = []

        def open_experiment(name=name, barrier=barrier, opened=opened, errors=errors):
            barrier.wait()
            try:
                opened.append(tracking.use_experiment(name))
            except MlflowException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_experiment) for _ in range(threads_per_experiment)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        (experiment_id,) = set(opened)
        assert store.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == (
            tracking.EXPERIMENT_KIND
        )


def _finished_stage_run(store, tmp_path, val_loss: float, **tags: str) -> str:
    experiment = tracking.use_experiment("naics-embedder")
    run = store.create_run(
        experiment, tags={"stage": "03_stage", "best_checkpoint": "best.ckpt", **tags}
    )
    store.log_metric(run.info.run_id, "best_val_loss", val_loss)
    (tmp_path / "best.ckpt").write_bytes(b"weights")
    store.log_artifact(run.info.run_id, str(tmp_path / "best.ckpt"), "ckpt")
    store.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_discovery_takes_the_lowest_val_loss_among_comparable_runs_only(store, tmp_path, caplog):
    here = {"data_digest": "d1", "val_protocol": "p1"}
    _finished_stage_run(store, tmp_path, 0.5, data_digest="d2", val_protocol="p1")
    _finished_stage_run(store, tmp_path, 0.6, data_digest="d1", val_protocol="p2")
    _finished_stage_run(store, tmp_path, 0.7)  # from before the tags
    higher = _finished_stage_run(store, tmp_path, 2.0, **here)
    lowest = _finished_stage_run(store, tmp_path, 1.0, **here)
    caplog.set_level("INFO", logger="naics_mlflow.tracking")
    assert tracking.best_run_of_stage("03_stage", here).info.run_id == lowest
    assert higher != lowest
    assert (
        "stage 03_stage: skipped 3 finished runs: 1 trained on other data, 1 validated under "
        "another protocol, 1 from before val_loss was comparable" in caplog.text
    )
    assert tracking.best_run_of_stage("03_stage").info.run_id not in {lowest, higher}
    with pytest.raises(CheckpointReferenceError) as error:
        tracking.best_run_of_stage("03_stage", {"data_digest": "d9", "val_protocol": "p1"})
    assert "no finished run of stage '03_stage'" in str(error.value)
    assert "(4 trained on other data, 1 from before val_loss was comparable)" in str(error.value)
