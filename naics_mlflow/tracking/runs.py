"""Runs: opened and ended (FINISHED, KILLED or FAILED) as one context, tagged with the process
that writes them, and what they log besides files: params, metrics, tags, datasets."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import pandas as pd
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.entities import Metric, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from naics_mlflow.errors import first_line
from naics_mlflow.tracking.store import (
    TrackingStoreError,
    give_up_on_the_store,
    lost_store_error,
    refused_store_writes_in_one_line,
    sqlite_write_refused,
    store_in_use,
    store_unreachable,
)

logger = logging.getLogger(__name__)


def git_commit() -> str:
    """The commit of the code that runs (this package's checkout, wherever the command runs
    from), or ``unknown`` when it is not in a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


# The tag naming the process that writes a run: ``host:pid:start``.
PROCESS_TAG = "process"


def process_identity(pid: int) -> str | None:
    """``host:pid:start`` of process ``pid`` on this machine, ``start`` being its start time in
    clock ticks since boot (Linux's /proc), so that a pid since given to another process reads
    differently; None where there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; fields are counted after the command name, which may hold spaces and ')'.
    start = stat.rsplit(")", 1)[1].split()[19]
    return f"{socket.gethostname()}:{pid}:{start}"


def this_process() -> str:
    """This process's ``PROCESS_TAG`` value."""
    return process_identity(os.getpid()) or socket.gethostname()


def _pid_in(process: str) -> int | None:
    """The pid in a ``PROCESS_TAG`` value ``host:pid:start``; None for any other value (a bare
    host name, where /proc could not be read)."""
    parts = process.split(":")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _is_process(process: str, pid: int) -> bool:
    """Whether ``process`` (a ``PROCESS_TAG`` value of this machine) is the live process ``pid``.
    Where /proc hides another user's processes (mounted ``hidepid``), a process of that pid that
    exists is taken to be it: its start time cannot be read, and taking a live writer for dead
    would end or take over a run it is writing."""
    identity = process_identity(pid)
    if identity is not None:
        return identity == process
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def died_on_this_machine(process: str) -> bool:
    """Whether the process that ``PROCESS_TAG`` value ``process`` names ran on this machine and
    has ended; False for one on another machine, which cannot be asked, or no value."""
    pid = _pid_in(process)
    on_this_machine = process.startswith(f"{socket.gethostname()}:")
    return pid is not None and on_this_machine and not _is_process(process, pid)


def live_writer(run: Run) -> int | None:
    """The pid of another process on this machine that is writing ``run`` now, else None: a
    RUNNING run whose process died, or that runs on another machine (which cannot be asked), is
    None."""
    tag = run.data.tags.get(PROCESS_TAG, "")
    pid = _pid_in(tag)
    if run.info.status != "RUNNING" or pid is None or pid == os.getpid():
        return None
    on_this_machine = tag.startswith(f"{socket.gethostname()}:")
    return pid if on_this_machine and _is_process(tag, pid) else None


