"""Files runs log: checkpoints under ``ckpt/``, a running stage's best epoch under ``resume/``,
dictionaries and plots; and their downloads, with one line for a store or disk that fails."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from naics_mlflow.errors import UserError, first_line
from naics_mlflow.tracking.runs import get_run
from naics_mlflow.tracking.store import (
    RERUN_RESUMES_A_CHAIN,
    TrackingStoreError,
    store_in_use,
    tracking_uri,
)

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT_PATH = "ckpt"
LAST_CHECKPOINT = "last.ckpt"

# A running stage's best epoch while a later, worse one is its last.ckpt: what a resume on
# another machine needs, since ckpt/ gets the best file only when the stage ends.
BEST_SO_FAR_ARTIFACT_PATH = "resume"
BEST_SO_FAR = "best.ckpt"

# What a disk that refuses a write says: full, over quota, a file too large, read-only or not
# permitted.
REFUSED_WRITES = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)


class ArtifactWriteError(UserError):
    """A run's artifacts that the disk of a local artifact store refuses."""


def log_dict(values: Mapping[str, Any], artifact_file: str) -> None:
    with _artifacts_written(mlflow.active_run().info.run_id):
        mlflow.log_dict(dict(values), artifact_file)


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
        if exc.errno not in REFUSED_WRITES:
            raise
        location = MlflowClient().get_run(run_id).info.artifact_uri
        raise ArtifactWriteError(
            f"cannot write the artifacts of run {run_id} to {location} ({exc.strerror}); free "
            f"space there, then run the same command again ({RERUN_RESUMES_A_CHAIN})"
        ) from exc


def log_file_to_run(run_id: str, path: Path, artifact_path: str) -> None:
    """Upload a file into a run that need not be active (a finished stage run, say)."""
    with store_in_use(run_id), _artifacts_written(run_id):
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
    with artifact_read(run_id, logged):
        listed = MlflowClient().list_artifacts(run_id, BEST_SO_FAR_ARTIFACT_PATH)
    if not any(artifact.path == logged for artifact in listed):
        return None
    return download_logged(get_run(run_id), logged, download_dir)


def drop_best_so_far(run_id: str) -> None:
    """Delete the run's ``resume/best.ckpt`` once its stage has finished (in this run, or in one
    that resumed it): the best epoch is under ``ckpt/`` by then, and a finished stage is not
    resumed, so the copy would take a checkpoint's space in the store for ever (27 MB for a
    MiniLM stage). A store that refuses the deletion keeps the copy, with one line that says
    so: the stage's record is whole either way."""
    with store_in_use(run_id):
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


def download_logged(run: Run, logged: str, download_dir: Path) -> Path:
    """The run's artifact ``logged`` downloaded into ``download_dir``. Read from the run's
    artifact location itself: through a ``runs:/`` URI MLflow hides why a download failed."""
    with artifact_read(run.info.run_id, logged, download_dir):
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
def artifact_read(run_id: str, artifact: str, download_dir: Path | None = None) -> Iterator[None]:
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
