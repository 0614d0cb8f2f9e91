"""Typed configuration: YAML files and dotted ``KEY=VALUE`` overrides, checked against dataclasses.

``conf/config.yaml`` is the single source of default values: the dataclasses below only name the
keys and their types. Every later layer (a curriculum's or chain's per-stage values, command-line
overrides) is a partial dict checked against the same schema before it is merged, so an unknown key
or a value of the wrong type is reported with the layer it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import shlex
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from naics_mlflow.errors import UserError


class ConfigError(UserError):
    """A configuration file or override that does not match the schema."""


class _Yaml12FloatLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``) and ``1e-4`` is a string; the
    training guide writes learning rates as ``1e-4``, so we use the YAML 1.2 float rule instead.
    """


_Yaml12FloatLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely (no object construction), reporting syntax errors in one line."""
    try:
        return yaml.load(text, Loader=_Yaml12FloatLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(
            f"{source}{line}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from exc


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file with :func:`parse_yaml`; a file that is missing, a folder or not UTF-8
    text is a :class:`ConfigError`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror})") from exc
    return parse_yaml(text, str(path))


@dataclass(frozen=True)
class DirsConfig:
    data: str
    raw: str
    checkpoints: str
    outputs: str


@dataclass(frozen=True)
class TokenizationConfig:
    title_max_length: int
    description_max_length: int
    excluded_max_length: int
    examples_max_length: int


@dataclass(frozen=True)
class DataLoaderConfig:
    batch_size: int
    num_workers: int
    val_split: float
    examples_per_code: int
    all_codes_in_batch: bool
    tokenization: TokenizationConfig


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]

    @property
    def scaling(self) -> float:
        """What LoRA multiplies ``B @ A`` by before adding it to the weight it adapts."""
        return self.alpha / self.r


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    hidden_dim: int
    load_balancing_coef: float


@dataclass(frozen=True)
class ModelConfig:
    base_model_name: str
    embedding_dim: int
    eval_sample_size: int | None
    length_buckets: int
    backbone_dropout: bool
    lora: LoraConfig
    moe: MoeConfig


@dataclass(frozen=True)
class LossConfig:
    temperature: float
    curvature: float
    query_weight: float
    distortion_weight: float
    neighbourhood_weight: float
    neighbourhood_sharpness: float
    depth_weight: float
    depth_margin: float
    tree_scale: float
    hard_negative_k: int | None
    hierarchy_rows: int | None
    fn_curriculum_start_epoch: int | None
    fn_cluster_every_n_epochs: int
    fn_num_clusters: int


@dataclass(frozen=True)
class TrainerConfig:
    max_epochs: int
    accelerator: str
    devices: int | str
    num_nodes: int
    strategy: str
    precision: str | int
    gradient_clip_val: float | None
    accumulate_grad_batches: int
    log_every_n_steps: int
    val_check_interval: float
    limit_train_batches: int | float
    limit_val_batches: int | float


@dataclass(frozen=True)
class TrainingConfig:
    seed: int
    head_only: bool
    compile_backbone: bool
    optimizer: str
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    max_nonfinite_steps: int
    trainer: TrainerConfig


@dataclass(frozen=True)
class SearchConfig:
    lexical_weight: float
    item_weight: float
    backbone_dtype: str
    device: str
    query_max_length: int


@dataclass(frozen=True)
class MlflowConfig:
    experiment_name: str


@dataclass(frozen=True)
class EvaluationConfig:
    unseen_queries: str


@dataclass(frozen=True)
class Config:
    dirs: DirsConfig
    data_loader: DataLoaderConfig
    model: ModelConfig
    loss: LossConfig
    training: TrainingConfig
    search: SearchConfig
    mlflow: MlflowConfig
    evaluation: EvaluationConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, tree: dict[str, Any], source: str = "a saved configuration") -> Config:
        """Rebuild a configuration saved with :meth:`to_dict` (in a checkpoint, say); keys added
        since it was saved take the values in ``KEYS_ADDED_SINCE_SAVED``."""
        check_layer(tree, source)
        config = _build(cls, merge(KEYS_ADDED_SINCE_SAVED, tree), source)
        _check_cross_field(config)
        return config

    def flat(self) -> dict[str, Any]:
        """Dotted keys to leaf values, as logged to MLflow params."""
        return _flatten(self.to_dict())

    def hash(self) -> str:
        """A short stable digest of every value, to tag runs made with the same configuration."""
        payload = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


# Keys added to the schema after checkpoints of the current format were saved without them, with
# the value that reproduces how those checkpoints were trained (not necessarily today's default).
KEYS_ADDED_SINCE_SAVED: dict[str, Any] = {
    "search": {
        "backbone_dtype": "float32",
        "item_weight": 0.0,
        "device": "cpu",
        "query_max_length": 32,
    },
    "model": {"backbone_dropout": True},
    "loss": {"hierarchy_rows": None},
    "training": {"compile_backbone": False},
}


# Values that must be strictly positive: a zero or negative size is never meaningful.
_POSITIVE_KEYS = {
    "data_loader.batch_size",
    "data_loader.examples_per_code",
    "data_loader.tokenization.title_max_length",
    "data_loader.tokenization.description_max_length",
    "data_loader.tokenization.excluded_max_length",
    "data_loader.tokenization.examples_max_length",
    "search.query_max_length",
    "model.embedding_dim",
    "model.eval_sample_size",
    "model.length_buckets",
    "model.lora.r",
    "model.lora.alpha",
    "model.moe.num_experts",
    "model.moe.top_k",
    "model.moe.hidden_dim",
    "loss.temperature",
    "loss.curvature",
    "loss.neighbourhood_sharpness",
    "loss.tree_scale",
    "loss.hard_negative_k",
    "loss.hierarchy_rows",
    "loss.fn_cluster_every_n_epochs",
    "loss.fn_num_clusters",
    "training.learning_rate",
    "training.trainer.max_epochs",
    "training.trainer.num_nodes",
    "training.trainer.accumulate_grad_batches",
    "training.trainer.log_every_n_steps",
    "training.trainer.val_check_interval",
    "training.trainer.limit_train_batches",
    "training.trainer.limit_val_batches",
}
# Token limits: a BERT encoder has 512 positions, and a longer text would fail in its first layer.
_TOKEN_LIMIT_KEYS = {
    "data_loader.tokenization.title_max_length",
    "data_loader.tokenization.description_max_length",
    "data_loader.tokenization.excluded_max_length",
    "data_loader.tokenization.examples_max_length",
    "search.query_max_length",
}
MAX_TOKENS = 512
_NON_NEGATIVE_KEYS = {
    "data_loader.num_workers",
    "model.lora.dropout",
    "model.moe.load_balancing_coef",
    "loss.query_weight",
    "loss.distortion_weight",
    "loss.neighbourhood_weight",
    "loss.depth_weight",
    "loss.depth_margin",
    "search.lexical_weight",
    "search.item_weight",
    "loss.fn_curriculum_start_epoch",
    "training.weight_decay",
    "training.warmup_steps",
    "training.max_nonfinite_steps",
    # Lightning takes a negative clip as none at all, silently.
    "training.trainer.gradient_clip_val",
}
_CHOICES = {
    "training.optimizer": ("adamw", "riemannian_adam"),
    # Float64 is left out: Lightning's double precision cannot convert the project's batches.
    "training.trainer.precision": ("16-mixed", "bf16-mixed", "32-true", "32", "16", "bf16"),
    "training.trainer.accelerator": ("auto", "cpu", "gpu", "cuda"),
    # Data parallel is the one way the project scales out (docs/training.md), and tested.
    "training.trainer.strategy": ("auto", "ddp"),
    "search.backbone_dtype": ("auto", "float32", "bfloat16"),
    "search.device": ("auto", "cpu", "cuda"),
}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _schema_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema (sections included) mapped to its type annotation."""
    paths: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        annotation = typing.get_type_hints(cls)[field.name]
        dotted = f"{prefix}{field.name}"
        paths[dotted] = annotation
        if dataclasses.is_dataclass(annotation):
            paths.update(_schema_paths(annotation, f"{dotted}."))
    return paths


