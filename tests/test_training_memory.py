"""A stage that trains the adapters on the CPU is stopped before its run opens where its step
cannot fit in memory, with one line that names a batch size that does: the kernel would
otherwise kill it minutes in, with no line at all. A stage that runs out of memory all the same,
on a GPU or past the estimate, ends in one line too."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoConfig

from naics_mlflow.cli import _out_of_memory_line
from naics_mlflow.config import load_config
from naics_mlflow.data.curriculum import load_curriculum
from naics_mlflow.data.datamodule import NaicsDataModule
from naics_mlflow.model.module import NaicsEmbedder
from naics_mlflow.training.memory import (
    ESTIMATED_BATCHES,
    FIT_OVERHEAD,
    MEMORY_SHARE,
    StepMemoryError,
    activation_bytes,
    available_bytes,
    cgroup_headroom_bytes,
    check_step_fits_memory,
    largest_step_bytes,
    out_of_memory_in_one_line,
    passes_activation_bytes,
    system_available_bytes,
)
from tests.commands import error_line, run_cli
from tests.conftest import make_tiny_backbone, write_tiny_conf

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "conf" / "text_curriculum" / "quickstart.yaml"
BATCH = 16
# The check judges CPU stages only; "auto" would train on a GPU where the tests run beside one.
ON_CPU = ["training.trainer.accelerator=cpu"]


def _datamodule(overrides: list[str], release) -> NaicsDataModule:
    config = load_config(REPO / "conf" / "config.yaml", overrides)
    datamodule = NaicsDataModule(config, load_curriculum(QUICKSTART), release)
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="module")
def lora_stage(tiny_overrides, tiny_backbone, release):
    """The quick start's relations, adapters trained, batches of 16 anchors, on the CPU."""
    datamodule = _datamodule([*tiny_overrides, *ON_CPU, f"data_loader.batch_size={BATCH}"], release)
    return datamodule, AutoConfig.from_pretrained(tiny_backbone)


def _needed(datamodule, backbone_config, batch_size: int) -> int:
    """What the check holds a fit of ``batch_size`` anchors needs beyond the process."""
    passes = datamodule.config.model.length_buckets
    return int(FIT_OVERHEAD * largest_step_bytes(datamodule, batch_size, backbone_config, passes))


def test_the_estimate_counts_the_passes_the_encoder_runs(lora_stage):
    datamodule, backbone_config = lora_stage
    module = NaicsEmbedder(datamodule.config.to_dict())
    items = datamodule.training_items(epoch=0)
    batch = datamodule.collate(items, datamodule.epoch_order(items, epoch=0)[:BATCH])
    shapes = []
    hook = module.encoder.backbone.register_forward_pre_hook(
        lambda _, inputs: shapes.append(tuple(inputs[0].shape))
    )
    with torch.no_grad(), hook:
        module.encoder(batch["tokens"])
        module.encoder(batch["query_tokens"])
    ran = sum(
        rows * activation_bytes(backbone_config, length, False, True) for rows, length in shapes
    )
    token_sets = [batch["tokens"], batch["query_tokens"]]
    passes = module.encoder.length_buckets
    assert len(shapes) == 2 * passes
    assert passes_activation_bytes(token_sets, backbone_config, passes, False, True) == ran


@pytest.mark.parametrize("dropout", [True, False])
def test_the_estimate_follows_what_autograd_keeps_for_backward(
    dropout, tiny_overrides, tiny_backbone, release
):
    """Within 2% on MiniLM (docs/results.md); the tiny backbone's LoRA and masks weigh more."""
    overrides = [*tiny_overrides, f"data_loader.batch_size={BATCH}"]
    datamodule = _datamodule(
        [*overrides, f"model.backbone_dropout={str(dropout).lower()}"], release
    )
    module = NaicsEmbedder(datamodule.config.to_dict()).train()
    items = datamodule.training_items(epoch=0)
    batch = datamodule.collate(items, datamodule.epoch_order(items, epoch=0)[:BATCH])
    saved = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        module.encoder(batch["tokens"])
        module.encoder(batch["query_tokens"])
    estimate = passes_activation_bytes(
        [batch["tokens"], batch["query_tokens"]],
        AutoConfig.from_pretrained(tiny_backbone),
        module.encoder.length_buckets,
        False,
        dropout,
    )
    assert 0.8 < estimate / sum(saved.values()) < 1.1


