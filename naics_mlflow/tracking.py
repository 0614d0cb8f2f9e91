"""Everything that talks to MLflow: the store, runs and their tags, metrics, checkpoint artifacts.

The tracking URI is ``$MLFLOW_TRACKING_URI`` or the embedded ``sqlite:///mlflow.db`` in the working
directory. With a local store, experiments put artifacts in ``./mlartifacts`` explicitly, so they
never land in whatever folder a command happens to run from.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import pandas as pd
import requests
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.entities import (
    Experiment,
    LoggedModel,
    LoggedModelStatus,
    Metric,
    Run,
    RunStatus,
    ViewType,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import DBAPIError

from naics_mlflow.errors import UserError, first_line
from naics_mlflow.files import why_unwritable

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
LOCAL_ARTIFACT_DIR = "mlartifacts"
CHECKPOINT_ARTIFACT_PATH = "ckpt"
LAST_CHECKPOINT = "last.ckpt"
# A running stage's best epoch while a later, worse one is its last.ckpt: what a resume on
# another machine needs, since ckpt/ gets the best file only when the stage ends.
BEST_SO_FAR_ARTIFACT_PATH = "resume"
BEST_SO_FAR = "best.ckpt"
# Shown by the MLflow UI as a model-development experiment (runs first, not traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Why discovery skips a finished stage run: the first tag that differs from what makes val_loss
# comparable here, or no such tags at all.
SKIPPED_BECAUSE = {
    "data_digest": "trained on other data",
    "val_protocol": "validated under another protocol",
    "untagged": "from before val_loss was comparable",
}
# What a stage, chain or other tag value used in a search filter may contain: a quote would
# change the query.
FILTER_VALUE = re.compile(r"[A-Za-z0-9_.-]+")


# What a disk that refuses a write says: full, over quota, a file too large, read-only or not
# permitted.
_REFUSED_WRITES = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)

# A tracking server must answer its health check within this many seconds. MLflow's own
# requests retry with backoff for minutes, which suits a blip in a long run, not a server that is
# down when a command starts.
SERVER_CHECK_TIMEOUT_S = 10


# --- the store and its experiments ---------------------------------------------------------


class TrackingStoreError(UserError):
    """The tracking store cannot be reached."""


# sqlite's primary result codes for a write its file refused: the disk is full, or the
# operating system failed the write (a file size limit, a failing or vanished disk).
_SQLITE_WRITE_REFUSED = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR})


def _error_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from or while handling, outermost first: a library's
    own error often wraps the one that says what happened."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _sqlite_write_refused(exc: BaseException | None) -> str | None:
    """sqlite's own reason where ``exc`` comes from a write the store's file refused, else None.
    MLflow wraps SQLAlchemy's error, which wraps sqlite's, whose result code says so."""
    for error in _error_chain(exc):
        if (
            isinstance(error, sqlite3.Error)
            and error.sqlite_errorcode & 0xFF in _SQLITE_WRITE_REFUSED
        ):
            return str(error)
    return None


@contextlib.contextmanager
def _refused_store_writes_in_one_line() -> Iterator[None]:
    """Turn a write that the file of a sqlite store refuses (a full disk, mostly) into one line
    naming the file."""
    try:
        yield
    except MlflowException as exc:
        if (reason := _sqlite_write_refused(exc)) is None:
            raise
        uri = tracking_uri()
        raise TrackingStoreError(
            f"the tracking store {uri} cannot write {_sqlite_file(uri).resolve()} ({reason}); "
            "free space on its disk, then run the command again (a chain resumes from its last "
            "checkpoint)"
        ) from exc


class ArtifactWriteError(UserError):
    """A run's artifacts that the disk of a local artifact store refuses."""


class ModelNameError(UserError):
    """A registered-model name the model registry would refuse."""