_SCHEMA = _schema_paths(Config)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    if isinstance(annotation, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _unknown_key_error(dotted: str, source: str) -> ConfigError:
    parent, _, leaf = dotted.rpartition(".")
    siblings = {p.rpartition(".")[2]: p for p in _SCHEMA if p.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=3, cutoff=0.3)
    suggestions = [siblings[name] for name in close] or sorted(siblings.values())
    return ConfigError(
        f"unknown config key '{dotted}' in {source}; closest valid keys: {', '.join(suggestions)}"
    )


def check_layer(layer: dict[str, Any], source: str, prefix: str = "") -> None:
    """Check a (partial) nested dict against the schema; raise on the first bad key or value."""
    if not isinstance(layer, dict):
        where = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(f"{source}: {where} must be a mapping of keys to values")
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if dotted not in _SCHEMA:
            raise _unknown_key_error(dotted, source)
        annotation = _SCHEMA[dotted]
        if dataclasses.is_dataclass(annotation):
            check_layer(value, source, f"{dotted}.")
        else:
            _check_value(dotted, value, annotation, source)


def _check_value(dotted: str, value: Any, annotation: Any, source: str) -> None:
    if not _matches(value, annotation):
        raise ConfigError(
            f"config key '{dotted}' in {source} must be {_type_name(annotation)}, "
            f"got {value!r} ({type(value).__name__})"
        )
    # Lightning reads a string as GPU indices and -1 as every GPU, and fails on either on a CPU
    # with a traceback; a count of processes per machine, or auto, is the one way here.
    if dotted == "training.trainer.devices" and value != "auto":
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(
                f"config key '{dotted}' in {source} must be a number of processes per machine "
                f"(an int > 0) or auto, got {value!r}"
            )
        return
    if dotted in _CHOICES:
        if str(value) not in _CHOICES[dotted]:
            raise ConfigError(
                f"config key '{dotted}' in {source} must be one of "
                f"{', '.join(_CHOICES[dotted])}, got {value!r}"
            )
        return
    if value is None or isinstance(value, str | list):
        return
    if dotted in _POSITIVE_KEYS and value <= 0:
        raise ConfigError(f"config key '{dotted}' in {source} must be > 0, got {value!r}")
    if dotted in _TOKEN_LIMIT_KEYS and value > MAX_TOKENS:
        raise ConfigError(
            f"config key '{dotted}' in {source} must be at most {MAX_TOKENS} (the tokens a BERT "
            f"encoder reads), got {value!r}"
        )
    if dotted in _NON_NEGATIVE_KEYS and value < 0:
        raise ConfigError(f"config key '{dotted}' in {source} must be >= 0, got {value!r}")


def parse_overrides(overrides: list[str] | tuple[str, ...], source: str) -> dict[str, Any]:
    """Turn ``a.b.c=value`` strings into a nested dict; values are typed by YAML rules."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r} in {source} is not KEY=VALUE "
                "(write it as e.g. training.learning_rate=1e-4)"
            )
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} in {source} conflicts with another override")
        node[leaf] = parse_yaml(raw_value, f"override {item!r}") if raw_value != "" else ""
    return nested


def split_overrides(text: str) -> list[str]:
    """The ``KEY=VALUE`` items of one space-separated string (the MLproject's ``overrides``
    parameter), split as a shell splits words, so that a quoted value may hold spaces."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(
            f"--overrides {text!r} cannot be split into KEY=VALUE items ({exc}); "
            "close the quote, or quote a value with spaces as KEY='a value'"
        ) from exc


