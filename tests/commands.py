"""Running the real command line in a subprocess, as a user would, from a working folder."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow.tracking import MlflowClient

OWN_STORE = "own"
# The command line with its address space capped at what it maps once its libraries are imported,
# plus argv[1] bytes: an allocation past that is refused as on a machine with no more memory to
# give, which the memory check (it reads the machine's) does not see coming.
_CLI_WITH_CAPPED_MEMORY = """
import resource, sys
import lightning, mlflow, torch, transformers
import naics_mlflow.cli, naics_mlflow.training.stage
status = open("/proc/self/status").read().splitlines()
mapped = int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[1]), hard))
naics_mlflow.cli.main(args=sys.argv[2:], prog_name="naics-embedder")
"""


def environment(workdir: Path, tracking_uri: str | None = OWN_STORE) -> dict[str, str]:
    """This interpreter's scripts first on PATH (as in an activated virtual environment) and a
    tracking store: ``OWN_STORE``, a sqlite store in ``workdir``; None, the default store; any
    other value, that URI."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if tracking_uri == OWN_STORE:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
    elif tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def run_cli(
    workdir: Path,
    *args: str,
    tracking_uri: str | None = OWN_STORE,
    file_size_limit: int | None = None,
    memory_beyond_imports: int | None = None,
    more_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """The command line run to its end. ``file_size_limit``: writes past that many bytes into
    any one file are refused, as the kernel refuses them on a full disk (cut short, or EFBIG).
    ``memory_beyond_imports``: allocations past that many bytes beyond what the command maps
    once its libraries are imported are refused, as on a machine that has no more.
    ``more_env``: environment variables set for the command besides."""
    env = {**environment(workdir, tracking_uri), **(more_env or {})}
    command = ["-m", "naics_mlflow"]
    if memory_beyond_imports is not None:
        command = ["-c", _CLI_WITH_CAPPED_MEMORY, str(memory_beyond_imports)]
        # glibc reserves 64 MB of address space for each thread's arena, up to eight a core: on
        # a machine with many cores that alone could use up the margin.
        env["MALLOC_ARENA_MAX"] = "2"
    return subprocess.run(
        [sys.executable, *command, *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=None if file_size_limit is None else _limit_file_size(file_size_limit),
    )


def _limit_file_size(most_bytes: int) -> Callable[[], None]:
    """For ``preexec_fn``: writes past ``most_bytes`` into a file are refused, not killed."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (most_bytes, hard))

    return limit


@contextlib.contextmanager
def file_size_limited(most_bytes: int) -> Iterator[None]:
    """In this process, for the block: writes past ``most_bytes`` into a file are refused, as
    the kernel refuses them on a full disk; the limit and the signal's handler are restored."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    on_limit = signal.getsignal(signal.SIGXFSZ)
    _limit_file_size(most_bytes)()
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, on_limit)


def start_cli(workdir: Path, *args: str, output: Path | None = None) -> subprocess.Popen:
    """The command line started in the background in a process group of its own, as a terminal
    starts a job (so a test can signal the group), its output written to ``output`` or
    discarded, with its sqlite store made first: MLflow fails to set up a store that two
    processes make at once, here the command and the test's own client watching it."""
    env = environment(workdir)
    MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
    with open(output or os.devnull, "w") as written:
        return subprocess.Popen(
            [sys.executable, "-m", "naics_mlflow", *args],
            cwd=workdir,
            env=env,
            stdout=written,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Ctrl-C as in a terminal, even when these tests run where SIGINT is ignored (a job
            # started with & by a script), which a child would inherit.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def run_cli_concurrently(
    workdir: Path, commands: list[list[str]], tracking_uri: str | None = OWN_STORE
) -> list[subprocess.CompletedProcess]:
    """:func:`run_cli` of each command, one per core at a time (at least two), results in order.
    Only for commands that leave the store and the folder as they found them (a refused reference,
    say): two trainings at once would share checkpoint folders."""
    with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        return list(
            pool.map(lambda args: run_cli(workdir, *args, tracking_uri=tracking_uri), commands)
        )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user error ends with (exit status 2)."""
    assert result.returncode == 2, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def runs_table(stdout: str) -> list[dict[str, str]]:
    """The rows of what `naics-embedder runs` printed, by column name: its columns are two or
    more spaces apart, and a start time holds one."""
    header, *lines = stdout.strip().splitlines()
    columns = re.split(r"\s{2,}", header)
    return [dict(zip(columns, re.split(r"\s{2,}", line), strict=True)) for line in lines]