@contextlib.contextmanager
def run(
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
    reopen_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FINISHED, KILLED on Ctrl-C, or FAILED with the error as a tag.

    ``reopen_run_id`` continues an existing run (a resumed chain's parent) under its own name
    instead of starting a new one.
    """
    with refused_store_writes_in_one_line():
        active = mlflow.start_run(
            run_id=reopen_run_id,
            experiment_id=None if reopen_run_id else experiment_id,
            run_name=None if reopen_run_id else run_name,
            tags={**tags, PROCESS_TAG: this_process()},
            nested=parent_run_id is not None,
            parent_run_id=parent_run_id,
        )
    # Recording how the run ended writes to the store too; where its file refuses writes that
    # fails as well, and the run reads RUNNING, which the next run of the same chain resumes.
    with refused_store_writes_in_one_line():
        try:
            yield active
        # Lightning answers Ctrl-C with a graceful shutdown and then SystemExit(1).
        except (KeyboardInterrupt, SystemExit):
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            logger.warning(
                "stopped: MLflow run %s (%s) is KILLED", active.info.run_id, active.info.run_name
            )
            raise
        except BaseException as exc:
            unreachable = store_unreachable(exc)
            store_failed = (
                unreachable
                or isinstance(exc, TrackingStoreError)
                or sqlite_write_refused(exc) is not None
            )
            _end_failed(exc, store_failed)
            if unreachable:
                raise lost_store_error(active.info.run_id, exc) from exc
            raise
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def _end_failed(exc: BaseException, store_failed: bool) -> None:
    """End the active run FAILED, with the error as a tag.

    Where the store itself failed the command (lost, refusing writes, unable to hand over a file)
    it may not answer the record either: one quick try, and a store that does not answer leaves
    the run RUNNING, which the next run of the same chain marks KILLED and resumes. The run is
    ended here all the same: left active, MLflow's exit hook would end it FINISHED, and a chain
    run again would take the stage for done.
    """
    error = f"{type(exc).__name__}: {exc}"[:5000]
    failed = RunStatus.to_string(RunStatus.FAILED)
    if not store_failed:
        mlflow.set_tag("error", error)
        mlflow.end_run(failed)
        return
    give_up_on_the_store()
    with contextlib.suppress(MlflowException):
        mlflow.set_tag("error", error)
    with contextlib.suppress(MlflowException):
        mlflow.end_run(failed)  # takes the run off MLflow's stack before it writes


def get_run(run_id: str) -> Run:
    return MlflowClient().get_run(run_id)


def mark_killed_if_running(run_id: str) -> None:
    """A run left RUNNING by a process that died is over: record it as KILLED."""
    run = get_run(run_id)
    if run.info.status == "RUNNING":
        _record_killed(run)


def mark_killed_if_writer_died(run: Run) -> None:
    """Record ``run`` as KILLED where it is RUNNING and the process that wrote it, on this
    machine, has ended: killed outright (SIGKILL, the kernel's out-of-memory killer, a rank that
    Lightning's launcher stopped), it could not end its run, which the MLflow UI and ``runs``
    would show RUNNING for ever. A run written from another machine cannot be asked about."""
    process = run.data.tags.get(PROCESS_TAG, "")
    if run.info.status != "RUNNING" or not died_on_this_machine(process):
        return
    ended = f"run {run.info.run_id} ({run.info.run_name}) was RUNNING, but its process (pid "
    ended += f"{_pid_in(process)} on this machine) has ended"
    try:
        _record_killed(run)
    except MlflowException as exc:
        # A store this user may read but not write (another user's run, a read-only file) still
        # lists its runs.
        logger.warning("%s; the store refused to record it as KILLED (%s)", ended, first_line(exc))
        return
    logger.warning("%s: recorded as KILLED", ended)


def _record_killed(run: Run) -> None:
    """End ``run`` KILLED at the last metric it logged (at its start where it logged none): its
    duration in the MLflow UI is then the time it ran, not the time until its death was
    noticed."""
    logged = [metric.timestamp for metric in run.data.to_proto().metrics]
    MlflowClient().set_terminated(
        run.info.run_id,
        RunStatus.to_string(RunStatus.KILLED),
        end_time=max(logged, default=run.info.start_time),
    )


def log_params(params: Mapping[str, Any]) -> None:
    mlflow.log_params({key: "null" if value is None else value for key, value in params.items()})


def log_metrics(metrics: Mapping[str, float]) -> None:
    mlflow.log_metrics(dict(metrics))


def set_tags(tags: Mapping[str, str]) -> None:
    mlflow.set_tags(dict(tags))


def log_dataset(source: Path, columns: Mapping[str, list[str]], context: str) -> None:
    """Record a table the active run read among its datasets (MLflow's run inputs): named for
    its file, with the file's absolute path and a digest of the content, so that runs that read
    other files, or one file before and after an edit, tell apart in the UI and in searches."""
    # The source is built as the "local" kind, not resolved from the path: MLflow registers two
    # sources that claim a path and warns that it is ambiguous.
    where = get_dataset_source_from_json(
        json.dumps({"uri": str(source.resolve())}), source_type="local"
    )
    table = mlflow.data.from_pandas(pd.DataFrame(dict(columns)), source=where, name=source.stem)
    mlflow.log_input(table, context=context)


def metric_history(run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``(step, value)`` pairs of each metric the run logged, for plotting."""
    client = MlflowClient()
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys
    }
    return {key: points for key, points in history.items() if points}


def log_metric_batch(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Metrics of one step to a run that need not be the active one (Lightning logs from hooks)."""
    timestamp = int(time.time() * 1000)
    batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
    with store_in_use(run_id):
        MlflowClient().log_batch(run_id, metrics=batch)