def is_override(text: str) -> bool:
    """Whether ``text`` sets a key of the configuration (``search.item_weight=0``), as no
    business description does."""
    key, sep, _ = text.partition("=")
    return bool(sep) and key.strip() in _SCHEMA


def merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``layer``'s leaves replace ``base``'s, recursively."""
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build(cls: type, tree: dict[str, Any], source: str, prefix: str = "") -> Any:
    values = {}
    for field in dataclasses.fields(cls):
        dotted = f"{prefix}{field.name}"
        if field.name not in tree:
            raise ConfigError(f"config key '{dotted}' is missing from {source}; add it")
        annotation = _SCHEMA[dotted]
        value = tree[field.name]
        values[field.name] = (
            _build(annotation, value, source, f"{dotted}.")
            if dataclasses.is_dataclass(annotation)
            else value
        )
    return cls(**values)


def build_config(
    base_path: str | Path, layers: list[tuple[dict[str, Any], str]] | None = None
) -> Config:
    """Load the base config file and merge each ``(partial dict, source name)`` layer over it.

    Each layer is validated on its own, so errors name the file or override that caused them.
    """
    base = read_yaml(base_path) or {}
    check_layer(base, str(base_path))
    merged = base
    for layer, source in layers or []:
        check_layer(layer, source)
        merged = merge(merged, layer)
    config = _build(Config, merged, str(base_path))
    _check_cross_field(config)
    return config


def _check_cross_field(config: Config) -> None:
    moe = config.model.moe
    if moe.top_k > moe.num_experts:
        raise ConfigError(
            f"model.moe.top_k ({moe.top_k}) must not exceed model.moe.num_experts "
            f"({moe.num_experts}); lower top_k or add experts"
        )
    if config.data_loader.all_codes_in_batch and not config.training.head_only:
        raise ConfigError(
            "data_loader.all_codes_in_batch needs training.head_only=true: only a head-only stage "
            "affords all 2,125 codes in every step; set one or unset the other"
        )
    if not 0 < config.data_loader.val_split < 1:
        raise ConfigError(
            f"data_loader.val_split must be between 0 and 1 (exclusive), "
            f"got {config.data_loader.val_split}"
        )


def load_config(
    path: str | Path = "conf/config.yaml", overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """The configuration from a file plus command-line ``KEY=VALUE`` overrides."""
    layers = [
        (parse_overrides([item], "the command line"), f"override '{item}'") for item in overrides
    ]
    return build_config(path, layers)
