"""Finding checkpoints in the store: what a ``--from-checkpoint`` stage name (its best comparable
run) or ``runs:/`` or ``models:/`` URI names (:mod:`naics_mlflow.references` reads a file), and
searches of runs by tag."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import mlflow
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from naics_mlflow.errors import UserError, first_line
from naics_mlflow.references import CheckpointReferenceError, ResolvedCheckpoint, is_uri
from naics_mlflow.tracking.artifacts import (
    CHECKPOINT_ARTIFACT_PATH,
    LAST_CHECKPOINT,
    artifact_read,
    download_logged,
)
from naics_mlflow.tracking.runs import get_run
from naics_mlflow.tracking.store import (
    connect,
    deleted_experiment,
    registry_uri,
    sqlite_file,
    store_is_missing,
    tracking_uri,
)

logger = logging.getLogger(__name__)

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


def _best_in(folder: Path, reference: str) -> Path:
    """The best checkpoint in a downloaded ``ckpt/`` folder: the one that is not ``last.ckpt``."""
    candidates = sorted(p for p in folder.rglob("*.ckpt") if p.name != LAST_CHECKPOINT)
    if not candidates:
        raise CheckpointReferenceError(f"{reference} holds no best checkpoint (*.ckpt)")
    return candidates[0]


def resolve_tracked_checkpoint(
    reference: str,
    download_dir: Path,
    comparable: Callable[[str], Mapping[str, str]] | None = None,
) -> ResolvedCheckpoint:
    """The checkpoint an artifact URI or a stage name names, downloaded into ``download_dir``
    (see :func:`naics_mlflow.references.resolve_checkpoint`, which reads a file itself)."""
    if is_uri(reference):
        named_run = re.match(r"runs:/([^/]+)", reference)
        path = _download_reference(reference, download_dir)
        run_id = named_run.group(1) if named_run else None
        if run_id is not None:
            _check_not_deleted(get_run(run_id))
        return ResolvedCheckpoint(path, run_id)
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
            f"{deleted_experiment(experiment)}, or give another checkpoint"
        )
    raise CheckpointReferenceError(
        f"run {run.info.run_id} is deleted (in the MLflow trash); restore it with "
        f"`mlflow runs restore --run-id {run.info.run_id}`, or give another checkpoint"
    )


def _download_reference(reference: str, download_dir: Path) -> Path:
    if reference.startswith(("runs:/", "models:/")) and store_is_missing():
        raise _missing_store_error(f"cannot download {reference}")
    connect()
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=str(download_dir))
        )
    except (MlflowException, OSError) as exc:
        registry = registry_uri()
        source = (
            f"the model registry {registry}"
            if reference.startswith("models:/") and registry is not None
            else tracking_uri()
        )
        raise CheckpointReferenceError(
            f"cannot download {reference} from {source} ({first_line(exc)})"
        ) from exc
    return local if local.is_file() else _best_in(local, reference)


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
    if store_is_missing():
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
    if store_is_missing():
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
    with artifact_read(run.info.run_id, logged):
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
    return download_logged(
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
    if store_is_missing():
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
        f"({sqlite_file(tracking_uri()).resolve()}); run from the folder you trained in, "
        "point MLFLOW_TRACKING_URI at your store, or pass a checkpoint file"
    )