@pytest.mark.parametrize("limit", ["2", "0.25", "1.0"])
def test_the_estimate_draws_no_more_batches_than_a_fit_trains_on(
    limit, lora_stage, tiny_overrides, monkeypatch
):
    """A fit of ``limit_train_batches`` trains on that many of an epoch's batches (a number, or
    a fraction of them); the estimate collated up to 256 whatever it was, seconds of a smoke
    run's set-up."""
    datamodule, backbone_config = lora_stage
    config = load_config(
        REPO / "conf" / "config.yaml",
        [*tiny_overrides, *ON_CPU, f"training.trainer.limit_train_batches={limit}"],
    )
    monkeypatch.setattr(datamodule, "config", config)
    collated = []
    collate = datamodule.collate
    monkeypatch.setattr(
        datamodule,
        "collate",
        lambda items, rows: collated.append(len(rows)) or collate(items, rows),
    )
    largest_step_bytes(datamodule, BATCH, backbone_config, config.model.length_buckets)
    every = min(
        ESTIMATED_BATCHES, math.ceil(len(datamodule.training_items(epoch=0).anchor) / BATCH)
    )
    expected = {"2": 2, "0.25": every // 4, "1.0": every}[limit]
    assert len(collated) == expected
    assert collated[:-1] == [BATCH] * (expected - 1)


def test_a_step_that_fits_is_let_through(lora_stage):
    datamodule, backbone_config = lora_stage
    need = _needed(datamodule, backbone_config, BATCH)
    check_step_fits_memory(datamodule.config, datamodule, backbone_config, available=need)


def test_a_step_that_cannot_fit_is_refused_with_the_largest_batch_size_that_does(lora_stage):
    datamodule, backbone_config = lora_stage
    available = _needed(datamodule, backbone_config, BATCH) - 1
    with pytest.raises(StepMemoryError) as refused:
        check_step_fits_memory(datamodule.config, datamodule, backbone_config, available)
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith("stage quickstart trains the backbone's adapters on the CPU, ")
    assert f"data_loader.batch_size={BATCH} needs about" in line
    assert "or training.head_only=true, or train on a GPU" in line
    offered = int(re.search(r"set data_loader\.batch_size=(\d+)", line).group(1))
    assert 0 < offered < BATCH
    assert _needed(datamodule, backbone_config, offered) <= MEMORY_SHARE * available
    assert _needed(datamodule, backbone_config, offered + 1) > MEMORY_SHARE * available


def test_where_no_batch_fits_the_line_says_so(lora_stage):
    datamodule, backbone_config = lora_stage
    with pytest.raises(
        StepMemoryError, match=r"no batch size fits; set training\.head_only=true, or train"
    ):
        check_step_fits_memory(datamodule.config, datamodule, backbone_config, available=1)


def test_processes_training_on_one_machine_each_need_the_memory(
    lora_stage, tiny_overrides, release
):
    datamodule, backbone_config = lora_stage
    one_process = _needed(datamodule, backbone_config, BATCH)
    ddp = _datamodule(
        [
            *tiny_overrides,
            f"data_loader.batch_size={BATCH}",
            "training.trainer.accelerator=cpu",
            "training.trainer.devices=2",
            "training.trainer.strategy=ddp",
        ],
        release,
    )
    with pytest.raises(StepMemoryError, match="on the CPU in 2 processes"):
        check_step_fits_memory(ddp.config, ddp, backbone_config, available=int(1.5 * one_process))


@pytest.mark.parametrize("setting", ["training.head_only=true", "training.trainer.accelerator=gpu"])
def test_stages_that_keep_no_backbone_activations_on_the_cpu_are_not_checked(
    setting, tiny_overrides, tiny_backbone, release
):
    datamodule = _datamodule([*tiny_overrides, setting], release)
    backbone_config = AutoConfig.from_pretrained(tiny_backbone)
    check_step_fits_memory(datamodule.config, datamodule, backbone_config, available=0)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "headroom"),
    [
        pytest.param(
            {
                "memory.max": "8000000000\n",
                "memory.current": "6000000000\n",
                "memory.stat": "anon 4500000000\ninactive_file 1000000000\nactive_file 5\n",
            },
            3_000_000_000,
            id="cgroup v2 limit, its inactive page cache given back",
        ),
        pytest.param(
            {"memory.max": "max\n", "memory.current": "6000000000\n", "memory.stat": ""},
            None,
            id="cgroup v2 without a limit",
        ),
        pytest.param(
            {
                "memory/memory.limit_in_bytes": "4000000000\n",
                "memory/memory.usage_in_bytes": "3000000000\n",
                "memory/memory.stat": "cache 10\ntotal_inactive_file 500000000\n",
            },
            1_500_000_000,
            id="cgroup v1 limit",
        ),
        pytest.param(
            {
                "memory/memory.limit_in_bytes": "9223372036854771712\n",
                "memory/memory.usage_in_bytes": "3000000000\n",
                "memory/memory.stat": "",
            },
            None,
            id="cgroup v1 without a limit",
        ),
        pytest.param({}, None, id="no memory controller"),
    ],
)
def test_a_container_memory_limit_caps_what_a_step_may_take(tmp_path, files, headroom):
    assert cgroup_headroom_bytes(_write(tmp_path, files)) == headroom