def check_model_name(name: str) -> None:
    """Refuse, before any work, a registered-model name the registry would refuse only after the
    model is logged: empty, a path step (``.``, ``..``), or holding ``/`` or ``:`` (MLflow's
    rule)."""
    if not name.strip() or name.strip() in (".", "..") or any(c in name for c in "/:"):
        raise ModelNameError(
            f"--register {name!r} is not a name the model registry accepts; give a non-empty "
            "name without '/' or ':'"
        )


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@functools.cache
def _check_server(uri: str) -> None:
    """Fail in one line, within seconds, when the tracking server at ``uri`` does not answer."""
    health = f"{uri.rstrip('/')}/health"
    try:
        response = requests.get(health, timeout=SERVER_CHECK_TIMEOUT_S)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise TrackingStoreError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); start it, or point "
            "MLFLOW_TRACKING_URI at a running one (unset it for the local sqlite store)"
        ) from exc
    if not response.ok:
        raise TrackingStoreError(
            f"the MLflow tracking server at {uri} refused its health check {health} with HTTP "
            f"{response.status_code}; check the server's log and MLFLOW_TRACKING_URI"
        )


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store (relative to the working folder unless the
    path after the three slashes is absolute; SQLAlchemy's ``?option=value`` left out); None for
    any other store."""
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not uri.startswith("sqlite:///") or path == ":memory:":
        return None
    return Path(path)


def _store_is_missing() -> bool:
    """Whether the store is a sqlite file not yet made in a folder that is there: MLflow would
    create it on a read. (A folder that is not there is the store check's error to report.)"""
    database = _sqlite_file(tracking_uri())
    return database is not None and database.parent.is_dir() and not database.exists()


@functools.cache
def _check_store(uri: str) -> None:
    """Fail in one line where MLflow cannot use the store at ``uri``: a sqlite file in a folder
    that cannot be written (MLflow would retry it for minutes), a sqlite file that is not an
    MLflow store, a scheme MLflow does not know, a file store (which MLflow now refuses unless
    told otherwise), a database without its driver, or one that refuses the connection."""
    database = _sqlite_file(uri)
    if database is not None and (reason := why_unwritable(database)):
        raise TrackingStoreError(
            f"cannot write the tracking store {uri} ({reason}); point MLFLOW_TRACKING_URI at "
            "a folder you can write, or unset it for sqlite:///mlflow.db here"
        )
    if database is not None and not database.exists():
        _create_sqlite_store(database)
    elif database is not None:
        _check_sqlite_is_mlflows(uri, database)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except (MlflowException, DBAPIError, ImportError) as exc:
        # The database's own words, not SQLAlchemy's wrapping of them (which MLflow lets through
        # from a server database that refuses the connection).
        raise _unusable_store_error(
            uri, first_line(exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc)
        ) from exc


def _unusable_store_error(uri: str, reason: str) -> TrackingStoreError:
    return TrackingStoreError(
        f"cannot use the MLflow tracking store {uri} ({reason}); point MLFLOW_TRACKING_URI at a "
        "server (http://...) or a database (sqlite:///path/mlflow.db), or unset it for the "
        "local sqlite store"
    )


# Tables that every MLflow sqlite store has, whatever its schema's version.
_MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs"})


def _check_sqlite_is_mlflows(uri: str, database: Path) -> None:
    """Refuse an existing sqlite file that is not an MLflow store, read without writing to it:
    one that is not a database at all, or another application's database, into which MLflow
    would otherwise write its own tables on opening it (even for a command that only reads). An
    empty database is a store MLflow has yet to fill."""
    read_only = f"{database.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(read_only, uri=True)) as connection:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = sorted(name for (name,) in rows if not name.startswith("sqlite_"))
    except sqlite3.DatabaseError as exc:
        raise _unusable_store_error(uri, first_line(exc)) from exc
    if tables and not _MLFLOW_TABLES.issubset(tables):
        shown = ", ".join(tables[:5]) + (f", ... ({len(tables)} tables)" if len(tables) > 5 else "")
        raise TrackingStoreError(
            f"the tracking store {uri} is another application's database (its tables: {shown}), "
            "and MLflow would add its own tables to it; point MLFLOW_TRACKING_URI at an MLflow "
            "store or a new file (sqlite:///path/mlflow.db)"
        )


def _create_sqlite_store(database: Path) -> None:
    """Create the sqlite store ``database`` whole: its tables are made under a name of this
    process's own, then linked to ``database`` only if no other process has made it meanwhile.

    MLflow makes and migrates a new store's tables when it first opens the file. Two commands
    doing that at once (a sweep started in a fresh folder) interleave their migrations, and two
    stores in five were then left half-migrated for good, refused by every later command. A link,
    unlike a rename, never replaces a store that another command has already begun to log to.
    """
    database.parent.mkdir(parents=True, exist_ok=True)
    partial = database.with_name(f"{database.name}.{os.getpid()}.partial")
    try:
        MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)
        try:
            os.link(partial, database)
        except FileExistsError:
            pass  # another command made the store first; it is as complete as this one
        except OSError:
            # A file system without hard links (FAT, some network shares): a rename still
            # publishes the tables whole, without the guard against a store made meanwhile.
            if not database.exists():
                os.rename(partial, database)
    finally:
        partial.unlink(missing_ok=True)


def connect() -> str:
    """Point MLflow at the tracking store and return its URI; the store is checked once."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    else:
        _check_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def use_experiment(name: str) -> str:
    """Point MLflow at the tracking store and return the experiment's id, creating it if new.

    Under ``mlflow run`` the launcher has already chosen the experiment (and opened the run that
    the first :func:`run` adopts), so its ``MLFLOW_EXPERIMENT_ID`` wins over the configured name.
    """
    uri = connect()
    if os.environ.get("MLFLOW_RUN_ID") and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
        chosen = MlflowClient().get_experiment(experiment_id).name
        if chosen != name:
            # The launcher's run cannot move; saying so is all a project can do.
            logger.warning(
                "mlflow run put this run in experiment '%s', not '%s' where the naics-embedder "
                "commands log; add --experiment-name %s to mlflow run to compare them side by side",
                chosen,
                name,
                name,
            )
    elif (experiment := mlflow.get_experiment_by_name(name)) is not None:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            raise UserError(
                f"{_deleted_experiment(experiment)}, or name another in mlflow.experiment_name"
            )
    else:
        experiment_id = _create_experiment(name, uri)
    _mark_model_development(experiment_id)
    return experiment_id


def _create_experiment(name: str, uri: str) -> str:
    location = Path(LOCAL_ARTIFACT_DIR).resolve().as_uri() if _is_local_store(uri) else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        # Another process created it between our lookup and our create.
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


def _mark_model_development(experiment_id: str) -> None:
    """Tag the experiment as model development: MLflow 3's UI opens an experiment without a kind
    on its GenAI pages (traces, prompts), and one with this kind on its runs."""
    client = MlflowClient()

    def is_marked() -> bool:
        return client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND

    if is_marked():
        return
    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except MlflowException:
        # A command started at the same time inserted the same tag first, and a SQL store
        # refuses the second insert; any other failure leaves the experiment unmarked.
        if not is_marked():
            raise


# --- runs ----------------------------------------------------------------------------------


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


def _process_identity(pid: int) -> str | None:
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


def _this_process() -> str:
    """This process's ``PROCESS_TAG`` value."""
    return _process_identity(os.getpid()) or socket.gethostname()


def _pid_in(process: str) -> int | None:
    """The pid in a ``PROCESS_TAG`` value ``host:pid:start``; None for any other value (a bare
    host name, where /proc could not be read)."""
    parts = process.split(":")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _died_on_this_machine(process: str) -> bool:
    """Whether the process that ``PROCESS_TAG`` value ``process`` names ran on this machine and
    has ended; False for one on another machine, which cannot be asked, or no value."""
    pid = _pid_in(process)
    on_this_machine = process.startswith(f"{socket.gethostname()}:")
    return pid is not None and on_this_machine and _process_identity(pid) != process


def live_writer(run: Run) -> int | None:
    """The pid of another process on this machine that is writing ``run`` now, else None: a
    RUNNING run whose process died, or that runs on another machine (which cannot be asked), is
    None."""
    tag = run.data.tags.get(PROCESS_TAG, "")
    pid = _pid_in(tag)
    if run.info.status != "RUNNING" or pid is None or pid == os.getpid():
        return None
    return pid if _process_identity(pid) == tag else None


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
    with _refused_store_writes_in_one_line():
        active = mlflow.start_run(
            run_id=reopen_run_id,
            experiment_id=None if reopen_run_id else experiment_id,
            run_name=None if reopen_run_id else run_name,
            tags={**tags, PROCESS_TAG: _this_process()},
            nested=parent_run_id is not None,
            parent_run_id=parent_run_id,
        )
    # Recording how the run ended writes to the store too; where its file refuses writes that
    # fails as well, and the run reads RUNNING, which the next run of the same chain resumes.
    with _refused_store_writes_in_one_line():
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
            unreachable = _store_unreachable(exc)
            store_failed = (
                unreachable
                or isinstance(exc, TrackingStoreError)
                or _sqlite_write_refused(exc) is not None
            )
            _end_failed(exc, store_failed)
            if unreachable:
                raise _lost_store_error(active.info.run_id, exc) from exc
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
    _give_up_on_the_store()
    with contextlib.suppress(MlflowException):
        mlflow.set_tag("error", error)
    with contextlib.suppress(MlflowException):
        mlflow.end_run(failed)  # takes the run off MLflow's stack before it writes


def _give_up_on_the_store() -> None:
    """The store is gone, or may be: recording how a run ended would retry for minutes, so each
    record gets one quick try."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(SERVER_CHECK_TIMEOUT_S)


def _store_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is MLflow giving up on a request the server never answered (refused,
    timed out, failing after its retries), rather than an answer that refused the request."""
    return isinstance(exc, MlflowException) and any(
        isinstance(error, requests.RequestException) for error in _error_chain(exc)
    )


def _lost_store_error(run_id: str, exc: BaseException) -> TrackingStoreError:
    """The one line for a store lost while logging to ``run_id``. It does not say what running
    the command again does, which differs by command: train-curriculum resumes the chain's
    stage, train starts one anew, evaluate, export and embed do their work again."""
    return TrackingStoreError(
        f"lost the MLflow tracking store {tracking_uri()} while logging to run {run_id} "
        f"({first_line(exc)[:300]}); local checkpoints are kept: once the store is back, "
        "run the same command again"
    )


def get_run(run_id: str) -> Run:
    return MlflowClient().get_run(run_id)


def mark_killed_if_running(run_id: str) -> None:
    """A run left RUNNING by a process that died is over: record it as KILLED."""
    if get_run(run_id).info.status == "RUNNING":
        MlflowClient().set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


# --- what runs log: params, metrics, datasets, checkpoints ---------------------------------


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


def log_dict(values: Mapping[str, Any], artifact_file: str) -> None:
    with _artifacts_written(mlflow.active_run().info.run_id):
        mlflow.log_dict(dict(values), artifact_file)


def metric_history(run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``(step, value)`` pairs of each metric the run logged, for plotting."""
    client = MlflowClient()
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys
    }
    return {key: points for key, points in history.items() if points}


def log_artifact(path: Path, artifact_path: str) -> None:
    with _artifacts_written(mlflow.active_run().info.run_id):
        mlflow.log_artifact(str(path), artifact_path)


@contextlib.contextmanager
def _artifacts_written(run_id: str) -> Iterator[None]:
    """Turn a write that a local artifact store's disk refuses (full, over quota, read-only)
    into one line naming where the run's artifacts go; MLflow lets the bare OSError through."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _REFUSED_WRITES:
            raise
        location = MlflowClient().get_run(run_id).info.artifact_uri
        raise ArtifactWriteError(
            f"cannot write the artifacts of run {run_id} to {location} ({exc.strerror}); free "
            "space there, then run the command again (a chain resumes from its last checkpoint, "
            "which is kept on local disk)"
        ) from exc


@contextlib.contextmanager
def _store_in_use(run_id: str) -> Iterator[None]:
    """Turn a failure to reach the store while training logs into one line naming it. MLflow has
    already retried by then (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, minutes with its defaults)."""
    try:
        with _refused_store_writes_in_one_line():
            yield
    except MlflowException as exc:
        raise _lost_store_error(run_id, exc) from exc


def log_file_to_run(run_id: str, path: Path, artifact_path: str) -> None:
    """Upload a file into a run that need not be active (a finished stage run, say)."""
    with _store_in_use(run_id), _artifacts_written(run_id):
        MlflowClient().log_artifact(run_id, str(path), artifact_path)


def log_checkpoint(run_id: str, path: Path) -> None:
    log_file_to_run(run_id, path, CHECKPOINT_ARTIFACT_PATH)


def log_best_so_far(run_id: str, path: Path) -> None:
    """Upload ``path`` as the run's ``resume/best.ckpt``, over the one before: one file a run,
    however often its best changes."""
    with tempfile.TemporaryDirectory(prefix="naics-best-") as folder:
        named = Path(folder) / BEST_SO_FAR
        shutil.copyfile(path, named)
        log_file_to_run(run_id, named, BEST_SO_FAR_ARTIFACT_PATH)


def download_best_so_far(run_id: str, download_dir: Path) -> Path | None:
    """The run's ``resume/best.ckpt``, downloaded into ``download_dir``; None where it logged
    none (its best was always its last epoch, or it ran before such files were logged)."""
    logged = f"{BEST_SO_FAR_ARTIFACT_PATH}/{BEST_SO_FAR}"
    with _artifact_read(run_id, logged):
        listed = MlflowClient().list_artifacts(run_id, BEST_SO_FAR_ARTIFACT_PATH)
    if not any(artifact.path == logged for artifact in listed):
        return None
    return _download_logged(get_run(run_id), logged, download_dir)


def drop_best_so_far(run_id: str) -> None:
    """Delete the run's ``resume/best.ckpt`` once its stage has finished (in this run, or in one
    that resumed it): the best epoch is under ``ckpt/`` by then, and a finished stage is not
    resumed, so the copy would take a checkpoint's space in the store for ever (27 MB for a
    MiniLM stage). A store that refuses the deletion keeps the copy, with one line that says
    so: the stage's record is whole either way."""
    with _store_in_use(run_id):
        listed = MlflowClient().list_artifacts(run_id, BEST_SO_FAR_ARTIFACT_PATH)
        artifact_uri = get_run(run_id).info.artifact_uri
    if not listed:
        return
    try:
        get_artifact_repository(artifact_uri).delete_artifacts(BEST_SO_FAR_ARTIFACT_PATH)
    except (MlflowException, requests.RequestException, OSError) as exc:
        logger.warning(
            "run %s keeps %s/%s, a copy of its best epoch for a resume, which the store would "
            "not delete (%s); deleting it by hand loses nothing",
            run_id,
            BEST_SO_FAR_ARTIFACT_PATH,
            BEST_SO_FAR,
            first_line(exc),
        )
        return
    logger.info(
        "run %s: deleted %s/%s, the copy of its best epoch kept for a resume",
        run_id,
        BEST_SO_FAR_ARTIFACT_PATH,
        BEST_SO_FAR,
    )


def _download_logged(run: Run, logged: str, download_dir: Path) -> Path:
    """The run's artifact ``logged`` downloaded into ``download_dir``. Read from the run's
    artifact location itself: through a ``runs:/`` URI MLflow hides why a download failed."""
    with _artifact_read(run.info.run_id, logged, download_dir):
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{run.info.artifact_uri}/{logged}", dst_path=str(download_dir)
            )
        )


