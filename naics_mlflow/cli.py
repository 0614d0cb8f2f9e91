"""The ``naics-embedder`` command line: thin click commands over the package's functions.

Commands import their modules inside the function body so that ``--help`` stays instant: torch,
Lightning and MLflow take seconds to import.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import gc
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from naics_mlflow import stopping
from naics_mlflow.errors import UserError, gpu_memory_refused, memory_refused, refused_amount

if TYPE_CHECKING:
    from naics_mlflow.config import Config

DEFAULT_CONFIG = "conf/config.yaml"


def _reports_user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a :class:`UserError` as one ``error:`` line and exit 2, and memory the machine
    refused as one line and exit 1 (tracebacks with --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        context = click.get_current_context()
        debug = context.find_root().params.get("debug")
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except (MemoryError, RuntimeError) as exc:
            if debug or not memory_refused(exc):
                raise
            click.echo(f"error: {_out_of_memory_line(context.command_path, exc)}", err=True)
            sys.exit(1)

    return wrapper


def _out_of_memory_line(command: str, exc: MemoryError | RuntimeError) -> str:
    """Memory refused outside a training step (whose own line names the batch size): what is
    left to do is to free some or move."""
    if gpu_memory_refused(exc):
        return (
            f"{command} ran out of GPU memory{refused_amount(exc)}; free the GPU (other "
            "processes on it) or run it on a GPU with more memory"
        )
    return (
        f"{command} ran out of memory{refused_amount(exc)}; free memory on this machine (other "
        "programs, or other commands running) or run it on one with more"
    )


class _OneLineUsageError(click.ClickException):
    """A click usage error (an unknown option or command, a missing or bad value) shown as the
    project's own user errors are: one ``error:`` line and exit 2, not click's usage block."""

    exit_code = 2

    def __init__(self, usage_error: click.UsageError, fallback_path: str) -> None:
        """``fallback_path``: the command's path where the error carries no context, as the
        option parser's errors do not."""
        super().__init__(usage_error.format_message().removesuffix("."))
        self.command_path = usage_error.ctx.command_path if usage_error.ctx else fallback_path

    def show(self, file: Any = None) -> None:
        root, _, command = self.command_path.partition(" ")
        if command and self.message == "No such option '--debug'":
            # The root's option, typed where most tools take it: after the command.
            click.echo(
                f"error: --debug goes before the command: {root} --debug {command} ...", err=True
            )
            return
        click.echo(f"error: {self.message} (see '{self.command_path} --help')", err=True)


class _CommandLine(click.Group):
    """The root group and its subgroups. A command's arguments are parsed in its group's
    ``invoke`` (the root's own in ``make_context``), so that is where click's usage errors are
    made one line; click then shows and exits as for its other exceptions. A group named with no
    subcommand still shows its help."""

    group_class = type  # subgroups (`data`) are of this class too

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            path = " ".join(filter(None, [parent.command_path if parent else None, info_name]))
            raise _OneLineUsageError(exc, path) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            path = " ".join(filter(None, [ctx.command_path, ctx.invoked_subcommand]))
            raise _OneLineUsageError(exc, path) from exc


@click.group(cls=_CommandLine, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="naics-embedder")
def main(debug: bool) -> None:
    """Hyperbolic embeddings of the NAICS 2022 taxonomy, trained as an MLflow-tracked curriculum."""
    from naics_mlflow.distributed import is_global_zero

    # Run last at exit (handlers run newest first), it takes the 300,000 or so objects that
    # importing torch, transformers and MLflow made out of the garbage collector's sight.
    # Interpreter shutdown runs several full collections, each 0.18 s over them on 2 cores: a
    # command ended about 1 s later without it (docs/results.md).
    atexit.register(gc.freeze)

    # The other processes of a data-parallel run would repeat rank 0's messages.
    quiet = logging.INFO if is_global_zero() else logging.WARNING
    logging.basicConfig(
        level=logging.DEBUG if debug else quiet,
        format="%(message)s",
        stream=sys.stderr,
    )
    # The `lightning` package prints through a console handler of its own when imported; without
    # this its messages would also reach the root handler and show twice.
    logging.getLogger("lightning").propagate = False
    # torch quiets its loggers at the end of its import; interrupted before that, it would print
    # its FakeTensor cache statistics at exit, under the root handler.
    logging.getLogger("torch").setLevel(logging.WARNING)
    # MLflow logs the traceback of each database error before raising it; the command reports
    # the error it raises (in one line, or with its traceback under --debug).
    if not debug:
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # Lightning advertises its cloud logger at every fit; this project logs to MLflow.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    # MLflow draws a tqdm bar for each artifact download; in a log (nohup, CI, `mlflow run`)
    # each would stay behind as a line of all its states.
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    stopping.install()


