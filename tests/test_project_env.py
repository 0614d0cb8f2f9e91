"""The environment `mlflow run .` builds (python_env.yaml) is the one the tests run in."""

from __future__ import annotations

import platform
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    env = yaml.safe_load((REPO / "python_env.yaml").read_text())
    return dict(pin.split("==") for pin in env["dependencies"])


def test_python_env_pins_the_interpreter_the_tests_run_with():
    # A bare "3.11" makes pyenv look for the newest patch release online.
    env = yaml.safe_load((REPO / "python_env.yaml").read_text())
    assert str(env["python"]) == platform.python_version()


def test_python_env_pins_every_dependency_at_the_tested_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~ ]", requirement)[0] for requirement in project["dependencies"]]
    pins = _pins()
    assert sorted(pins) == sorted(names)
    for name in names:
        # Without the local label: the CPU wheel of torch 2.13.0 reports 2.13.0+cpu.
        assert pins[name] == version(name).split("+")[0], name


def test_the_gpu_carry_holds_the_pinned_versions_of_what_it_carries():
    # The GPU run (benchmarks/gpu_chain.sh) installs these wheels instead of python_env.yaml's.
    script = (REPO / "benchmarks" / "prepare_gpu_carry.sh").read_text()
    carried = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s)]*)", script))
    carried["mlflow"] = carried.pop("mlflow-skinny")  # the same Python package, without the UI
    pins = _pins()
    shared = sorted(set(carried) & set(pins))
    assert {"mlflow", "geoopt", "openpyxl"} <= set(shared)
    assert {name: carried[name] for name in shared} == {name: pins[name] for name in shared}
