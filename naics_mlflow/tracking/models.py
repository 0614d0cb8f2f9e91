"""Logged models (``export``): made PENDING, deleted when their logging is cut short, and
registered only once logged, with the name and the registry checked before any work."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import mlflow
from mlflow.entities import LoggedModel, LoggedModelStatus, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import DBAPIError

from naics_mlflow.errors import UserError, first_line
from naics_mlflow.tracking.artifacts import REFUSED_WRITES, ArtifactWriteError
from naics_mlflow.tracking.runs import PROCESS_TAG, died_on_this_machine, get_run, this_process
from naics_mlflow.tracking.store import (
    TrackingStoreError,
    check_server,
    lost_store_error,
    refused_store_writes_in_one_line,
    registry_uri,
    store_unreachable,
)

logger = logging.getLogger(__name__)


class RegistrationError(UserError):
    """A model that cannot be registered: a name the model registry refuses, or a registry that
    cannot be used."""


def check_registration(name: str) -> None:
    """Refuse, before any work, what would fail only once the model is logged: a registered-model
    name the registry refuses (empty, a path step ``.`` or ``..``, or holding ``/`` or ``:``:
    MLflow's rule), or a separate registry (``MLFLOW_REGISTRY_URI``) that cannot be used. Unset,
    the registry is the tracking store, which every command checks as it connects."""
    if not name.strip() or name.strip() in (".", "..") or any(c in name for c in "/:"):
        raise RegistrationError(
            f"--register {name!r} is not a name the model registry accepts; give a non-empty "
            "name without '/' or ':'"
        )
    registry = registry_uri()
    if registry is None:
        return
    if registry.startswith(("http://", "https://")):
        check_server(
            registry, "model registry", "MLFLOW_REGISTRY_URI", "the tracking store's registry"
        )
        return
    try:
        MlflowClient(registry_uri=registry).search_registered_models(max_results=1)
    except (MlflowException, DBAPIError, OSError, ImportError) as exc:
        raise RegistrationError(
            f"cannot use the model registry {registry} ({first_line(exc)[:300]}); point "
            "MLFLOW_REGISTRY_URI at one you can use, unset it to register in the tracking "
            "store, or leave out --register"
        ) from exc


def register_logged_model(run_id: str, model: LoggedModel, name: str) -> None:
    """Register ``model``, logged and READY in run ``run_id``, as a new version of ``name``.

    Apart from the logging, so that a registry failing now (a server gone since the check)
    leaves the logged model as it is: registering inside MLflow's ``Model.log`` made the failure
    the logging's, and the finished model was deleted."""
    try:
        mlflow.register_model(f"models:/{model.model_id}", name)
    except (MlflowException, DBAPIError, OSError) as exc:
        raise RegistrationError(
            f"model logged as runs:/{run_id}/{model.name}, but registering it as '{name}' in "
            f"{mlflow.get_registry_uri()} failed ({first_line(exc)[:300]}); once the registry "
            "works, run the same command again (it logs the model anew and registers that)"
        ) from exc


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
    with refused_store_writes_in_one_line():
        _delete_models_of_dead_writers(run, name)
        model = client.create_logged_model(
            run.info.experiment_id,
            name=name,
            source_run_id=run_id,
            params=params,
            tags={PROCESS_TAG: this_process()},
        )
    try:
        with refused_store_writes_in_one_line():
            yield model
    except BaseException as cut_short:
        # A store that is lost or refuses writes takes no deletion either: the model stays
        # PENDING, which a chain run again deletes (see :func:`delete_models_cut_short`).
        if store_unreachable(cut_short):
            raise lost_store_error(run_id, cut_short) from cut_short
        if isinstance(cut_short, TrackingStoreError):
            raise
        client.delete_logged_model(model.model_id)
        if isinstance(cut_short, KeyboardInterrupt):
            logger.warning("stopped: model '%s' was not logged into run %s", name, run_id)
        if isinstance(cut_short, OSError) and cut_short.errno in REFUSED_WRITES:
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
        if model.status == LoggedModelStatus.PENDING and died_on_this_machine(
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