def test_the_system_says_what_memory_is_available_with_or_without_proc_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert system_available_bytes(meminfo) == 20_000_000 * 1024
    # macOS has no /proc/meminfo, where the check ended in a traceback: the free pages then.
    without = system_available_bytes(tmp_path / "no-meminfo")
    assert 0 < without <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# A tiny backbone with 32 attention heads a layer, and long texts in one batch of every anchor: a
# step that needs more than this machine has (the real MiniLM at the quick start's 32 anchors
# needs about 27 GB), found in seconds and without the real backbone's weights.
TOO_LARGE = {
    "training.trainer.accelerator": "cpu",
    "data_loader.batch_size": 4096,
    "data_loader.tokenization.description_max_length": 256,
    "data_loader.tokenization.excluded_max_length": 256,
}
REFUSAL = (
    r"error: stage {stage} trains the backbone's adapters on the CPU, and its largest batch of "
    r"data_loader\.batch_size=4096 needs about [\d.]+ GB for the step where this machine has "
    r"[\d.]+ GB available; set data_loader\.batch_size=\d+ \(about [\d.]+ GB\) or "
    r"training\.head_only=true{where}, or train on a GPU"
)


@pytest.fixture()
def wide_attention_workdir(tmp_path, taxonomy, tiny_overrides, release) -> Path:
    """A working folder whose backbone needs more memory than this machine has at
    ``TOO_LARGE``'s settings (the test is skipped on a machine with more)."""
    backbone = make_tiny_backbone(
        tmp_path / "wide-attention-bert", taxonomy, num_attention_heads=32, num_hidden_layers=4
    )
    workdir = tmp_path / "work"
    conf = write_tiny_conf(workdir, [*tiny_overrides, f"model.base_model_name={backbone}"])
    overrides = [f"{key}={value}" for key, value in TOO_LARGE.items()]
    datamodule = NaicsDataModule(load_config(conf, overrides), load_curriculum(QUICKSTART), release)
    datamodule.setup()
    need = _needed(
        datamodule, AutoConfig.from_pretrained(backbone), TOO_LARGE["data_loader.batch_size"]
    )
    if need <= available_bytes(torch.device("cpu")):
        pytest.skip(f"this machine has more than the {need / 1e9:.0f} GB the step needs")
    return workdir