def _project_config(ctx: click.Context, param: click.Parameter, path: str) -> str:
    """The default ``conf/config.yaml`` is the project folder's; elsewhere it is missing."""
    if path == DEFAULT_CONFIG and not Path(path).exists():
        raise click.BadParameter(
            f"{DEFAULT_CONFIG} is not in this folder: run naics-embedder from the project's "
            "folder (the one holding conf/), or give --config PATH"
        )
    return path


_config_option = click.option(
    "--config",
    "config_path",
    default=DEFAULT_CONFIG,
    show_default=True,
    callback=_project_config,
    help="The config YAML.",
)
_raw_dir_option = click.option(
    "--raw-dir",
    type=click.Path(file_okay=False),
    help="Folder with the four Census xlsx files (default: $NAICS_RAW_DIR, else dirs.raw).",
)


@main.group()
def data() -> None:
    """Build the NAICS tables and tree matrices from the Census workbooks."""


@data.command("build")
@_raw_dir_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default: dirs.data from the config, 'data').",
)
@click.option("--force", is_flag=True, help="Rebuild even when the inputs are unchanged.")
@_config_option
@_reports_user_errors
def data_build(raw_dir: str | None, out_dir: Path | None, force: bool, config_path: str) -> None:
    """Read the Census workbooks and write codes, held-out items and tree matrices."""
    from naics_mlflow.config import load_config
    from naics_mlflow.data.build import build_data
    from naics_mlflow.data.census import load_release, resolve_raw_dir

    config = load_config(config_path)
    result = build_data(
        resolve_raw_dir(raw_dir, config.dirs.raw),
        out_dir or Path(config.dirs.data),
        load_release(_census_sources(config_path)),
        force=force,
    )
    click.echo(
        f"{result.out_dir}: {result.n_codes:,} codes, {result.n_training_examples:,} training "
        f"index items, {result.n_cross_referenced_activities:,} cross-referenced activities, "
        f"{result.n_dev:,} dev, {result.n_holdout:,} held out"
        + ("" if result.rebuilt else " (unchanged)")
    )


_overrides_option = click.option(
    "--overrides",
    "overrides_string",
    default="",
    help="KEY=VALUE overrides as one space-separated string (the MLproject parameter); "
    "applied before the trailing KEY=VALUE arguments.",
)


def _census_sources(config_path: str) -> Path:
    """``data.yaml`` beside the config file: where the Census workbooks are published."""
    return Path(config_path).parent / "data.yaml"


def _curricula_dir(config_path: str) -> Path:
    return Path(config_path).parent / "text_curriculum"


def _curricula(config_path: str) -> list:
    """The curriculum stages beside ``--config``; none there is a user error."""
    from naics_mlflow.data.curriculum import CurriculumError, list_curricula

    directory = _curricula_dir(config_path)
    specs = list_curricula(directory)
    if not specs:
        raise CurriculumError(
            f"no curricula in {directory}: stages are read from text_curriculum/ beside the "
            "--config file"
        )
    return specs


def _load_stage_curriculum(config_path: str, name: str):
    from naics_mlflow.data.curriculum import CurriculumError, load_curriculum

    directory = _curricula_dir(config_path)
    path = directory / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(spec.name for spec in _curricula(config_path))
        raise CurriculumError(f"unknown curriculum '{name}' in {directory}; available: {available}")
    return load_curriculum(path)


_trust_option = click.option(
    "--trust-checkpoint",
    "trust_checkpoint",
    is_flag=True,
    help="Load a checkpoint that holds Python objects besides weights. Loading them can run code "
    "from the file: use it only for files you trust.",
)