def _artifact_failure(exc: BaseException) -> str:
    """Why reading an artifact failed, in one line. MLflow's download error opens with a line
    saying only that it failed, and puts each file's own error under a ``##### File`` header."""
    lines = str(exc).strip().splitlines()
    for header, reason in itertools.pairwise(lines):
        if header.startswith("##### File "):
            return reason[:300]
    return first_line(exc)[:300]


@contextlib.contextmanager
def _artifact_read(run_id: str, artifact: str, download_dir: Path | None = None) -> Iterator[None]:
    """Turn a store that fails to list or hand over a run's artifact into one line naming it.

    A server can go away between the search that found the run and the download, and a file
    can be missing or unreadable in a local artifact folder (a clean-up, a lost mount), where
    MLflow lets its own error or the bare OSError through; a download can also fail on the disk
    it writes to (``download_dir``), which MLflow reports the same way.
    """
    gone_for_good = (
        f"or, where it is gone for good, delete that run (mlflow runs delete --run-id {run_id})"
    )
    try:
        yield
    except (MlflowException, OSError) as exc:
        if download_dir is None:
            raise TrackingStoreError(
                f"cannot read {artifact} of run {run_id} from the tracking store "
                f"{tracking_uri()} ({_artifact_failure(exc)}); run the command again once the "
                f"store serves it, {gone_for_good}"
            ) from exc
        raise TrackingStoreError(
            f"cannot download {artifact} of run {run_id} from the tracking store "
            f"{tracking_uri()} into {download_dir} ({_artifact_failure(exc)}); free space there "
            f"if that disk is full, else run the command again once the store serves the file, "
            f"{gone_for_good}"
        ) from exc