def _nothing_written(workdir: Path) -> bool:
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    files = [p for p in (workdir / "checkpoints").rglob("*") if p.is_file()]
    return client.search_runs(experiments) == [] and files == []


def test_train_stops_before_its_run_opens_where_the_step_cannot_fit(wide_attention_workdir):
    overrides = [f"{key}={value}" for key, value in TOO_LARGE.items()]
    result = run_cli(wide_attention_workdir, "train", "-c", "quickstart", *overrides)
    line = error_line(result)
    assert re.fullmatch(REFUSAL.format(stage="quickstart", where=""), line), line
    assert _nothing_written(wide_attention_workdir)


def test_a_chain_stops_before_its_first_stage_where_a_later_one_cannot_fit(
    wide_attention_workdir,
):
    chain = {
        "chain_name": "chain_head_then_too_large",
        "stages": [
            {
                "name": "quickstart",
                "max_epochs": 1,
                "overrides": {"training.head_only": True, "data_loader.all_codes_in_batch": True},
            },
            {"name": "finetune", "max_epochs": 1, "overrides": TOO_LARGE},
        ],
    }
    chains = wide_attention_workdir / "conf" / "text_curriculum"
    (chains / "chain_head_then_too_large.yaml").write_text(yaml.safe_dump(chain))
    result = run_cli(
        wide_attention_workdir, "train-curriculum", "--chain", "chain_head_then_too_large"
    )
    line = error_line(result)
    where = " in chain chain_head_then_too_large's file, under stage finetune's overrides"
    assert re.fullmatch(REFUSAL.format(stage="finetune", where=where), line), line
    assert "stage quickstart" not in result.stderr  # its features were never computed
    assert _nothing_written(wide_attention_workdir)


# --- a stage that runs out of memory all the same ---------------------------------------------

# The quick start's relations with texts up to 256 tokens in batches of 256 anchors: a step of
# the tiny backbone that keeps about 6.5 GB for backward, which the check lets through on a
# machine with 10 GB available.
LARGE_STEP = {
    "training.trainer.accelerator": "cpu",
    "data_loader.batch_size": 256,
    "data_loader.tokenization.description_max_length": 256,
    "data_loader.tokenization.excluded_max_length": 256,
}
# What the command may map beyond its imported libraries: its set-up and a tiny stage's steps
# (about 2 GB of address space: threads, MLflow, the data), not that step.
MEMORY_BEYOND_IMPORTS = 3 * 10**9


@pytest.mark.parametrize("in_chain", [False, True], ids=["train", "train-curriculum"])
def test_a_step_refused_memory_as_it_trains_ends_in_one_line(
    tmp_path, tiny_overrides, release, in_chain
):
    workdir = tmp_path / "work"
    conf = write_tiny_conf(workdir, tiny_overrides)
    overrides = [f"{key}={value}" for key, value in LARGE_STEP.items()]
    datamodule = NaicsDataModule(load_config(conf, overrides), load_curriculum(QUICKSTART), release)
    datamodule.setup()
    backbone_config = AutoConfig.from_pretrained(datamodule.config.model.base_model_name)
    need = _needed(datamodule, backbone_config, LARGE_STEP["data_loader.batch_size"])
    assert need / FIT_OVERHEAD > 2 * MEMORY_BEYOND_IMPORTS
    if need > available_bytes(torch.device("cpu")):
        pytest.skip(
            f"the check would refuse the step: this machine has less than {need / 1e9:.0f} GB"
        )
    if in_chain:
        chain = {
            "chain_name": "chain_large_step",
            "stages": [{"name": "quickstart", "max_epochs": 1, "overrides": LARGE_STEP}],
        }
        chains = workdir / "conf" / "text_curriculum"
        (chains / "chain_large_step.yaml").write_text(yaml.safe_dump(chain))
        command = ["train-curriculum", "--chain", "chain_large_step"]
        where = " in chain chain_large_step's file, under stage quickstart's overrides"
    else:
        command = ["train", "-c", "quickstart", *overrides]
        where = ""

    result = run_cli(workdir, *command, memory_beyond_imports=MEMORY_BEYOND_IMPORTS)

    line = error_line(result)
    assert re.fullmatch(
        r"error: stage quickstart ran out of memory on the CPU while it trained at "
        r"data_loader\.batch_size=256 \(torch asked for [\d.]+ GB more and was refused\); its "
        r"MLflow run is FAILED; set a smaller data_loader\.batch_size \(128, say\) or "
        rf"training\.head_only=true{re.escape(where)}, or train on a GPU",
        line,
    ), line
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {run.info.status for run in runs} == {"FAILED"}
    (stage_run,) = [run for run in runs if run.data.tags.get("stage") == "quickstart"]
    assert stage_run.data.tags["error"].startswith(
        "StepMemoryError: stage quickstart ran out of memory"
    )
    assert [p for p in (workdir / "checkpoints").rglob("*") if p.is_file()] == []


