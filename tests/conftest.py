"""Shared fixtures: the real Census files from ../shared and one data build per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from naics_mlflow.data.build import build_data
from naics_mlflow.data.census import load_release
from naics_mlflow.data.taxonomy import Taxonomy, load_taxonomy

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def raw_dir() -> Path:
    path = Path(os.environ.get("NAICS_RAW_DIR", REPO_ROOT.parent / "shared" / "naics2022"))
    if not (path / "2022_NAICS_Index_File.xlsx").is_file():
        pytest.fail(f"the Census files are not in {path}; set NAICS_RAW_DIR")
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