def _readable_copy(path: Path, trust_checkpoint: bool, download_dir: Path) -> Path:
    """``path``, or with ``--trust-checkpoint`` a copy of it that loads as weights only."""
    from naics_mlflow.model.checkpoint import weights_only_copy

    return weights_only_copy(path, download_dir) if trust_checkpoint else path


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("--curriculum", "-c", "curriculum_name", help="Curriculum name, e.g. 01_stage.")
@_config_option
@click.option("--list-curricula", is_flag=True, help="List the curricula and exit.")
@click.option(
    "--from-checkpoint",
    "from_checkpoint",
    default="",
    help="Initialise from a stage name (its best run), a runs:/<run_id>/ckpt or "
    "models:/<name>/<version> (or models:/<name>@<alias>) URI, or a .ckpt file.",
)
@_trust_option
@_raw_dir_option
@_overrides_option
@click.argument("overrides", nargs=-1)
@_reports_user_errors
def train(
    curriculum_name: str | None,
    config_path: str,
    list_curricula: bool,
    from_checkpoint: str,
    trust_checkpoint: bool,
    raw_dir: str | None,
    overrides_string: str,
    overrides: tuple[str, ...],
) -> None:
    """Train one curriculum stage as one MLflow run. Overrides: KEY=VALUE, e.g.
    training.learning_rate=1e-4 data_loader.batch_size=8."""
    if list_curricula:
        for spec in _curricula(config_path):
            click.echo(f"{spec.name:<14} {spec.description}")
        return
    if not curriculum_name:
        raise UserError("give --curriculum NAME (see --list-curricula)")
    from naics_mlflow.config import load_config, split_overrides
    from naics_mlflow.data.census import load_release

    # Bad settings fail here, before the seconds-long import of the training stack.
    config = load_config(config_path, [*split_overrides(overrides_string), *overrides])
    curriculum = _load_stage_curriculum(config_path, curriculum_name)
    release = load_release(_census_sources(config_path))
    from naics_mlflow.distributed import is_global_zero
    from naics_mlflow.training.preflight import check_stage_can_start

    if is_global_zero():  # before the store is opened and the training stack imported
        check_stage_can_start(config)

    import tempfile
    import time

    with tempfile.TemporaryDirectory(prefix="naics-ckpt-") as download_dir:
        init = _checked_checkpoint(
            from_checkpoint,
            trust_checkpoint,
            config,
            Path(download_dir),
            _curricula_dir(config_path),
        )
        _check_tracking_store()
        from naics_mlflow.distributed import rank_zero_answer
        from naics_mlflow.training.stage import train_stage

        result = train_stage(
            config,
            curriculum,
            run_group=rank_zero_answer("run_group", lambda: time.strftime("single_%Y%m%d-%H%M%S")),
            release=release,
            raw_dir=raw_dir,
            init_checkpoint=init,
        )
    if result is not None:  # rank 0 reports for every process
        _print_summary(result)


def _check_tracking_store() -> None:
    """Rank 0 checks the tracking store before the training stack is imported: a store that
    cannot be used (a mistyped URI, a server that is down) then fails within seconds, where the
    import alone takes five or more. After ``--from-checkpoint`` is looked up, which refuses a
    missing store rather than create an empty one."""
    from naics_mlflow.distributed import is_global_zero

    if is_global_zero():
        from naics_mlflow import tracking

        tracking.connect()


def _checked_checkpoint(
    reference: str, trust_checkpoint: bool, config, download_dir: Path, curricula_dir: Path
) -> Path | None:
    """The local file a ``--from-checkpoint`` reference names, checked to fit ``config``; done
    before the training stack is imported, so a bad reference fails within seconds. Every rank
    of a data-parallel run uses the file rank 0 found."""
    if not reference:
        return None
    from naics_mlflow.distributed import rank_zero_answer
    from naics_mlflow.model.checkpoint import check_compatible
    from naics_mlflow.references import resolve_checkpoint

    def resolve() -> str:
        path = resolve_checkpoint(
            reference, download_dir, _comparable_tags(config, curricula_dir)
        ).path
        return str(_readable_copy(path, trust_checkpoint, download_dir))

    path = Path(rank_zero_answer("init_checkpoint", resolve))
    check_compatible(path, config)
    return path


