"""A stage that trains the adapters on the CPU is stopped before its run opens where its step
cannot fit in memory, with one line that names a batch size that does: the kernel would
otherwise kill it minutes in, with no line at all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoConfig

from naics_mlflow.config import load_config
from naics_mlflow.data.curriculum import load_curriculum
from naics_mlflow.data.datamodule import NaicsDataModule
from naics_mlflow.model.module import NaicsEmbedder
from naics_mlflow.training.memory import (
    FIT_OVERHEAD,
    MEMORY_SHARE,
    StepMemoryError,
    activation_bytes,
    available_bytes,
    cgroup_headroom_bytes,
    check_step_fits_memory,
    largest_step_bytes,
    passes_activation_bytes,
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