def _refused_by_the_cpu_allocator() -> None:
    """A real refusal by torch's CPU allocator: a petabyte is past any process's address space."""
    torch.empty(2**50, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("settings", "remedy"),
    [
        ([], "set a smaller data_loader.batch_size (16, say) or training.head_only=true"),
        (["data_loader.batch_size=1"], "set training.head_only=true"),
        (["data_loader.batch_size=1", "training.head_only=true"], "no smaller batch is left"),
    ],
)
def test_the_line_names_the_settings_left_to_change(tiny_overrides, settings, remedy):
    config = load_config(
        REPO / "conf" / "config.yaml",
        [*tiny_overrides, *ON_CPU, "data_loader.batch_size=32", *settings],
    )
    with (
        pytest.raises(StepMemoryError) as refused,
        out_of_memory_in_one_line(config, "finetune", None),
    ):
        _refused_by_the_cpu_allocator()
    assert str(refused.value).startswith("stage finetune ran out of memory on the CPU while it ")
    assert str(refused.value).endswith(f"; {remedy}, or train on a GPU")


def test_in_a_chain_the_line_names_the_stage_in_the_chain_file(tiny_overrides):
    config = load_config(REPO / "conf" / "config.yaml", [*tiny_overrides, *ON_CPU])
    with (
        pytest.raises(StepMemoryError) as refused,
        out_of_memory_in_one_line(config, "finetune", "chain_default"),
    ):
        _refused_by_the_cpu_allocator()
    assert "(torch asked for 1125899.9 GB more and was refused)" in str(refused.value)
    assert str(refused.value).endswith(
        "or training.head_only=true in chain chain_default's file, under stage finetune's "
        "overrides, or train on a GPU"
    )


def test_gpu_memory_refused_names_the_gpu_and_no_head_only_stage(tiny_overrides):
    """torch's error as the CUDA caching allocator raises it (a real one: the GPU test in
    test_training_stage.py)."""
    config = load_config(
        REPO / "conf" / "config.yaml", [*tiny_overrides, "data_loader.batch_size=64"]
    )
    cuda_says = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
        "of which 1.06 GiB is free."
    )
    with (
        pytest.raises(StepMemoryError) as refused,
        out_of_memory_in_one_line(config, "finetune", None),
    ):
        raise torch.OutOfMemoryError(cuda_says)
    assert str(refused.value) == (
        "stage finetune ran out of GPU memory while it trained at data_loader.batch_size=64 "
        "(torch asked for 2.00 GiB more and was refused); its MLflow run is FAILED; set a "
        "smaller data_loader.batch_size (32, say), or train on a GPU with more memory"
    )


def _refused_by_numpy() -> None:
    """A real refusal of an array's memory, as numpy words it: what a stage's data set-up meets."""
    np.empty(2**50, dtype=np.uint8)