def _comparable_tags(config, curricula_dir: Path):
    """For a stage name, the tags its runs must carry to be compared by val_loss here: the digest
    of the data in ``dirs.data`` (when built) and the stage's validation protocol (when its
    curriculum file is in ``curricula_dir``)."""
    from naics_mlflow.data.build import data_digest
    from naics_mlflow.data.curriculum import load_curriculum
    from naics_mlflow.data.validation import validation_protocol

    def tags(stage: str) -> dict[str, str]:
        expected = {}
        digest = data_digest(Path(config.dirs.data))
        if digest is not None:
            expected["data_digest"] = digest
        curriculum_file = curricula_dir / f"{stage}.yaml"
        if curriculum_file.is_file():
            curriculum = load_curriculum(curriculum_file)
            expected["val_protocol"] = validation_protocol(curriculum, config.data_loader.val_split)
        return expected

    return tags


def _print_summary(result) -> None:
    from naics_mlflow import tracking

    click.echo("")
    rows = {
        "stage": result.stage,
        "mlflow run": f"{result.run_id}  ({tracking.tracking_uri()})",
        "best checkpoint": str(result.best_checkpoint),
        "": f"runs:/{result.run_id}/{tracking.CHECKPOINT_ARTIFACT_PATH}",
    }
    for name, value in result.metrics.items():
        rows[name] = f"{value:.0f}" if name == "best/epoch" else f"{value:.4f}"
    for name, value in rows.items():
        click.echo(f"{name:<24} {value}")


_BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


# A stage's figures as the `runs` table and a chain's closing lines give them: its best epoch's.
_BEST_EPOCH_COLUMNS = (
    ("best_val_loss", "best_val_loss"),
    ("spearman", "best/val/spearman"),
    ("ndcg_at_10", "best/val/ndcg_at_10"),
)


@main.command("train-curriculum")
@click.option(
    "--curricula",
    "-c",
    default="01_stage,02_stage,03_stage,04_stage,05_stage",
    show_default=True,
    help="Comma-separated curriculum stages to train in order.",
)
@click.option(
    "--chain", "chain_name", default="", help="A chain file name (overrides --curricula)."
)
@_config_option
@click.option(
    "--resume",
    "resume_word",
    is_flag=False,
    flag_value="true",
    default="true",
    show_default=True,
    help="Reuse finished stages and continue interrupted ones (--resume false to retrain).",
)
@click.option("--no-resume", is_flag=True, help="Same as --resume false.")
@click.option(
    "--from-checkpoint",
    "from_checkpoint",
    default="",
    help="Start stage 1 from a stage name, a runs:/<run_id>/ckpt or models:/<name>/<version> "
    "(or models:/<name>@<alias>) URI, or a .ckpt file.",
)
@_trust_option
@_raw_dir_option
@_overrides_option
@click.argument("overrides", nargs=-1)
@_reports_user_errors
def train_curriculum(
    curricula: str,
    chain_name: str,
    config_path: str,
    resume_word: str,
    no_resume: bool,
    from_checkpoint: str,
    trust_checkpoint: bool,
    raw_dir: str | None,
    overrides_string: str,
    overrides: tuple[str, ...],
) -> None:
    """Train curriculum stages in sequence, each from the previous stage's best checkpoint, as
    one parent MLflow run with a nested run per stage. Overrides (KEY=VALUE) apply to every
    stage."""
    from naics_mlflow.config import split_overrides
    from naics_mlflow.data.census import load_release
    from naics_mlflow.data.curriculum import CurriculumError, load_chain

    if resume_word.lower() not in _BOOLEAN_WORDS:
        raise UserError(
            f"--resume takes true or false, got {resume_word!r} "
            "(put KEY=VALUE overrides after the options)"
        )
    resume = _BOOLEAN_WORDS[resume_word.lower()] and not no_resume
    override_items = [*split_overrides(overrides_string), *overrides]
    directory = _curricula_dir(config_path)
    chain = None
    if chain_name:
        chain_path = (
            Path(chain_name) if chain_name.endswith(".yaml") else directory / f"{chain_name}.yaml"
        )
        if not chain_path.is_file():
            available = sorted(p.stem for p in directory.glob("chain_*.yaml"))
            raise CurriculumError(
                f"unknown chain '{chain_name}' in {directory}; available: {', '.join(available)}"
            )
        chain = load_chain(chain_path)
    names = [name.strip() for name in curricula.split(",") if name.strip()]
    for name in [stage.name for stage in chain.stages] if chain else names:
        _load_stage_curriculum(config_path, name)
    from naics_mlflow.training.plan import plan_chain

    plan = plan_chain(config_path, directory, chain, names, override_items)
    release = load_release(_census_sources(config_path))
    from naics_mlflow.distributed import is_global_zero
    from naics_mlflow.training.preflight import check_chain_can_start

    if is_global_zero():  # before the store is opened and the training stack imported
        check_chain_can_start([stage.config for stage in plan.stages])

    import tempfile

    from naics_mlflow import tracking

    with tempfile.TemporaryDirectory(prefix="naics-ckpt-") as download_dir:
        init = _checked_checkpoint(
            from_checkpoint, trust_checkpoint, plan.stages[0].config, Path(download_dir), directory
        )
        _check_tracking_store()
        from naics_mlflow.training.chain import run_chain

        result = run_chain(
            plan, release=release, resume=resume, init_checkpoint=init, raw_dir=raw_dir
        )
    if result is None:  # rank 0 reports for every process
        return
    click.echo("")
    click.echo(f"chain            {plan.name} ({plan.sequence})")
    click.echo(f"parent run       {result.parent_run_id}  ({tracking.tracking_uri()})")
    for stage, stage_result in zip(plan.stages, result.stages, strict=True):
        if stage_result is None:
            click.echo(f"{stage.curriculum.name:<16} reused from an earlier run")
        else:
            figures = "  ".join(
                f"{label} {stage_result.metrics[name]:.4f}"
                for label, name in _BEST_EPOCH_COLUMNS
                if name in stage_result.metrics
            )
            click.echo(f"{stage.curriculum.name:<16} run {stage_result.run_id}  {figures}")
    click.echo(f"final checkpoint runs:/{result.final_run_id}/{tracking.CHECKPOINT_ARTIFACT_PATH}")


