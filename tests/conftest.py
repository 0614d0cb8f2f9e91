"""Shared fixtures: the real Census files from ../shared and one data build per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from naics_mlflow.data.build import build_data
from naics_mlflow.data.census import load_release
from naics_mlflow.data.taxonomy import Taxonomy, load_taxonomy

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread for torch, here and in every command the tests start (they inherit it):
# the tiny backbone's operations are too small to gain from a second thread, and the suite often
# runs several torch processes at once (DDP ranks, concurrent chains, a tracking server, a chain
# being killed while this process polls), where OpenMP threads spinning on 2 cores slowed a stage
# several-fold. Results do not depend on it (the same val_loss either way).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The longest files, longest first (from about 17 minutes down to about 3 on 2 cores):
# `make test`'s two workers each take a whole file at a time in collection order
# (`--no-loadscope-reorder`; xdist would otherwise order files by their number of tests), and
# starting these first lets both workers finish at about the same time instead of one running a
# long file alone at the end. Left in alphabetical order, test_training_memory.py came last and
# kept one worker busy about 100 s after the other had finished (a replay of a whole run's
# durations: 1,722 s for the longer worker against 1,674 s with it here).
LONGEST_FILES = (
    "test_training_guide.py",
    "test_chain.py",
    "test_use.py",
    "test_scale_out.py",
    "test_training_stage.py",
    "test_training_memory.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def raw_dir() -> Path:
    # Resolved: command-line tests run in other working folders.
    path = Path(
        os.environ.get("NAICS_RAW_DIR", REPO_ROOT.parent / "shared" / "naics2022")
    ).resolve()
    if not (path / "2022_NAICS_Index_File.xlsx").is_file():
        pytest.fail(f"the Census files are not in {path}; set NAICS_RAW_DIR")
    os.environ["NAICS_RAW_DIR"] = str(path)  # for the command-line runs in subprocesses
    return path


@pytest.fixture(scope="session")
def release():
    return load_release(REPO_ROOT / "conf" / "data.yaml")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, raw_dir: Path, release) -> Path:
    out = tmp_path_factory.mktemp("data")
    build_data(raw_dir, out, release)
    return out


@pytest.fixture(scope="session")
def taxonomy(data_dir: Path) -> Taxonomy:
    return load_taxonomy(data_dir)


def make_tiny_backbone(folder: Path, taxonomy: Taxonomy, **architecture: int) -> Path:
    """A randomly initialised 2-layer BERT (hidden size 32) with a vocabulary of the most
    frequent words in the NAICS titles, saved like any Hugging Face model folder.
    ``architecture``: BertConfig settings that differ (``num_attention_heads=32``, say)."""
    import collections
    import re

    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = collections.Counter(
        word
        for text in [*taxonomy.titles, *taxonomy.descriptions[:300]]
        for word in re.findall(r"[a-z]+", text.lower())
    )
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:()-'")
    vocabulary = specials + characters + [f"##{c}" for c in characters]
    vocabulary += [w for w, _ in words.most_common(800) if w not in vocabulary]
    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 takes the vocabulary itself; its tokenizer ignores a vocab_file argument and
    # would read every word as [UNK].
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocabulary)})
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    config = BertConfig(vocab_size=len(vocabulary), **(settings | architecture))
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"), taxonomy)


@pytest.fixture(scope="session")
def tiny_overrides(tiny_backbone: Path, data_dir: Path) -> list[str]:
    return tiny_settings(tiny_backbone, data_dir)


def tiny_settings(backbone: Path, data_dir: Path) -> list[str]:
    """KEY=VALUE overrides that shrink a run to seconds: tiny backbone, small sizes, 2 epochs."""
    return [
        f"model.base_model_name={backbone}",
        f"dirs.data={data_dir}",
        "model.embedding_dim=16",
        "model.lora.r=2",
        "model.lora.alpha=4",
        "model.moe.num_experts=2",
        "model.moe.top_k=1",
        "model.moe.hidden_dim=32",
        "data_loader.batch_size=64",
        "data_loader.examples_per_code=2",
        "data_loader.tokenization.title_max_length=16",
        "data_loader.tokenization.description_max_length=32",
        "data_loader.tokenization.excluded_max_length=32",
        "data_loader.tokenization.examples_max_length=32",
        "training.learning_rate=1e-3",
        "training.warmup_steps=2",
        "training.trainer.max_epochs=2",
        "training.trainer.log_every_n_steps=1",
    ]


@pytest.fixture(scope="session")
def tiny_conf_factory(tiny_overrides: list[str]):
    """``factory(folder)`` writes a tiny-settings conf/ into ``folder`` (for wider fixtures)."""
    return lambda folder: write_tiny_conf(folder, tiny_overrides)


@pytest.fixture()
def tiny_workdir(tmp_path: Path, tiny_overrides: list[str]) -> Path:
    """A fresh working folder with a tiny-settings ``conf/`` (see :func:`write_tiny_conf`)."""
    write_tiny_conf(tmp_path, tiny_overrides)
    return tmp_path


def write_tiny_conf(workdir: Path, overrides: list[str]) -> Path:
    """``workdir/conf``: the project's conf/ with the tiny settings baked into config.yaml, every
    directory inside ``workdir``, epochs cut to two small batches and evaluation to 300 codes, so
    that commands run as users type them (``--config conf/config.yaml`` by default) and finish in
    seconds."""
    import shutil

    import yaml

    from naics_mlflow.config import load_config

    conf = workdir / "conf"
    shutil.copytree(REPO_ROOT / "conf", conf)
    config = load_config(
        REPO_ROOT / "conf" / "config.yaml",
        [
            *overrides,
            f"dirs.checkpoints={workdir / 'checkpoints'}",
            f"dirs.outputs={workdir / 'outputs'}",
            "data_loader.batch_size=16",
            "model.eval_sample_size=300",
            "training.trainer.limit_train_batches=2",
            "training.trainer.limit_val_batches=1",
        ],
    )
    (conf / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return conf / "config.yaml"
