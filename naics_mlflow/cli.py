"""The ``naics-embedder`` command line: thin click commands over the package's functions.

Commands import their modules inside the function body so that ``--help`` stays instant: torch,
Lightning and MLflow take seconds to import.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from naics_mlflow.errors import UserError

DEFAULT_CONFIG = "conf/config.yaml"
DEFAULT_DATA_CONFIG = "conf/data.yaml"


def _reports_user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a :class:`UserError` as one ``error:`` line and exit 2 (traceback with --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="naics-embedder")
def main(debug: bool) -> None:
    """Hyperbolic embeddings of the NAICS 2022 taxonomy, trained as an MLflow-tracked curriculum."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )


@main.group()
def data() -> None:
    """Build the NAICS tables and tree matrices from the Census workbooks."""


@data.command("build")
@click.option(
    "--raw-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder with the four Census xlsx files (default: $NAICS_RAW_DIR, else dirs.raw).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default: dirs.data from the config, 'data').",
)
@click.option("--force", is_flag=True, help="Rebuild even when the inputs are unchanged.")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True)
@_reports_user_errors
def data_build(raw_dir: Path | None, out_dir: Path | None, force: bool, config_path: str) -> None:
    """Read the Census workbooks and write codes, held-out items and tree matrices."""
    from naics_mlflow.config import load_config
    from naics_mlflow.data.build import build_data
    from naics_mlflow.data.census import load_release, resolve_raw_dir

    config = load_config(config_path)
    result = build_data(
        resolve_raw_dir(str(raw_dir) if raw_dir else None, config.dirs.raw),
        out_dir or Path(config.dirs.data),
        load_release(DEFAULT_DATA_CONFIG),
        force=force,
    )
    click.echo(
        f"{result.out_dir}: {result.n_codes:,} codes, {result.n_training_examples:,} training "
        f"index items, {result.n_holdout:,} held out" + ("" if result.rebuilt else " (unchanged)")
    )
