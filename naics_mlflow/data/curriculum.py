"""Curriculum stages: which (anchor, positive, negative) triples a training stage draws.

A stage is a :class:`CurriculumSpec` read from ``conf/text_curriculum/*.yaml``; a chain file
(:class:`ChainSpec`) lists stages to run in order. :class:`CurriculumSampler` turns a spec and the
tree matrices into one :class:`EpochSample` per epoch. docs/curriculum.md gives the exact rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from naics_mlflow.config import ConfigError, read_yaml
from naics_mlflow.data.taxonomy import MAX_LEVEL, MIN_LEVEL
from naics_mlflow.data.taxonomy import UNRELATED as MAX_RELATION
from naics_mlflow.errors import UserError

# Added to the key of every admissible cross-referenced negative so that it outranks any other
# candidate: log-weights lie in [-log(11), 0] and Gumbel noise from float64 uniforms in [-4, 37].
_CROSS_REFERENCE_PRIORITY = 1.0e6


class CurriculumError(UserError, ValueError):
    """A curriculum or chain file that does not validate, or a stage that leaves no anchor."""


# Each list filter: (smallest allowed value, largest allowed value or None, what the values mean).
_FILTER_RANGES: dict[str, tuple[int, int | None, str]] = {
    "anchor_level": (MIN_LEVEL, MAX_LEVEL, "levels run from 2 (sector) to 6 (national industry)"),
    "relation_margin": (
        -MAX_RELATION,
        MAX_RELATION,
        "a relation margin is a difference of two relation ids 0-15",
    ),
    "distance_margin": (
        1,
        None,
        "negatives are always strictly farther than the closest positive, so only margins >= 1 "
        "can match",
    ),
    "positive_level": (MIN_LEVEL, MAX_LEVEL, "levels run from 2 (sector) to 6 (national industry)"),
    "positive_relation": (0, MAX_RELATION, "relation ids run from 0 (self) to 15 (unrelated)"),
    "positive_distance": (0, None, "tree distances are >= 0"),
    "negative_level": (MIN_LEVEL, MAX_LEVEL, "levels run from 2 (sector) to 6 (national industry)"),
    "negative_relation": (0, MAX_RELATION, "relation ids run from 0 (self) to 15 (unrelated)"),
    "negative_distance": (0, None, "tree distances are >= 0"),
}


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `true` in a YAML list is a typo, not a level.
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_filter(field_name: str, values: Any) -> None:
    """Raise unless ``values`` is None or a non-empty list of ints inside the field's range."""
    if values is None:
        return
    if not isinstance(values, list | tuple):
        example = f"[{values}]" if _is_int(values) else "[1, 2]"
        raise CurriculumError(
            f"field '{field_name}' must be a list of integers or null, "
            f"got {type(values).__name__} {values!r}; write e.g. {example} (null for no filter)"
        )
    if len(values) == 0:
        raise CurriculumError(
            f"field '{field_name}' is an empty list, which matches nothing; use null for no filter"
        )
    low, high, meaning = _FILTER_RANGES[field_name]
    for value in values:
        if not _is_int(value):
            raise CurriculumError(
                f"field '{field_name}' must list integers, got {type(value).__name__} {value!r}"
            )
        if value < low or (high is not None and value > high):
            allowed = f"{low}-{high}" if high is not None else f">= {low}"
            raise CurriculumError(f"field '{field_name}' has {value}, outside {allowed}; {meaning}")


