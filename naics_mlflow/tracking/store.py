"""The tracking store and its experiments: which store (``$MLFLOW_TRACKING_URI`` or the embedded
``sqlite:///mlflow.db`` in the working directory), a check that it can be used before any work,
and one line for a store that is lost or refuses writes. With a local store, experiments put
artifacts in ``./mlartifacts`` explicitly, so they never land in whatever folder a command
happens to run from."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import mlflow
import requests
from mlflow.entities import Experiment
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import DBAPIError

from naics_mlflow.errors import UserError, first_line
from naics_mlflow.files import why_unwritable

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
LOCAL_ARTIFACT_DIR = "mlartifacts"

# Shown by the MLflow UI as a model-development experiment (runs first, not traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# A tracking server must answer its health check within this many seconds. MLflow's own
# requests retry with backoff for minutes, which suits a blip in a long run, not a server that is
# down when a command starts.
SERVER_CHECK_TIMEOUT_S = 10

# What running a command again after a refused write does, said so that it reads true whichever
# command wrote: every one redoes its work, and only train-curriculum has training to pick up.
RERUN_RESUMES_A_CHAIN = "train-curriculum resumes a chain from its last checkpoint"


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


def sqlite_write_refused(exc: BaseException | None) -> str | None:
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
def refused_store_writes_in_one_line() -> Iterator[None]:
    """Turn a write that the file of a sqlite store refuses (a full disk, mostly) into one line
    naming the file."""
    try:
        yield
    except MlflowException as exc:
        if (reason := sqlite_write_refused(exc)) is None:
            raise
        uri = tracking_uri()
        raise TrackingStoreError(
            f"the tracking store {uri} cannot write {sqlite_file(uri).resolve()} ({reason}); "
            f"free space on its disk, then run the same command again ({RERUN_RESUMES_A_CHAIN})"
        ) from exc


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def registry_uri() -> str | None:
    """The model registry's URI where ``MLFLOW_REGISTRY_URI`` names one apart from the tracking
    store; None where the registry is the tracking store's."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or None


@functools.cache
def check_server(
    uri: str,
    role: str = "tracking server",
    variable: str = "MLFLOW_TRACKING_URI",
    when_unset: str = "the local sqlite store",
) -> None:
    """Fail in one line, within seconds, when the MLflow server at ``uri`` does not answer;
    MLflow's own requests would retry for minutes. ``role``, ``variable`` and ``when_unset`` name
    what the server is for, the variable that points at it, and what unsetting it gives."""
    health = f"{uri.rstrip('/')}/health"
    try:
        response = requests.get(health, timeout=SERVER_CHECK_TIMEOUT_S)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise TrackingStoreError(
            f"cannot reach the MLflow {role} at {uri} ({reason}); start it, or point "
            f"{variable} at a running one (unset it for {when_unset})"
        ) from exc
    if not response.ok:
        raise TrackingStoreError(
            f"the MLflow {role} at {uri} refused its health check {health} with HTTP "
            f"{response.status_code}; check the server's log and {variable}"
        )


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store (relative to the working folder unless the
    path after the three slashes is absolute; SQLAlchemy's ``?option=value`` left out); None for
    any other store."""
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not uri.startswith("sqlite:///") or path == ":memory:":
        return None
    return Path(path)


def store_is_missing() -> bool:
    """Whether the store is a sqlite file not yet made in a folder that is there: MLflow would
    create it on a read. (A folder that is not there is the store check's error to report.)"""
    database = sqlite_file(tracking_uri())
    return database is not None and database.parent.is_dir() and not database.exists()


@functools.cache
def _check_store(uri: str) -> None:
    """Fail in one line where MLflow cannot use the store at ``uri``: a sqlite file in a folder
    that cannot be written (MLflow would retry it for minutes), a sqlite file that is not an
    MLflow store, a scheme MLflow does not know, a file store (which MLflow now refuses unless
    told otherwise), a database without its driver, or one that refuses the connection; a new
    sqlite store whose disk refuses its tables."""
    database = sqlite_file(uri)
    if database is not None and (reason := why_unwritable(database)):
        raise TrackingStoreError(
            f"cannot write the tracking store {uri} ({reason}); point MLFLOW_TRACKING_URI at "
            "a folder you can write, or unset it for sqlite:///mlflow.db here"
        )
    if database is not None and not database.exists():
        try:
            _create_sqlite_store(database)
        except (MlflowException, DBAPIError) as exc:
            # MLflow lets SQLAlchemy's error through from the migrations that make the tables.
            if (reason := sqlite_write_refused(exc)) is None:
                raise
            raise TrackingStoreError(
                f"cannot create the tracking store {uri}: the disk refused to write "
                f"{database.resolve()} ({reason}); free space on its disk, or point "
                "MLFLOW_TRACKING_URI at a store elsewhere"
            ) from exc
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


# sqlite's word for a lock it waited for in vain (5 s, Python's and SQLAlchemy's default).
_SQLITE_LOCKED = "database is locked"


def _unusable_store_error(uri: str, reason: str) -> TrackingStoreError:
    if reason == _SQLITE_LOCKED:
        # Pointing elsewhere, as below, would be the wrong advice: the store itself is fine.
        return TrackingStoreError(
            f"the tracking store {uri} is locked: another process has held it for over 5 s (a "
            "command writing to it, a program that has it open), or its file system cannot lock "
            "files (a network share); run the command again once that process is done, or use "
            "a tracking server (mlflow server) for many commands at once or several machines"
        )
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
        check_server(uri)
    else:
        _check_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def use_experiment(name: str) -> str:
    """Point MLflow at the tracking store and return the experiment's id, creating it if new.

    Under ``mlflow run`` the launcher has already chosen the experiment (and opened the run that
    the first :func:`~naics_mlflow.tracking.runs.run` adopts), so its ``MLFLOW_EXPERIMENT_ID``
    wins over the configured name.
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
                f"{deleted_experiment(experiment)}, or name another in mlflow.experiment_name"
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


def deleted_experiment(experiment: Experiment) -> str:
    return (
        f"experiment '{experiment.name}' is deleted (in the MLflow trash); restore it with "
        f"`mlflow experiments restore --experiment-id {experiment.experiment_id}`"
    )


def give_up_on_the_store() -> None:
    """The store is gone, or may be: recording how a run ended would retry for minutes, so each
    record gets one quick try."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(SERVER_CHECK_TIMEOUT_S)


def store_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is MLflow giving up on a request the server never answered (refused,
    timed out, failing after its retries), rather than an answer that refused the request."""
    return isinstance(exc, MlflowException) and any(
        isinstance(error, requests.RequestException) for error in _error_chain(exc)
    )


def lost_store_error(run_id: str, exc: BaseException) -> TrackingStoreError:
    """The one line for a store lost while logging to ``run_id``. It does not say what running
    the command again does, which differs by command: train-curriculum resumes the chain's
    stage, train starts one anew, evaluate, export and embed do their work again."""
    return TrackingStoreError(
        f"lost the MLflow tracking store {tracking_uri()} while logging to run {run_id} "
        f"({first_line(exc)[:300]}); local checkpoints are kept: once the store is back, "
        "run the same command again"
    )


@contextlib.contextmanager
def store_in_use(run_id: str) -> Iterator[None]:
    """Turn a failure to reach the store while training logs into one line naming it. MLflow has
    already retried by then (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, minutes with its defaults)."""
    try:
        with refused_store_writes_in_one_line():
            yield
    except MlflowException as exc:
        raise lost_store_error(run_id, exc) from exc
