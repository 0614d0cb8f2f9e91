"""What a chain will train: the stages in order, each with its effective configuration."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from naics_mlflow.config import Config, ConfigError, build_config, parse_overrides
from naics_mlflow.data.curriculum import (
    ChainSpec,
    CurriculumError,
    CurriculumSpec,
    load_curriculum,
)
from naics_mlflow.model.checkpoint import shape_difference

# The configuration's sections that make a chain the same one: what its stages train, and the
# experiment it is recorded in (another experiment is another study, and starts afresh).
CHAIN_SECTIONS = ("data_loader", "model", "loss", "training", "mlflow")


@dataclass(frozen=True)
class PlannedStage:
    curriculum: CurriculumSpec
    config: Config


@dataclass(frozen=True)
class ChainPlan:
    """What a chain will train: its name, stage ids and each stage's effective configuration."""

    name: str
    chain: str | None
    sequence: str
    stages: list[PlannedStage]

    @property
    def run_group(self) -> str:
        """The local checkpoint folder, ``checkpoints/<run_group>/<stage>/<run id>/``."""
        suffix = f"_{self.chain}" if self.chain else ""
        return f"sequential_{self.sequence}{suffix}"

    def hash(self, starting_weights: str | None, data_digests: list[str | None]) -> str:
        """Digest of every stage's curriculum, settings (:data:`CHAIN_SECTIONS`) and data (its
        ``data_digest``, one a stage), and of the weights the first stage starts from (a
        ``weights_digest``, None from scratch): a rerun with the same hash may reuse this chain's
        finished stages. A stage trained on other data (a rebuild by a new version, other
        workbooks) is not this chain's, wherever the data lies.

        Where files live (``dirs``), how a trained model ranks (``search``) and the evaluation's
        query file change nothing the stages train, and differ between machines and versions:
        with them in, a chain continued on another machine, or after a new search default,
        silently started over.
        """
        payload = [
            starting_weights,
            [
                [asdict(stage.curriculum), _chain_settings(stage.config), data]
                for stage, data in zip(self.stages, data_digests, strict=True)
            ],
        ]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _chain_settings(config: Config) -> dict[str, Any]:
    settings = config.to_dict()
    return {section: settings[section] for section in CHAIN_SECTIONS}


def stage_id(name: str) -> str:
    """``01_stage`` -> ``01``: the short form used in sequence ids such as ``01-02-03``."""
    return name.split("_", 1)[0]


def plan_chain(
    config_path: str | Path,
    curricula_dir: Path,
    chain: ChainSpec | None,
    curricula: list[str],
    overrides: list[str],
) -> ChainPlan:
    """Each stage's settings, lowest precedence first: the base config, the chain stage's
    ``overrides``, its ``max_epochs`` and ``learning_rate``, the command-line overrides."""
    stages = chain.stages if chain else None
    names = [stage.name for stage in stages] if stages else curricula
    _check_stage_names(names)
    command_line = [
        (parse_overrides([item], "the command line"), f"override '{item}'") for item in overrides
    ]
    planned = []
    for position, name in enumerate(names):
        curriculum = load_curriculum(curricula_dir / f"{name}.yaml")
        layers: list[tuple[dict[str, Any], str]] = []
        if stages:
            stage = stages[position]
            source = f"chain {chain.chain_name}, stage {name}"
            if stage.overrides:
                dotted = [f"{key}={json.dumps(value)}" for key, value in stage.overrides.items()]
                layers.append((parse_overrides(dotted, source), source))
            per_stage: dict[str, Any] = {}
            if stage.max_epochs is not None:
                per_stage["training"] = {"trainer": {"max_epochs": stage.max_epochs}}
            if stage.learning_rate is not None:
                per_stage.setdefault("training", {})["learning_rate"] = stage.learning_rate
            layers.append((per_stage, source))
        config = build_config(config_path, [*layers, *command_line])
        planned.append(PlannedStage(curriculum, config))
    _check_weights_carry_over(planned)
    sequence = "-".join(stage_id(name) for name in names)
    chain_name = chain.chain_name if chain else None
    return ChainPlan(chain_name or sequence, chain_name, sequence, planned)


def _check_stage_names(names: list[str]) -> None:
    """Raise :class:`CurriculumError` for a chain of no stages, or one that names a stage twice:
    the store finds a stage's runs by its name, so a resumed chain would take the second for
    the first, finished already."""
    if not names:
        raise CurriculumError("no stages to train; give --curricula NAME[,NAME...] or --chain NAME")
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated:
        raise CurriculumError(
            f"stage '{repeated}' is named more than once in {','.join(names)}; a chain trains "
            "each stage once (its runs are found by name): to train it again, copy its "
            "curriculum file under another name, and give its name field that name"
        )


def _check_weights_carry_over(stages: list[PlannedStage]) -> None:
    """Raise :class:`ConfigError` when a stage's layer sizes differ from the stage before it,
    whose best checkpoint it starts from: checked before anything trains, not when the stage
    fails to load its weights after the earlier ones have trained."""
    for before, after in itertools.pairwise(stages):
        difference = shape_difference(
            before.config.to_dict()["model"], after.config.to_dict()["model"]
        )
        if difference is not None:
            dotted, earlier, later = difference
            raise ConfigError(
                f"stage {after.curriculum.name} has {dotted}={later} but starts from "
                f"{before.curriculum.name}, which has {earlier}; give both the same value "
                "(a chain file's overrides, per stage)"
            )