def _check_count(field_name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise CurriculumError(f"field '{field_name}' must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class CurriculumSpec:
    """One curriculum stage. Every list filter is ``None`` for "no filter".

    Levels are NAICS levels 2..6, relations the ids 0..15 of the relation matrix, distances tree
    distances; margins compare a negative with the anchor's closest positive (docs/curriculum.md).
    """

    name: str
    anchor_level: list[int] | None = None
    relation_margin: list[int] | None = None
    distance_margin: list[int] | None = None
    positive_level: list[int] | None = None
    positive_relation: list[int] | None = None
    positive_distance: list[int] | None = None
    negative_level: list[int] | None = None
    negative_relation: list[int] | None = None
    negative_distance: list[int] | None = None
    n_positives: int = 16
    n_negatives: int = 24
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise CurriculumError(f"field 'name' must be a non-empty string, got {self.name!r}")
        for field_name in _FILTER_RANGES:
            _check_filter(field_name, getattr(self, field_name))
        _check_count("n_positives", self.n_positives)
        _check_count("n_negatives", self.n_negatives)
        if not isinstance(self.description, str):
            raise CurriculumError(f"field 'description' must be a string, got {self.description!r}")


@dataclass(frozen=True)
class ChainStage:
    """One step of a chain: the curriculum named ``name`` (``conf/text_curriculum/<name>.yaml``)
    with optional per-stage values: the trainer's epochs, the learning rate, and ``overrides``,
    dotted config keys to values (``{data_loader.batch_size: 16}``), checked against the config
    schema when the chain is planned."""

    name: str
    max_epochs: int | None = None
    learning_rate: float | None = None
    overrides: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise CurriculumError(f"field 'name' must be a non-empty string, got {self.name!r}")
        if self.max_epochs is not None and (not _is_int(self.max_epochs) or self.max_epochs < 1):
            raise CurriculumError(
                f"field 'max_epochs' must be an integer >= 1 or null, got {self.max_epochs!r}"
            )
        if self.overrides is not None and not isinstance(self.overrides, dict):
            raise CurriculumError(
                "field 'overrides' must be a mapping of dotted config keys to values, "
                f"got {self.overrides!r}"
            )
        rate = self.learning_rate
        is_number = isinstance(rate, int | float) and not isinstance(rate, bool)
        if rate is not None and (not is_number or not math.isfinite(rate) or rate <= 0):
            raise CurriculumError(
                f"field 'learning_rate' must be a finite number > 0 or null, got {rate!r}"
            )


@dataclass(frozen=True)
class ChainSpec:
    """A named sequence of curriculum stages, trained one after the other."""

    chain_name: str
    stages: list[ChainStage]

    def __post_init__(self) -> None:
        if not isinstance(self.chain_name, str) or not self.chain_name.strip():
            raise CurriculumError(
                f"field 'chain_name' must be a non-empty string, got {self.chain_name!r}"
            )
        if not isinstance(self.stages, list) or not self.stages:
            raise CurriculumError(
                "field 'stages' must be a non-empty list of stages (each with at least a name)"
            )


_SPEC_FIELDS = [f.name for f in dataclasses.fields(CurriculumSpec)]
_STAGE_FIELDS = [f.name for f in dataclasses.fields(ChainStage)]
_CHAIN_FIELDS = [f.name for f in dataclasses.fields(ChainSpec)]


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = read_yaml(path)
    except ConfigError as exc:
        raise CurriculumError(str(exc)) from exc
    if not isinstance(raw, dict):
        raise CurriculumError(f"{path}: expected a mapping of fields to values, got {raw!r}")
    return raw


def _check_known(raw: dict[str, Any], valid: list[str], where: str) -> None:
    """Raise on the first key of ``raw`` not in ``valid``, suggesting the closest valid names."""
    for key in raw:
        if key in valid:
            continue
        close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "valid fields:"
        listing = "" if close else " " + ", ".join(valid)
        raise CurriculumError(f"{where}: unknown field {key!r}; {hint}{listing}")


def _require(raw: dict[str, Any], key: str, where: str, example: str) -> None:
    if key not in raw:
        raise CurriculumError(f"{where}: missing required field '{key}'; add e.g. {key}: {example}")


def load_curriculum(path: str | Path) -> CurriculumSpec:
    """Read and validate one curriculum stage file; omitted filters mean "no filter"."""
    path = Path(path)
    raw = _read_mapping(path)
    if "chain_name" in raw:
        raise CurriculumError(f"{path}: this is a chain file (it has 'chain_name'); use load_chain")
    _check_known(raw, _SPEC_FIELDS, str(path))
    _require(raw, "name", str(path), path.stem)
    try:
        spec = CurriculumSpec(**raw)
    except CurriculumError as exc:
        raise CurriculumError(f"{path}: {exc}") from None
    _check_named_as_its_file(path, "name", spec.name, "a stage's runs are named and found by it")
    return spec


def _check_named_as_its_file(path: Path, field: str, name: str, why: str) -> None:
    """A stage or chain is chosen by its file's name and recorded under its own: a copied file
    that kept its original's would train as the original, and be found as it."""
    if name != path.stem:
        raise CurriculumError(
            f"{path}: {field} is {name!r}, but the file is {path.name}; set {field}: "
            f"{path.stem}, or name the file {name}.yaml ({why})"
        )


def list_curricula(directory: str | Path) -> list[CurriculumSpec]:
    """Every curriculum stage in ``directory`` (``*.yaml``, chain files skipped), by file name."""
    specs = []
    for path in sorted(Path(directory).glob("*.yaml")):
        if "chain_name" not in _read_mapping(path):
            specs.append(load_curriculum(path))
    return specs


def _learning_rate(value: Any, where: str) -> float | None:
    """YAML 1.1 readers give ``2e-4`` as a string, so numeric strings are accepted."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise CurriculumError(f"{where}: field 'learning_rate' must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CurriculumError(
            f"{where}: field 'learning_rate' must be a number such as 2.0e-4, got {value!r}"
        ) from None


def _chain_stage(raw: Any, where: str) -> ChainStage:
    if not isinstance(raw, dict):
        raise CurriculumError(
            f"{where}: expected a mapping such as {{name: 01_stage}}, got {raw!r}"
        )
    _check_known(raw, _STAGE_FIELDS, where)
    _require(raw, "name", where, "01_stage")
    values = dict(raw, learning_rate=_learning_rate(raw.get("learning_rate"), where))
    try:
        return ChainStage(**values)
    except CurriculumError as exc:
        raise CurriculumError(f"{where}: {exc}") from None


def load_chain(path: str | Path) -> ChainSpec:
    """Read and validate a chain file: ``chain_name`` and a non-empty list of ``stages``."""
    path = Path(path)
    raw = _read_mapping(path)
    _check_known(raw, _CHAIN_FIELDS, str(path))
    _require(raw, "chain_name", str(path), path.stem)
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise CurriculumError(
            f"{path}: field 'stages' must be a non-empty list of stages, got {stages!r}; "
            "add e.g. '- name: 01_stage'"
        )
    parsed = [_chain_stage(stage, f"{path}: stages[{i}]") for i, stage in enumerate(stages)]
    try:
        chain = ChainSpec(chain_name=raw["chain_name"], stages=parsed)
    except CurriculumError as exc:
        raise CurriculumError(f"{path}: {exc}") from None
    why = "it names the chain's parent run and its chain tag, which runs --chain finds"
    _check_named_as_its_file(path, "chain_name", chain.chain_name, why)
    return chain


@dataclass(frozen=True, eq=False)
class EpochSample:
    """One epoch of triples. Row m pairs ``anchors[m]`` with its positives and negatives.

    anchors: (M,) int32 code rows, ascending. positives: (M, n_positives) int32 and
    negatives: (M, n_negatives) int32, best-ranked first, padded with -1 when an anchor has
    fewer candidates than requested.
    """

    anchors: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray

    @property
    def positive_mask(self) -> np.ndarray:
        """(M, n_positives) bool: True where ``positives`` holds a code rather than padding."""
        return self.positives >= 0

    @property
    def negative_mask(self) -> np.ndarray:
        """(M, n_negatives) bool: True where ``negatives`` holds a code rather than padding."""
        return self.negatives >= 0


# A filter step: field name, its values (None skips it), and a function giving the array the
# values are looked up in — (N,) for a column property, (N, N) for a pair property.
_Step = tuple[str, Sequence[int] | None, Callable[[], np.ndarray]]


class CurriculumSampler:
    """Draws each epoch's triples for one curriculum stage.

    Inputs, all over the same N codes: ``levels`` (N,) int 2..6; ``relation`` (N, N) relation ids;
    ``distance`` (N, N) tree distances; ``excluded`` (N, N) bool, ``[a, j]`` True when code a's
    cross-references name code j. Candidate masks and weights are computed once here, so
    :meth:`sample_epoch` only adds noise and ranks.
    """

    def __init__(
        self,
        spec: CurriculumSpec,
        levels: np.ndarray,
        relation: np.ndarray,
        distance: np.ndarray,
        excluded: np.ndarray,
    ) -> None:
        self.spec = spec
        levels, relation, distance, excluded = _checked_inputs(levels, relation, distance, excluded)
        anchors = np.ones(levels.shape[0], dtype=bool)
        if spec.anchor_level is not None:
            anchors &= np.isin(levels, spec.anchor_level)
        if not anchors.any():
            present = sorted({int(v) for v in levels})
            raise CurriculumError(
                f"curriculum '{spec.name}': anchor_level={spec.anchor_level} leaves no anchor "
                f"(the codes have levels {present}); widen anchor_level"
            )
        off_diagonal = ~np.eye(levels.shape[0], dtype=bool)
        positive = self._positive_candidates(anchors, off_diagonal, levels, relation, distance)
        anchors &= positive.any(axis=1)

        closest_relation = _row_min(relation, positive)
        closest_distance = _row_min(distance, positive)
        negative = self._negative_candidates(
            anchors,
            positive,
            off_diagonal,
            levels,
            relation,
            distance,
            closest_relation,
            closest_distance,
        )
        anchors &= negative.any(axis=1)

        self._anchors = np.flatnonzero(anchors).astype(np.int32)
        self._positive = positive
        rows = self._anchors
        self._positive_keys = np.where(positive[rows], 0.0, -np.inf)
        self._negative_keys = _negative_log_weights(
            negative[rows], distance[rows], closest_distance[rows], excluded[rows]
        )

    @property
    def eligible_anchors(self) -> np.ndarray:
        """(M,) int32: rows of the codes that anchor a triple in this stage, ascending."""
        return self._anchors

    @property
    def positive_candidates(self) -> np.ndarray:
        """(N, N) bool: ``[a, j]`` True when code j is a positive of anchor a in this stage."""
        return self._positive

    def sample_epoch(self, seed: int) -> EpochSample:
        """One epoch of triples; the same seed always gives the same sample."""
        rng = np.random.default_rng(seed)
        # One noise matrix serves both draws: positive and negative candidates are disjoint cells,
        # so the two rankings use independent noise.
        noise = rng.gumbel(size=self._positive_keys.shape)
        return EpochSample(
            anchors=self._anchors.copy(),
            positives=_top_k(self._positive_keys + noise, self.spec.n_positives),
            negatives=_top_k(self._negative_keys + noise, self.spec.n_negatives),
        )

    def _positive_candidates(
        self,
        anchors: np.ndarray,
        off_diagonal: np.ndarray,
        levels: np.ndarray,
        relation: np.ndarray,
        distance: np.ndarray,
    ) -> np.ndarray:
        """(N, N) bool: ``[a, j]`` True when j passes every positive filter for anchor a."""
        spec = self.spec
        steps: list[_Step] = [
            ("positive_level", spec.positive_level, lambda: levels),
            ("positive_relation", spec.positive_relation, lambda: relation),
            ("positive_distance", spec.positive_distance, lambda: distance),
        ]
        return self._filter(
            off_diagonal,
            anchors,
            steps,
            "positive",
            "there is only one code, so no anchor has a pair",
        )

    def _negative_candidates(
        self,
        anchors: np.ndarray,
        positive: np.ndarray,
        off_diagonal: np.ndarray,
        levels: np.ndarray,
        relation: np.ndarray,
        distance: np.ndarray,
        closest_relation: np.ndarray,
        closest_distance: np.ndarray,
    ) -> np.ndarray:
        """(N, N) bool: ``[a, j]`` True when j is an admissible negative for anchor a."""
        spec = self.spec
        # A negative must be strictly farther than the anchor's closest positive: pushing away a
        # code as near as one being pulled in would ask the loss for contradictory geometry.
        base = off_diagonal & ~positive & (distance > closest_distance[:, None])
        steps: list[_Step] = [
            ("negative_level", spec.negative_level, lambda: levels),
            ("negative_relation", spec.negative_relation, lambda: relation),
            ("negative_distance", spec.negative_distance, lambda: distance),
            ("relation_margin", spec.relation_margin, lambda: relation - closest_relation[:, None]),
            ("distance_margin", spec.distance_margin, lambda: distance - closest_distance[:, None]),
        ]
        empty_base = (
            "every code is a positive of its anchor or no farther than its closest positive; "
            "narrow the positive filters"
        )
        return self._filter(base, anchors, steps, "negative", empty_base)

    def _filter(
        self,
        mask: np.ndarray,
        anchors: np.ndarray,
        steps: list[_Step],
        kind: str,
        empty_base: str,
    ) -> np.ndarray:
        """``mask`` (N, N) bool narrowed by ``steps`` in order, as a new array; raise naming the
        first step after which no anchor keeps a candidate (``empty_base`` explains an empty start).
        """
        mask = mask.copy()
        if not mask[anchors].any():
            raise CurriculumError(
                f"curriculum '{self.spec.name}': no anchor has a {kind} candidate: {empty_base}"
            )
        for field_name, values, lookup in steps:
            if values is None:
                continue
            mask &= np.isin(lookup(), values)
            if not mask[anchors].any():
                raise CurriculumError(
                    f"curriculum '{self.spec.name}': no anchor has a {kind} after "
                    f"{field_name}={list(values)} (filters apply in the order of "
                    f"docs/curriculum.md); widen {field_name}"
                )
        return mask


def _checked_inputs(
    levels: np.ndarray, relation: np.ndarray, distance: np.ndarray, excluded: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The inputs as arrays, with shapes checked; int16 so margins cannot overflow int8."""
    levels = np.asarray(levels)
    n = levels.shape[0] if levels.ndim == 1 else -1
    arrays = {"relation": relation, "distance": distance, "excluded": excluded}
    for name, array in arrays.items():
        if np.shape(array) != (n, n):
            raise ValueError(
                f"{name} must be (N, N) = ({n}, {n}) to match levels {levels.shape}, "
                f"got {np.shape(array)}"
            )
    return (
        levels,
        np.asarray(relation, dtype=np.int16),
        np.asarray(distance, dtype=np.int16),
        np.asarray(excluded, dtype=bool),
    )


def _row_min(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N,) int16: the smallest ``values[a, j]`` over the True cells of row a of ``mask``;
    the int16 maximum for an empty row, which then admits no negative."""
    sentinel = np.iinfo(np.int16).max
    return np.where(mask, values, sentinel).min(axis=1).astype(np.int16)


def _negative_log_weights(
    negative: np.ndarray, distance: np.ndarray, closest: np.ndarray, excluded: np.ndarray
) -> np.ndarray:
    """(M, N) float64 ranking keys before noise: ``-log(1 + distance - closest)``, plus a large
    priority for cross-referenced codes, and -inf for codes that are not candidates.

    negative, distance, excluded: (M, N) rows of the eligible anchors; closest: (M,).
    """
    margin = np.where(negative, distance - closest[:, None], 0)
    keys = -np.log1p(margin) + _CROSS_REFERENCE_PRIORITY * excluded
    return np.where(negative, keys, -np.inf)


def _top_k(keys: np.ndarray, k: int) -> np.ndarray:
    """(M, k) int32: per row, the columns of the k largest finite keys, largest first, -1 where a
    row has fewer than k finite keys. keys: (M, N) float64, -inf for inadmissible columns."""
    m, n = keys.shape
    take = min(k, n)
    if take < n:
        columns = np.argpartition(-keys, take - 1, axis=1)[:, :take]
    else:
        columns = np.broadcast_to(np.arange(n), (m, n))
    chosen = np.take_along_axis(keys, columns, axis=1)
    # argpartition leaves its k winners in no defined order; ranking them makes the output
    # independent of the partition algorithm.
    order = np.argsort(-chosen, axis=1, kind="stable")
    columns = np.take_along_axis(columns, order, axis=1)
    chosen = np.take_along_axis(chosen, order, axis=1)
    out = np.full((m, k), -1, dtype=np.int32)
    out[:, :take] = np.where(np.isfinite(chosen), columns, -1)
    return out
