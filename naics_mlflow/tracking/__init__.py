"""Everything that talks to MLflow, and the one interface the commands and training use to do it
(``from naics_mlflow import tracking``; ``tracking.run(...)``):

- :mod:`~naics_mlflow.tracking.store`: which store, checked before any work; experiments;
- :mod:`~naics_mlflow.tracking.runs`: runs opened and ended, their writer, params, metrics, tags;
- :mod:`~naics_mlflow.tracking.artifacts`: checkpoints and other files runs log, and downloads;
- :mod:`~naics_mlflow.tracking.discovery`: the runs and URIs ``--from-checkpoint`` names
  (:mod:`naics_mlflow.references` reads a file itself), searches of runs;
- :mod:`~naics_mlflow.tracking.models`: logged models (``export``).

Each module turns what MLflow or a disk refuses into one line that says what to do.
"""

from naics_mlflow.tracking.artifacts import (
    BEST_SO_FAR,
    BEST_SO_FAR_ARTIFACT_PATH,
    CHECKPOINT_ARTIFACT_PATH,
    LAST_CHECKPOINT,
    ArtifactWriteError,
    download_best_so_far,
    drop_best_so_far,
    log_artifact,
    log_best_so_far,
    log_checkpoint,
    log_dict,
    log_file_to_run,
)
from naics_mlflow.tracking.discovery import (
    best_run_of_stage,
    download_best_checkpoint,
    download_checkpoint,
    has_checkpoint,
    search_runs,
    tag_equals,
    trashed_runs,
)
from naics_mlflow.tracking.models import (
    check_registration,
    delete_models_cut_short,
    holds_logged_model,
    new_logged_model,
    register_logged_model,
)
from naics_mlflow.tracking.runs import (
    get_run,
    git_commit,
    live_writer,
    log_dataset,
    log_metric_batch,
    log_metrics,
    log_params,
    mark_killed_if_running,
    mark_killed_if_writer_died,
    metric_history,
    run,
    set_tags,
)
from naics_mlflow.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    TrackingStoreError,
    connect,
    tracking_uri,
    use_experiment,
)

__all__ = [
    "BEST_SO_FAR",
    "BEST_SO_FAR_ARTIFACT_PATH",
    "CHECKPOINT_ARTIFACT_PATH",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "LAST_CHECKPOINT",
    "ArtifactWriteError",
    "TrackingStoreError",
    "best_run_of_stage",
    "check_registration",
    "connect",
    "delete_models_cut_short",
    "download_best_checkpoint",
    "download_best_so_far",
    "download_checkpoint",
    "drop_best_so_far",
    "get_run",
    "git_commit",
    "has_checkpoint",
    "holds_logged_model",
    "live_writer",
    "log_artifact",
    "log_best_so_far",
    "log_checkpoint",
    "log_dataset",
    "log_dict",
    "log_file_to_run",
    "log_metric_batch",
    "log_metrics",
    "log_params",
    "mark_killed_if_running",
    "mark_killed_if_writer_died",
    "metric_history",
    "new_logged_model",
    "register_logged_model",
    "run",
    "search_runs",
    "set_tags",
    "tag_equals",
    "tracking_uri",
    "trashed_runs",
    "use_experiment",
]
