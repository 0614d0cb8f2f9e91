"""Every `bash` block of docs/training.md, run as written, in order, in one working folder.

The folder's conf/ is the project's with tiny settings baked in (tiny backbone, one small training
batch per epoch, a 300-code evaluation sample), and one epoch wherever the command itself does not
set max_epochs (conf/config.yaml and every chain's stages), so the guide's commands run unchanged in
minutes.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from tests.commands import environment

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "training.md"


def guide_commands() -> list[str]:
    """The guide's bash blocks, each a command with its line continuations joined."""
    blocks = re.findall(r"^ *```bash\n(.*?)^ *```", GUIDE.read_text(), flags=re.M | re.S)
    return [re.sub(r"\\\n\s*", "", block).strip() for block in blocks]


def _shorten(conf: Path) -> None:
    """One epoch of one training batch, unless a command line says otherwise: what the guide's
    commands check (that they run, and find what the earlier ones left) needs no more."""
    config = yaml.safe_load((conf / "config.yaml").read_text())
    config["training"]["trainer"].update(max_epochs=1, limit_train_batches=1)
    (conf / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for chain_file in (conf / "text_curriculum").glob("chain_*.yaml"):
        chain = yaml.safe_load(chain_file.read_text())
        for stage in chain["stages"]:
            stage["max_epochs"] = 1
        chain_file.write_text(yaml.safe_dump(chain, sort_keys=False))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_the_guide_has_the_commands_users_expect():
    commands = guide_commands()
    assert "naics-embedder train --curriculum 01_stage" in commands
    assert "naics-embedder train-curriculum --chain chain_default" in commands
    assert any(c.startswith("mlflow run . -e chain -P chain=chain_default") for c in commands)
    assert any("--from-checkpoint 03_stage" in c for c in commands)
    assert any("--resume false" in c for c in commands)


def test_every_guide_command_works_as_written(tiny_workdir):
    _shorten(tiny_workdir / "conf")
    for name in ("MLproject", "python_env.yaml"):
        shutil.copy(REPO / name, tiny_workdir / name)
    env = environment(tiny_workdir, tracking_uri=None)  # the guide's embedded default store
    for command in guide_commands():
        started, cpu = time.perf_counter(), _children_cpu_s()
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command],
            cwd=tiny_workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        # CPU seconds as well: on a shared machine they say more about the work than wall time.
        wall, cpu = time.perf_counter() - started, _children_cpu_s() - cpu
        print(f"{wall:6.1f} s {cpu:6.1f} s cpu  {command}")
    assert (tiny_workdir / "mlflow.db").is_file()
    assert (tiny_workdir / "mlartifacts").is_dir()