@main.command()
@click.option("--chain", "chain_name", default=None, help="Only stages of this chain.")
@click.option("--stage", default=None, help="Only runs of this stage, e.g. 03_stage.")
@_reports_user_errors
def runs(chain_name: str | None, stage: str | None) -> None:
    """A table of stage runs in the tracking store: what the MLflow UI compares, in a terminal.
    Runs left RUNNING by a process on this machine that has ended are recorded as KILLED first."""
    from naics_mlflow import tracking

    for running in tracking.search_runs("attributes.status = 'RUNNING'"):
        tracking.mark_killed_if_writer_died(running)
    conditions = ["tags.stage != ''"]
    if chain_name:
        conditions.append(tracking.tag_equals("chain", chain_name))
    if stage:
        conditions.append(tracking.tag_equals("stage", stage))
    found = tracking.search_runs(" AND ".join(conditions), ["attributes.start_time ASC"])
    if not found:
        asked = f"runs of stage '{stage}'" if stage else "stage runs"
        asked += f" of chain '{chain_name}'" if chain_name else ""
        trashed = tracking.trashed_runs(" AND ".join(conditions))
        click.echo(f"no {asked} in {tracking.tracking_uri()}{trashed}")
        return
    columns = [
        "run_id",
        "stage",
        "parent",
        "status",
        "started",
        "duration",
        "epochs",
        *(label for label, _ in _BEST_EPOCH_COLUMNS),
        "checkpoint",
    ]
    rows = []
    for run in found:
        metrics, tags = run.data.metrics, run.data.tags
        epoch = metrics.get("epoch")
        rows.append(
            [
                run.info.run_id[:12],
                tags["stage"],
                tags.get("mlflow.parentRunId", "")[:12] or "-",
                run.info.status,
                _local_time(run.info.start_time),
                "-" if run.info.end_time is None else _duration(run.info),
                "-" if epoch is None else str(int(epoch) + 1),
                *(_number(metrics.get(name)) for _, name in _BEST_EPOCH_COLUMNS),
                f"runs:/{run.info.run_id}/{tracking.CHECKPOINT_ARTIFACT_PATH}"
                if tags.get("best_checkpoint")
                else "-",
            ]
        )
    widths = [max(len(str(v)) for v in column) for column in zip(columns, *rows, strict=True)]
    for line in [columns, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _local_time(milliseconds: int) -> str:
    return datetime.datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M")


def _duration(info) -> str:
    """``1h02m``, ``14m03s`` or ``45s``: a finished run's time from start to end."""
    seconds = round((info.end_time - info.start_time) / 1000)
    hours, minutes = divmod(seconds // 60, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds % 60:02d}s" if minutes else f"{seconds}s"


# --- using a trained model ------------------------------------------------------------------


def _checkpoint_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--from-checkpoint`` (as ``reference``) and ``--trust-checkpoint``."""
    command = _trust_option(command)
    return click.option(
        "--from-checkpoint",
        "reference",
        required=True,
        help="A stage name (its best run), a runs:/<run_id>/ckpt or models:/<name>/<version> "
        "URI (a registered model; models:/<name>@<alias> too), or a .ckpt file.",
    )(command)


def _resolve_model(
    reference: str, trust_checkpoint: bool, config: Config, config_path: str, download_dir: Path
):
    """The resolved checkpoint (whose run, if any, receives what the command logs) and the
    taxonomy (its data built if need be): everything short of loading the model, so that a
    command can check its inputs against the taxonomy before the long part."""
    import dataclasses

    from naics_mlflow.references import resolve_checkpoint

    resolved = resolve_checkpoint(
        reference, download_dir, _comparable_tags(config, _curricula_dir(config_path))
    )
    resolved = dataclasses.replace(
        resolved, path=_readable_copy(resolved.path, trust_checkpoint, download_dir)
    )
    from naics_mlflow.model.checkpoint import read_checkpoint

    read_checkpoint(resolved.path)  # a bad file fails before the model stack is imported

    from naics_mlflow.data.build import ensure_built
    from naics_mlflow.data.census import load_release, resolve_raw_dir
    from naics_mlflow.data.taxonomy import load_taxonomy

    data_dir = Path(config.dirs.data)
    ensure_built(
        resolve_raw_dir(None, config.dirs.raw), data_dir, load_release(_census_sources(config_path))
    )
    return resolved, load_taxonomy(data_dir)


def _build_engine(resolved, taxonomy, config):
    """The checkpoint's model with every code embedded: the command's long part."""
    from naics_mlflow.evaluation.retrieval import SearchEngine
    from naics_mlflow.model.merged import inference_device
    from naics_mlflow.model.trained import load_embedder

    return SearchEngine.build(
        load_embedder(resolved.path, inference_device(config.search.device)),
        taxonomy,
        config.search,
        outputs_dir=Path(config.dirs.outputs),
    )


def _load_engine(reference: str, trust_checkpoint: bool, config_path: str, download_dir: Path):
    """The checkpoint's model with every code embedded, the taxonomy, the resolved reference
    and the config (see :func:`_resolve_model`)."""
    from naics_mlflow.config import load_config

    config = load_config(config_path)
    resolved, taxonomy = _resolve_model(
        reference, trust_checkpoint, config, config_path, download_dir
    )
    return _build_engine(resolved, taxonomy, config), taxonomy, resolved, config


@main.command()
@_checkpoint_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("outputs/naics_embeddings.parquet"),
    show_default=True,
    help="The .parquet file to write.",
)
@_config_option
@_reports_user_errors
def embed(reference: str, trust_checkpoint: bool, out: Path, config_path: str) -> None:
    """Lorentz embeddings of all 2,125 codes to parquet (code as the Census writes it, level,
    title, embedding); logged to the checkpoint's run when the reference names one."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from naics_mlflow.data.taxonomy import display_code
    from naics_mlflow.files import check_output, write_output

    if out.suffix.lower() != ".parquet":
        raise UserError(f"--out must end in .parquet (embed writes Parquet), got {out.name}")
    check_output(out)
    with tempfile.TemporaryDirectory(prefix="naics-ckpt-") as download_dir:
        engine, taxonomy, resolved, _ = _load_engine(
            reference, trust_checkpoint, config_path, Path(download_dir)
        )
    table = pa.table(
        {
            "code": [display_code(code) for code in taxonomy.codes],
            "level": pa.array(taxonomy.levels.tolist(), type=pa.int8()),
            "title": taxonomy.titles,
            "embedding": pa.array(
                engine.code_embeddings.cpu().numpy().tolist(), type=pa.list_(pa.float32())
            ),
        }
    )
    write_output(out, functools.partial(pq.write_table, table))
    if resolved.run_id:
        from naics_mlflow import tracking

        tracking.log_file_to_run(resolved.run_id, out, "embeddings")
    click.echo(
        f"{out}: {len(taxonomy.codes):,} codes, {engine.code_embeddings.shape[1]} coordinates"
    )


# `search` ranks this many texts per call, and says how far it got after each.
SEARCH_CHUNK = 4096


@main.command()
@click.argument("texts", nargs=-1)
@_checkpoint_option
@click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A CSV (commas, semicolons or tabs) or an .xlsx workbook (its first sheet) of business "
    "descriptions in a `text` column, instead of TEXT; its other columns (an id, say) lead each "
    "row of --out.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write one row per match (text, rank, code, title, level, distance, score, margin) to "
    "this .csv, .tsv (tab-separated), .parquet or .xlsx file instead of printing tables.",
)
@click.option("--top", "top_k", default=5, show_default=True, help="How many codes to show.")
@click.option(
    "--level",
    type=click.Choice(["2", "3", "4", "5", "6", "any"]),
    default="6",
    show_default=True,
    help="Code level to search (6: national industries).",
)
@_config_option
@_reports_user_errors
def search(
    reference: str,
    trust_checkpoint: bool,
    texts: tuple[str, ...],
    input_path: Path | None,
    out: Path | None,
    top_k: int,
    level: str,
    config_path: str,
) -> None:
    """The NAICS codes that best match each business description TEXT (or each row of
    --input): ranked by score (the model's logit plus, for national industries, the lexical and
    nearest-item signals; see docs/using.md), with each code's Lorentz distance from the text.
    A TEXT that is a NAICS code (441120, 31-33) lists that code, the codes above and below it,
    then the codes nearest it."""
    import tempfile

    import pandas as pd

    from naics_mlflow.config import is_override
    from naics_mlflow.evaluation.queries import (
        QueryError,
        check_matches_file,
        check_matches_fit,
        check_request,
        read_query_file,
        write_matches,
    )

    if overrides := [text for text in texts if is_override(text)]:
        raise QueryError(
            f"{overrides[0]!r} sets a config key, and search takes no KEY=VALUE overrides (it "
            "would search it as a business description); set it in the file --config names"
        )
    if texts and input_path:
        raise QueryError("give business descriptions as TEXT arguments or --input, not both")
    if not texts and not input_path:
        raise QueryError(
            "give a business description as TEXT, or a CSV or .xlsx workbook of them as --input"
        )
    if out is not None:
        check_matches_file(out, input_path)
    queries = read_query_file(input_path) if input_path else pd.DataFrame({"text": texts})
    query_texts = queries["text"].tolist()
    chosen_level = None if level == "any" else int(level)
    check_request(query_texts, top_k, chosen_level)
    if out is not None:
        check_matches_fit(out, len(query_texts), top_k)
    with tempfile.TemporaryDirectory(prefix="naics-ckpt-") as download_dir:
        engine, *_ = _load_engine(reference, trust_checkpoint, config_path, Path(download_dir))
    found = []
    for start in range(0, len(query_texts), SEARCH_CHUNK):
        found += engine.search(query_texts[start : start + SEARCH_CHUNK], top_k, chosen_level)
        if len(query_texts) > SEARCH_CHUNK:
            click.echo(f"searched {len(found):,} of {len(query_texts):,} texts", err=True)
    if out is not None:
        rows = write_matches(out, queries, found)
        matches = _counted(rows, "match", "matches")
        click.echo(f"{out}: {matches} of {_counted(len(query_texts), 'text', 'texts')}")
        return
    for number, (text, matches) in enumerate(zip(query_texts, found, strict=True), start=1):
        if number > 1:
            click.echo()
        if len(query_texts) > 1:
            click.echo(f"{number}. {text}")
        _print_matches(matches)


def _counted(count: int, one: str, many: str) -> str:
    return f"{count:,} {one if count == 1 else many}"


def _print_matches(matches: list[Any]) -> None:
    """One text's matches as a table; a margin is the score's lead over the next code's, and
    ``-`` where no code follows."""
    click.echo(f"{'rank':<5} {'code':<8} {'score':>8} {'margin':>8} {'distance':>8}  title")
    for rank, match in enumerate(matches, start=1):
        margin = "-" if math.isnan(match.margin) else f"{match.margin:.3f}"
        click.echo(
            f"{rank:<5} {match.code:<8} {match.score:>8.3f} {margin:>8} {match.distance:>8.4f}  "
            f"{match.title}"
        )


@main.command()
@_checkpoint_option
@click.option(
    "--unseen-queries",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CSV (code,text) of evaluation-only queries (default: evaluation.unseen_queries).",
)
@click.option(
    "--no-baselines", is_flag=True, help="Skip the untrained-backbone, kNN and BM25 rows."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_config_option
@_reports_user_errors
def evaluate(
    reference: str,
    trust_checkpoint: bool,
    unseen_queries: Path | None,
    no_baselines: bool,
    as_json: bool,
    config_path: str,
) -> None:
    """Hierarchy metrics over all codes and retrieval on the dev, held-out and unseen query sets,
    with baselines; logged to a run nested under the checkpoint's run."""
    import dataclasses
    import json
    import tempfile

    from naics_mlflow.config import load_config
    from naics_mlflow.evaluation.queries import read_unseen_queries

    config = load_config(config_path)
    # The query file first, before the heavy imports: a missing or malformed one should cost a
    # moment, not a download or a data build. Its codes are checked against the taxonomy before
    # the model embeds the codes.
    unseen = read_unseen_queries(unseen_queries or Path(config.evaluation.unseen_queries))

    from naics_mlflow import tracking
    from naics_mlflow.evaluation.evaluate import evaluate as run_evaluation
    from naics_mlflow.evaluation.evaluate import load_query_sets
    from naics_mlflow.model.merged import dtype_name

    with tempfile.TemporaryDirectory(prefix="naics-ckpt-") as download_dir:
        resolved, taxonomy = _resolve_model(
            reference, trust_checkpoint, config, config_path, Path(download_dir)
        )
        query_sets = load_query_sets(Path(config.dirs.data), unseen, taxonomy)
        engine = _build_engine(resolved, taxonomy, config)
    report = run_evaluation(
        engine,
        taxonomy,
        query_sets,
        baselines=not no_baselines,
        outputs_dir=Path(config.dirs.outputs),
    )
    experiment_id = tracking.use_experiment(config.mlflow.experiment_name)
    tags = {"evaluation": "true", "checkpoint": reference}
    with tracking.run(experiment_id, "evaluation", tags, parent_run_id=resolved.run_id) as active:
        # The "as search ranks" figures follow from these, which come from --config, not the run,
        # and from the dtype and device that search.backbone_dtype and search.device gave on
        # this machine.
        tracking.log_params(
            {
                **{f"search.{k}": v for k, v in dataclasses.asdict(config.search).items()},
                "backbone_dtype": dtype_name(engine.backbone.dtype),
                "device": str(engine.backbone.device),
            }
        )
        for query_set in query_sets:
            columns = {"code": query_set.codes, "text": query_set.texts}
            tracking.log_dataset(query_set.source, columns, context=query_set.name)
        tracking.log_metrics(report.metrics())
        tracking.log_dict(report.as_dict(), "evaluation.json")
    if as_json:
        click.echo(json.dumps({"run_id": active.info.run_id, **report.as_dict()}))
    else:
        click.echo(report.table())
        click.echo(f"\nlogged to run {active.info.run_id} ({tracking.tracking_uri()})")


@main.command()
@_checkpoint_option
@click.option(
    "--register",
    "registered_name",
    metavar="NAME",
    default=None,
    help="Also register it in the model registry under NAME.",
)
@_config_option
@_reports_user_errors
def export(
    reference: str, trust_checkpoint: bool, registered_name: str | None, config_path: str
) -> None:
    """Log the checkpoint as an MLflow model named `model` in the run it came from (a new run
    for a checkpoint file), ready for `mlflow models serve`."""
    import tempfile

    from naics_mlflow import tracking
    from naics_mlflow.serving import log_search_model

    if registered_name is not None:
        tracking.check_registration(registered_name)
    with tempfile.TemporaryDirectory(prefix="naics-ckpt-") as download_dir:
        engine, _, resolved, config = _load_engine(
            reference, trust_checkpoint, config_path, Path(download_dir)
        )
        if resolved.run_id is not None:
            uri = log_search_model(resolved.path, engine, resolved.run_id, registered_name)
        else:
            experiment_id = tracking.use_experiment(config.mlflow.experiment_name)
            with tracking.run(experiment_id, "export", {}) as active:
                uri = log_search_model(resolved.path, engine, active.info.run_id, registered_name)
    click.echo(f"model logged: {uri}")
    click.echo(f"serve it:     mlflow models serve -m {uri} --env-manager local")