def test_memory_numpy_is_refused_in_a_fit_ends_in_the_same_line(tiny_overrides):
    config = load_config(REPO / "conf" / "config.yaml", [*tiny_overrides, *ON_CPU])
    with (
        pytest.raises(StepMemoryError) as refused,
        out_of_memory_in_one_line(config, "finetune", None),
    ):
        _refused_by_numpy()
    assert str(refused.value).startswith(
        "stage finetune ran out of memory on the CPU while it trained at data_loader.batch_size="
    )
    assert "(numpy asked for 1.00 PiB more and was refused)" in str(refused.value)


def test_memory_pyarrow_is_refused_in_a_fit_names_its_size(tiny_overrides):
    """pyarrow words a refusal "realloc of size N failed": the line gives the size, and pyarrow
    as the library that asked (it was said to be numpy's, or given no size)."""
    config = load_config(REPO / "conf" / "config.yaml", [*tiny_overrides, *ON_CPU])
    with (
        pytest.raises(StepMemoryError) as refused,
        out_of_memory_in_one_line(config, "finetune", None),
    ):
        pa.allocate_buffer(16, resizable=True).resize(2**50)
    assert "(pyarrow asked for 1125899.9 GB more and was refused)" in str(refused.value)


def test_a_stage_on_a_gpu_out_of_the_machines_memory_is_not_told_to_get_a_bigger_gpu(
    tiny_overrides,
):
    config = load_config(
        REPO / "conf" / "config.yaml",
        [*tiny_overrides, "training.trainer.accelerator=gpu", "data_loader.batch_size=64"],
    )
    with (
        pytest.raises(StepMemoryError) as refused,
        out_of_memory_in_one_line(config, "finetune", None),
    ):
        _refused_by_numpy()
    assert str(refused.value) == (
        "stage finetune ran out of the machine's memory (not the GPU's) while it trained at "
        "data_loader.batch_size=64 (numpy asked for 1.00 PiB more and was refused); its MLflow "
        "run is FAILED; set a smaller data_loader.batch_size (32, say), or train on a machine "
        "with more memory"
    )


def test_other_errors_of_a_fit_keep_their_own_traceback(tiny_overrides):
    config = load_config(REPO / "conf" / "config.yaml", tiny_overrides)
    with (
        pytest.raises(RuntimeError) as raised,
        out_of_memory_in_one_line(config, "finetune", None),
    ):
        raise RuntimeError("a step that breaks")
    assert type(raised.value) is RuntimeError and str(raised.value) == "a step that breaks"


# What the command may map beyond its imported libraries: less than a stage's data set-up needs
# (its taxonomy, relations and tokens). Between about 200 and 350 MB here the refusal reaches
# Python as a MemoryError; with much less, threads or BLAS buffers fail to start first, which
# no program can report.
ALMOST_NO_MEMORY = 250 * 10**6


def test_a_command_short_of_memory_before_it_trains_ends_in_one_line(tmp_path, tiny_overrides):
    workdir = tmp_path / "work"
    write_tiny_conf(workdir, tiny_overrides)

    result = run_cli(workdir, "train", "-c", "quickstart", memory_beyond_imports=ALMOST_NO_MEMORY)

    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert re.fullmatch(
        r"error: naics-embedder train ran out of memory"
        r"( \(numpy asked for [\d.]+ [KMG]iB more and was refused\))?; free memory on this "
        r"machine \(other programs, or other commands running\) or run it on one with more",
        result.stderr.strip().splitlines()[-1],
    ), result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_gpu_memory_refused_outside_a_step_names_the_gpu():
    """torch's error as the CUDA caching allocator raises it, met outside a training step (an
    ``embed`` on a GPU that other processes fill)."""
    cuda_says = "CUDA out of memory. Tried to allocate 512.00 MiB. GPU 0 has a total capacity"
    assert _out_of_memory_line("naics-embedder embed", torch.OutOfMemoryError(cuda_says)) == (
        "naics-embedder embed ran out of GPU memory (torch asked for 512.00 MiB more and was "
        "refused); free the GPU (other processes on it) or run it on a GPU with more memory"
    )