def log_metric_batch(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Metrics of one step to a run that need not be the active one (Lightning logs from hooks)."""
    timestamp = int(time.time() * 1000)
    batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
    with _store_in_use(run_id):
        MlflowClient().log_batch(run_id, metrics=batch)


# --- --from-checkpoint references ----------------------------------------------------------


class CheckpointReferenceError(UserError):
    """A ``--from-checkpoint`` reference that names no usable checkpoint."""


def _best_in(folder: Path, reference: str) -> Path:
    """The best checkpoint in a downloaded ``ckpt/`` folder: the one that is not ``last.ckpt``."""
    candidates = sorted(p for p in folder.rglob("*.ckpt") if p.name != LAST_CHECKPOINT)
    if not candidates:
        raise CheckpointReferenceError(f"{reference} holds no best checkpoint (*.ckpt)")
    return candidates[0]


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path  # a local checkpoint file
    run_id: str | None  # the run that logged it, when the reference named one


def resolve_checkpoint(
    reference: str,
    download_dir: Path,
    comparable: Callable[[str], Mapping[str, str]] | None = None,
) -> ResolvedCheckpoint:
    """The checkpoint a ``--from-checkpoint`` reference names: a stage name (its best run in the
    store among those whose tags equal ``comparable(stage)``), a ``runs:/<id>/ckpt`` or other
    artifact URI (``models:/<name>/<version>``, a registered model, holds its checkpoint), or a
    path to a ``.ckpt`` file."""
    if "://" in reference or reference.startswith(("runs:/", "models:/")):
        named_run = re.match(r"runs:/([^/]+)", reference)
        path = _download_reference(reference, download_dir)
        run_id = named_run.group(1) if named_run else None
        if run_id is not None:
            _check_not_deleted(get_run(run_id))
        return ResolvedCheckpoint(path, run_id)
    path = Path(reference)
    if path.is_file():
        return ResolvedCheckpoint(path, None)
    if path.suffix == ".ckpt" or len(path.parts) > 1:
        if path.is_dir():
            raise CheckpointReferenceError(
                f"{reference} is a folder; give a checkpoint file in it, a stage name or a "
                "runs:/<run_id>/ckpt URI"
            )
        raise CheckpointReferenceError(f"checkpoint file {reference} does not exist")
    run = best_run_of_stage(reference, comparable(reference) if comparable else None)
    best = download_checkpoint(run, run.data.tags["best_checkpoint"], download_dir)
    return ResolvedCheckpoint(best, run.info.run_id)


def _check_not_deleted(run: Run) -> None:
    """Refuse a checkpoint's run that is in the MLflow trash, as a stage's lookup passes over it:
    a run there takes no logging (``export``, ``evaluate``), and may soon be gone for good."""
    if run.info.lifecycle_stage != "deleted":
        return
    experiment = MlflowClient().get_experiment(run.info.experiment_id)
    if experiment.lifecycle_stage == "deleted":
        raise CheckpointReferenceError(
            f"run {run.info.run_id} is deleted with its experiment: "
            f"{_deleted_experiment(experiment)}, or give another checkpoint"
        )
    raise CheckpointReferenceError(
        f"run {run.info.run_id} is deleted (in the MLflow trash); restore it with "
        f"`mlflow runs restore --run-id {run.info.run_id}`, or give another checkpoint"
    )


def _deleted_experiment(experiment: Experiment) -> str:
    return (
        f"experiment '{experiment.name}' is deleted (in the MLflow trash); restore it with "
        f"`mlflow experiments restore --experiment-id {experiment.experiment_id}`"
    )


def _download_reference(reference: str, download_dir: Path) -> Path:
    if reference.startswith(("runs:/", "models:/")) and _store_is_missing():
        raise _missing_store_error(f"cannot download {reference}")
    connect()
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=str(download_dir))
        )
    except (MlflowException, OSError) as exc:
        raise CheckpointReferenceError(
            f"cannot download {reference} from {tracking_uri()} ({first_line(exc)})"
        ) from exc
    return local if local.is_file() else _best_in(local, reference)


# --- discovery -----------------------------------------------------------------------------


def tag_equals(tag: str, value: str) -> str:
    """The filter clause ``tags.<tag> = '<value>'``, for a value that may come from a user."""
    if not FILTER_VALUE.fullmatch(value):
        raise UserError(
            f"'{value}' is not a valid {tag} name: use letters, digits, '_', '-' and '.' only"
        )
    return f"tags.{tag} = '{value}'"


def search_runs(filter_string: str, order_by: list[str] | None = None) -> list[Run]:
    """Runs of every experiment in the store matching an MLflow filter, in ``order_by`` order.

    All experiments, because ``mlflow run`` puts runs in the experiment its caller chose. A
    sqlite store whose file is not there holds no runs, and a search must not create it.
    """
    if _store_is_missing():
        return []
    connect()
    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=filter_string,
        order_by=order_by or ["attributes.start_time DESC"],
        output_format="list",
    )


def trashed_runs(filter_string: str) -> str:
    """For a search of active runs that found none: how many runs matching ``filter_string`` lie
    in the MLflow trash and how to restore them, as a clause in parentheses ("" if none), since
    "no runs" alone reads as if they never were."""
    if _store_is_missing():
        return ""
    client = MlflowClient()
    experiments = client.search_experiments(view_type=ViewType.ALL)
    trashed = client.search_runs(
        [experiment.experiment_id for experiment in experiments],
        filter_string,
        run_view_type=ViewType.DELETED_ONLY,
        order_by=["attributes.start_time DESC"],
    )
    if not trashed:
        return ""
    deleted_experiments = {
        experiment.experiment_id: experiment
        for experiment in experiments
        if experiment.lifecycle_stage == "deleted"
    }
    parts = []
    for experiment_id, experiment in deleted_experiments.items():
        count = sum(run.info.experiment_id == experiment_id for run in trashed)
        if count:
            parts.append(
                f"{count} with its deleted experiment '{experiment.name}': restore it with "
                f"`mlflow experiments restore --experiment-id {experiment_id}`"
            )
    deleted = [
        run.info.run_id for run in trashed if run.info.experiment_id not in deleted_experiments
    ]
    if len(deleted) == 1:
        parts.append(f"1 deleted: restore it with `mlflow runs restore --run-id {deleted[0]}`")
    elif deleted:
        parts.append(
            f"{len(deleted)} deleted: restore each with `mlflow runs restore --run-id <id>`, "
            f"the newest is {deleted[0]}"
        )
    return f" ({len(trashed)} in the MLflow trash: {'; '.join(parts)})"


def has_checkpoint(run: Run, name: str) -> bool:
    logged = f"{CHECKPOINT_ARTIFACT_PATH}/{name}"
    with _artifact_read(run.info.run_id, logged):
        listed = MlflowClient().list_artifacts(run.info.run_id, CHECKPOINT_ARTIFACT_PATH)
    return any(artifact.path == logged for artifact in listed)


def download_checkpoint(run: Run, name: str, download_dir: Path) -> Path:
    """``ckpt/<name>`` of ``run`` as a local file in ``download_dir``.

    ``name`` often comes from a tag anyone with access to the store can edit: it must be a plain
    file name, so the download cannot land outside ``download_dir``.
    """
    if name in {"", ".", ".."} or Path(name).name != name or "\\" in name:
        raise CheckpointReferenceError(
            f"run {run.info.run_id} names checkpoint {name!r}, which is not a file name in "
            f"{CHECKPOINT_ARTIFACT_PATH}/; fix the run's best_checkpoint tag"
        )
    return _download_logged(
        run, f"{CHECKPOINT_ARTIFACT_PATH}/{name}", download_dir / run.info.run_id
    )


def download_best_checkpoint(run_id: str, download_dir: Path) -> Path:
    """The checkpoint a finished stage run names in its ``best_checkpoint`` tag, downloaded."""
    run = MlflowClient().get_run(run_id)
    return download_checkpoint(run, run.data.tags["best_checkpoint"], download_dir)


def best_run_of_stage(stage: str, comparable: Mapping[str, str] | None = None) -> Run:
    """The FINISHED run of ``stage`` with the lowest ``best_val_loss`` that logged its best
    checkpoint, among the runs whose tags equal ``comparable`` (``data_digest``,
    ``val_protocol``): a val_loss measured on other data or under another protocol says nothing
    about this one."""
    if not FILTER_VALUE.fullmatch(stage):
        raise CheckpointReferenceError(
            f"'{stage}' is not a stage name (letters, digits, '_', '-', '.'), a "
            "runs:/<run_id>/ckpt URI or an existing checkpoint file; check --from-checkpoint"
        )
    finished_of_stage = f"{tag_equals('stage', stage)} AND attributes.status = 'FINISHED'"
    runs = search_runs(finished_of_stage, ["metrics.best_val_loss ASC"])
    skipped: dict[str, int] = {}
    considered = []
    for run in runs:
        differing = [
            tag for tag, value in (comparable or {}).items() if run.data.tags.get(tag) != value
        ]
        if differing:
            reason = differing[0] if differing[0] in run.data.tags else "untagged"
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            considered.append(run)
    reasons = ", ".join(f"{count} {SKIPPED_BECAUSE[tag]}" for tag, count in skipped.items())
    if skipped:
        logger.info("stage %s: skipped %d finished runs: %s", stage, sum(skipped.values()), reasons)
    for candidate in considered:
        best = candidate.data.tags.get("best_checkpoint")
        if best and "best_val_loss" in candidate.data.metrics and has_checkpoint(candidate, best):
            logger.info(
                "checkpoint of stage %s: run %s, best_val_loss %.4f, the lowest of %d comparable "
                "finished runs of that stage",
                stage,
                candidate.info.run_id,
                candidate.data.metrics["best_val_loss"],
                len(considered),
            )
            return candidate
    if skipped and not considered:
        raise CheckpointReferenceError(
            f"no finished run of stage '{stage}' in {tracking_uri()} is comparable with this one "
            f"({reasons}); train that stage here, or pass a runs:/<run_id>/ckpt URI"
        )
    if _store_is_missing():
        raise _missing_store_error(f"cannot look up stage '{stage}'")
    trashed = trashed_runs(finished_of_stage)
    raise CheckpointReferenceError(
        f"no finished run of stage '{stage}' with a logged checkpoint in {tracking_uri()}"
        f"{trashed}; "
        "train that stage first, or pass a checkpoint file or a runs:/<run_id>/ckpt URI"
    )


def _missing_store_error(what_failed: str) -> CheckpointReferenceError:
    """A reference looked up in a sqlite store whose file is not there (the wrong folder, most
    often), which a lookup must not create."""
    return CheckpointReferenceError(
        f"{what_failed}: the tracking store {tracking_uri()} does not exist "
        f"({_sqlite_file(tracking_uri()).resolve()}); run from the folder you trained in, "
        "point MLFLOW_TRACKING_URI at your store, or pass a checkpoint file"
    )


# --- logged models -------------------------------------------------------------------------


def holds_logged_model(run: Run, name: str) -> bool:
    """Whether ``run`` logged a model named ``name`` whose upload finished (READY): a model whose
    logging was cut short stays PENDING."""
    return any(model.status == LoggedModelStatus.READY for model in _logged_models(run, name))


def delete_models_cut_short(run: Run, name: str) -> None:
    """Delete each model named ``name`` that ``run`` left PENDING: one whose logging a kill or a
    lost store cut short would read as still uploading for ever. Only for a run that no process
    is writing now, whose PENDING models are then all cut short."""
    client = MlflowClient()
    for model in _logged_models(run, name):
        if model.status == LoggedModelStatus.PENDING:
            client.delete_logged_model(model.model_id)


@contextlib.contextmanager
def new_logged_model(
    run_id: str, name: str, model_params: Mapping[str, Any]
) -> Iterator[LoggedModel]:
    """A new PENDING model named ``name`` of run ``run_id``, for MLflow's ``Model.log`` to fill
    (its ``model_id``); deleted if its logging fails or a Ctrl-C or SIGTERM cuts it short. A
    write that a disk refuses, in the temporary folder where the model's files are gathered or in
    a local artifact store, ends in one line naming both places.

    MLflow would mark it FAILED, or leave it PENDING on a stop, and ``runs:/<run_id>/<name>``
    reads the run's newest model of that name whatever its status: a stopped export made the
    run's earlier whole model unreachable. Made here in the run's experiment, with the run's
    params, as MLflow makes one for the active run (for a run that is not active it files the
    model under the Default experiment), updated by ``model_params``: what the model itself was
    made with.
    """
    run = get_run(run_id)
    client = MlflowClient()
    params = {**run.data.params, **{key: str(value) for key, value in model_params.items()}}
    with _refused_store_writes_in_one_line():
        _delete_models_of_dead_writers(run, name)
        model = client.create_logged_model(
            run.info.experiment_id,
            name=name,
            source_run_id=run_id,
            params=params,
            tags={PROCESS_TAG: _this_process()},
        )
    try:
        with _refused_store_writes_in_one_line():
            yield model
    except BaseException as cut_short:
        # A store that is lost or refuses writes takes no deletion either: the model stays
        # PENDING, which a chain run again deletes (see :func:`delete_models_cut_short`).
        if _store_unreachable(cut_short):
            raise _lost_store_error(run_id, cut_short) from cut_short
        if isinstance(cut_short, TrackingStoreError):
            raise
        client.delete_logged_model(model.model_id)
        if isinstance(cut_short, KeyboardInterrupt):
            logger.warning("stopped: model '%s' was not logged into run %s", name, run_id)
        if isinstance(cut_short, OSError) and cut_short.errno in _REFUSED_WRITES:
            # pyarrow's and shutil's errors name the file differently, or not at all.
            raise ArtifactWriteError(
                f"cannot write model '{name}' of run {run_id} ({os.strerror(cut_short.errno)}); "
                f"free space in the temporary folder {tempfile.gettempdir()} (TMPDIR) and where "
                f"the model's files go, {model.artifact_location}, then run the command again"
            ) from cut_short
        raise


def _delete_models_of_dead_writers(run: Run, name: str) -> None:
    """Delete each model named ``name`` that ``run`` holds PENDING and whose writer, a process on
    this machine, has died: a SIGKILL cannot delete its own, which would read as still uploading
    for ever. A model being written from another machine cannot be told from one whose writer
    died there, and one logged before 2026-12-06 names no writer: both are kept."""
    for model in _logged_models(run, name):
        if model.status == LoggedModelStatus.PENDING and _died_on_this_machine(
            model.tags.get(PROCESS_TAG, "")
        ):
            MlflowClient().delete_logged_model(model.model_id)
            logger.warning(
                "deleted model %s of run %s: left PENDING by a process that died while it logged "
                "it",
                model.model_id,
                run.info.run_id,
            )


def _logged_models(run: Run, name: str) -> list[LoggedModel]:
    # Not filtered by status: MLflow 3.17's sqlite store matches no model by status.
    return MlflowClient().search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'",
    )
