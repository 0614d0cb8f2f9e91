"""``naics-embedder data build``: Census workbooks -> the parquet and .npy files in ``data/``.

The build is all-or-nothing: every output is written to a temporary folder next to the outputs and
moved into place only when all of them are complete, with ``manifest.json`` last. The manifest holds
a fingerprint of the inputs (the four workbooks and this build code), so an unchanged rebuild does
nothing unless forced, and a digest of the code alone, so that commands which read a build say
when other code made it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from naics_mlflow.data import census, taxonomy
from naics_mlflow.data.census import INDEX_POINTER_CODE, CensusRelease, DataError
from naics_mlflow.data.taxonomy import (
    CODES_FILE,
    DEV_FILE,
    DISTANCE_MATRIX_FILE,
    DISTANCES_FILE,
    HOLDOUT_FILE,
    RELATION_MATRIX_FILE,
    RELATIONS_FILE,
    TRAINING,
)
from naics_mlflow.files import out_of_room

logger = logging.getLogger(__name__)

# A code at levels 2-5 reads at most this many of its descendants' training items: a random
# sample estimates the mean of all of them well, and bounds what embedding a code costs (a sector
# has thousands).
MAX_INHERITED_EXAMPLES = 64

MANIFEST_FILE = "manifest.json"
OUTPUT_FILES = (
    CODES_FILE,
    HOLDOUT_FILE,
    DEV_FILE,
    DISTANCE_MATRIX_FILE,
    RELATION_MATRIX_FILE,
    DISTANCES_FILE,
    RELATIONS_FILE,
)


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    rebuilt: bool
    n_codes: int
    n_training_examples: int
    n_cross_referenced_activities: int
    n_dev: int
    n_holdout: int


def _digest_of_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _code_digest() -> str:
    """Digest of the code that turns the workbooks into outputs."""
    return _digest_of_files([Path(census.__file__), Path(taxonomy.__file__), Path(__file__)])


def _fingerprint(paths: dict[str, Path]) -> str:
    """Digest of the input workbooks and of the code that turns them into outputs."""
    return _digest_of_files([*(paths[role] for role in sorted(paths))]) + _code_digest()


def warn_if_built_by_other_code(out_dir: Path) -> None:
    """Say in one line when the complete build in ``out_dir`` was made by other code than this
    (an earlier version records none): commands read it as it is, and it may lack what this code
    writes, such as the cross-referenced activities among the examples."""
    manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
    if manifest.get("code_digest") != _code_digest():
        _say_built_by_other_code(out_dir)


@functools.cache
def _say_built_by_other_code(out_dir: Path) -> None:
    """Once a process for each folder: a stage checks its data before it opens a run and
    Lightning's fit checks it again, as does every stage of a chain."""
    logger.warning(
        "%s was built by another version of naics-embedder; run `naics-embedder data build` "
        "to rebuild it from the Census files",
        out_dir,
    )


def _content_digest(
    rows: list[dict], held_out: list, dev: list, distance: np.ndarray, relation: np.ndarray
) -> str:
    """A short digest of what a build holds: the same data, whatever code or inputs made it.
    Of the content, not of the files: pyarrow writes its version into every parquet file, so
    the same data built on a machine with another pyarrow had another digest, and a chain
    continued there started over. The pair tables are the matrices in long form."""
    digest = hashlib.sha256(json.dumps([rows, held_out, dev], ensure_ascii=False).encode())
    for matrix in (distance, relation):
        digest.update(f"{matrix.dtype.str}{matrix.shape}".encode())
        digest.update(np.ascontiguousarray(matrix).tobytes())
    return digest.hexdigest()[:12]


def ensure_built(raw_dir: Path, out_dir: Path, release: CensusRelease) -> None:
    """Build ``out_dir`` from the workbooks in ``raw_dir`` unless a complete build is there, which
    is read as it is (one made by other code is named once)."""
    if not is_built(out_dir):
        build_data(raw_dir, out_dir, release)
    else:
        warn_if_built_by_other_code(out_dir)


def data_digest(out_dir: Path) -> str | None:
    """The digest of a complete build's outputs (what a run trained on), None if not built."""
    if not is_built(out_dir):
        return None
    return json.loads((out_dir / MANIFEST_FILE).read_text()).get("data_digest")


def is_built(out_dir: Path) -> bool:
    """Whether a complete build is in ``out_dir`` (its manifest is written last)."""
    return (out_dir / MANIFEST_FILE).is_file() and all(
        (out_dir / name).is_file() for name in OUTPUT_FILES
    )


def _up_to_date(out_dir: Path, fingerprint: str) -> bool:
    if not is_built(out_dir):
        return False
    return json.loads((out_dir / MANIFEST_FILE).read_text()).get("fingerprint") == fingerprint


class _Progress:
    """One log line per build step, with the step's wall time."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()

    def step(self, message: str) -> None:
        now = time.perf_counter()
        logger.info("data build: %s (%.1f s)", message, now - self.last)
        self.last = now


def _read_codes(path: Path, release: CensusRelease) -> tuple[list[str], dict[str, str]]:
    codes: list[str] = []
    titles: dict[str, str] = {}
    for row_number, row in census.read_rows(path, release.files["codes"]):
        code = census.parse_code(row["2022 NAICS US   Code"], path, row_number)
        if code in titles:
            raise DataError(f"{path} row {row_number}: code {code} appears twice")
        parent = taxonomy.parent_of(code)
        if parent is not None and parent not in titles:
            raise DataError(
                f"{path} row {row_number}: code {code} comes before (or without) its parent "
                f"{parent}; the codes file must list each parent before its children"
            )
        titles[code] = taxonomy.clean_title(
            census.parse_text(row["2022 NAICS US Title"], path, row_number, "2022 NAICS US Title")
        )
        codes.append(code)
    return codes, titles


def _read_descriptions(
    path: Path, release: CensusRelease, titles: dict[str, str]
) -> dict[str, str]:
    descriptions: dict[str, str] = {}
    for row_number, row in census.read_rows(path, release.files["descriptions"]):
        code = census.parse_code(row["Code"], path, row_number)
        if code not in titles:
            raise DataError(f"{path} row {row_number}: code {code} is not in the codes file")
        if code in descriptions:
            raise DataError(f"{path} row {row_number}: code {code} appears twice")
        title = taxonomy.clean_title(census.parse_text(row["Title"], path, row_number, "Title"))
        if title != titles[code]:
            raise DataError(
                f"{path} row {row_number}: title of {code} {title!r} differs from the codes "
                f"file's {titles[code]!r}; are both files from the 2022 release?"
            )
        descriptions[code] = taxonomy.clean_description(row["Description"])
    missing = [code for code in titles if code not in descriptions]
    if missing:
        raise DataError(f"{path}: no description row for {len(missing)} codes, e.g. {missing[0]}")
    return descriptions


def _fill_descriptions(
    codes: list[str], titles: dict[str, str], descriptions: dict[str, str]
) -> dict[str, str]:
    """Resolve ``See industry description for X`` placeholders to X's text, then fill empty
    descriptions from the code's only child (deepest codes first, so fills can chain), else
    from the title."""
    resolved = {}
    for code in codes:
        pointer = taxonomy.description_pointer(descriptions[code])
        resolved[code] = descriptions[pointer] if pointer in descriptions else descriptions[code]
    children: dict[str, list[str]] = defaultdict(list)
    for code in codes:
        parent = taxonomy.parent_of(code)
        if parent is not None:
            children[parent].append(code)
    for code in sorted(codes, key=len, reverse=True):
        if resolved[code] == "":
            only_child = children[code][0] if len(children[code]) == 1 else None
            resolved[code] = resolved[only_child] if only_child else titles[code]
    return resolved


def _read_index(
    path: Path, release: CensusRelease, titles: dict[str, str]
) -> tuple[dict[str, list[str]], dict[str, list[tuple[str, str]]], int]:
    """Training items by code, the dev and held-out ``(code, text)`` pairs by split name, and the
    number of pointer rows dropped."""
    training: dict[str, list[str]] = defaultdict(list)
    evaluation: dict[str, list[tuple[str, str]]] = defaultdict(list)
    pointers = 0
    for row_number, row in census.read_rows(path, release.files["index"]):
        if str(row["NAICS22"]).strip() == INDEX_POINTER_CODE:
            pointers += 1
            continue
        code = census.parse_code(row["NAICS22"], path, row_number)
        if code not in titles:
            raise DataError(f"{path} row {row_number}: code {code} is not in the codes file")
        text = census.parse_text(
            row["INDEX ITEM DESCRIPTION"], path, row_number, "INDEX ITEM DESCRIPTION"
        )
        split = taxonomy.index_split(code, text)
        if split == TRAINING:
            training[code].append(text)
        else:
            evaluation[split].append((code, text))
    return training, evaluation, pointers


def _read_cross_references(
    path: Path, release: CensusRelease, titles: dict[str, str]
) -> dict[str, list[str]]:
    sentences: dict[str, list[str]] = defaultdict(list)
    for row_number, row in census.read_rows(path, release.files["cross_references"]):
        code = census.parse_code(row["Code"], path, row_number)
        if code not in titles:
            raise DataError(f"{path} row {row_number}: code {code} is not in the codes file")
        sentences[code].append(
            census.parse_text(row["Cross-Reference"], path, row_number, "Cross-Reference")
        )
    return sentences


def _new_activities(
    credited: dict[str, list[str]],
    training: dict[str, list[str]],
    evaluation: list[tuple[str, str]],
) -> dict[str, list[str]]:
    """The cross-referenced activities that add a text to their code's examples.

    A cross-reference may word an activity as a dev or held-out item does (6 in the 2022 files,
    ignoring case): those stay out of every code's texts, like the items themselves. One that
    repeats the code's own training item adds nothing.
    """
    evaluation_texts = {text.casefold() for _, text in evaluation}
    new: dict[str, list[str]] = {}
    for code, activities in credited.items():
        own = set(training.get(code, []))
        kept = [a for a in activities if a.casefold() not in evaluation_texts and a not in own]
        if kept:
            new[code] = kept
    return new


def _examples(
    codes: list[str], training: dict[str, list[str]], activities: dict[str, list[str]]
) -> dict[str, list[str]]:
    """A six-digit code's own training items, then the activities that cross-references classify
    in it (:func:`_new_activities`); a higher code's are
    up to ``MAX_INHERITED_EXAMPLES`` of its six-digit descendants' training items (the index file
    lists only six-digit codes), drawn at random with a seed fixed by the code, kept in code
    order."""
    inherited: dict[str, list[str]] = {code: [] for code in codes}
    for code in codes:
        node = taxonomy.parent_of(code)
        while node is not None:
            inherited[node].extend(training.get(code, []))
            node = taxonomy.parent_of(node)
    examples = {}
    for code in codes:
        if len(code) == taxonomy.MAX_LEVEL:
            examples[code] = [*training.get(code, []), *activities.get(code, [])]
            continue
        items = inherited[code]
        seed = int(hashlib.sha1(code.encode()).hexdigest(), 16) % 2**32
        kept = np.random.default_rng(seed).permutation(len(items))[:MAX_INHERITED_EXAMPLES]
        examples[code] = [items[i] for i in sorted(kept)]
    return examples


def _item_table(pairs: list[tuple[str, str]]) -> pa.Table:
    return pa.table(
        {"code": [c for c, _ in pairs], "text": [t for _, t in pairs]},
        schema=pa.schema([("code", pa.string()), ("text", pa.string())]),
    )


def _pair_table(codes: list[str], matrix: np.ndarray, column: str) -> pa.Table:
    """Long form of an (N, N) matrix: one row per ordered pair, codes dictionary-encoded."""
    n = len(codes)
    dictionary = pa.array(codes, type=pa.string())
    rows = np.repeat(np.arange(n, dtype=np.int32), n)
    cols = np.tile(np.arange(n, dtype=np.int32), n)
    return pa.table(
        {
            "code_i": pa.DictionaryArray.from_arrays(rows, dictionary),
            "code_j": pa.DictionaryArray.from_arrays(cols, dictionary),
            column: pa.array(matrix.reshape(-1), type=pa.int8()),
        }
    )


def build_data(
    raw_dir: Path, out_dir: Path, release: CensusRelease, force: bool = False
) -> BuildResult:
    """Build every output under ``out_dir`` from the workbooks in ``raw_dir``."""
    progress = _Progress()
    paths = census.ensure_raw_files(raw_dir, release)
    fingerprint = _fingerprint(paths)
    if not force and _up_to_date(out_dir, fingerprint):
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
        logger.info("data build: %s is up to date with %s; nothing to do", out_dir, raw_dir)
        return BuildResult(out_dir, False, **manifest["counts"])

    codes, titles = _read_codes(paths["codes"], release)
    progress.step(f"read {len(codes):,} codes")
    descriptions = _fill_descriptions(
        codes, titles, _read_descriptions(paths["descriptions"], release, titles)
    )
    progress.step("read descriptions")
    training, evaluation, pointers = _read_index(paths["index"], release, titles)
    dev, held_out = evaluation[taxonomy.DEV], evaluation[taxonomy.HELD_OUT]
    n_training = sum(len(items) for items in training.values())
    logger.info(
        "data build: dropped %d index rows with code %s (pointers, not examples)",
        pointers,
        INDEX_POINTER_CODE,
    )
    progress.step(
        f"read index: {n_training:,} training items, {len(dev):,} dev, {len(held_out):,} held out"
    )
    cross_references = _read_cross_references(paths["cross_references"], release, titles)
    progress.step(f"read cross-references of {len(cross_references):,} codes")

    valid = set(codes)
    activities = _new_activities(
        taxonomy.cross_referenced_activities(codes, cross_references), training, [*dev, *held_out]
    )
    n_activities = sum(len(added) for added in activities.values())
    progress.step(
        f"credited {n_activities:,} cross-referenced activities to {len(activities):,} national "
        "industries"
    )
    examples = _examples(codes, training, activities)
    rows = []
    for code in codes:
        sentences = cross_references.get(code, [])
        named = [c for s in sentences for c in taxonomy.mentioned_codes(s, valid) if c != code]
        rows.append(
            {
                "code": code,
                "display_code": taxonomy.display_code(code),
                "level": len(code),
                "parent": taxonomy.parent_of(code),
                "title": titles[code],
                "description": descriptions[code],
                "examples": examples[code],
                "excluded": sentences,
                "excluded_codes": list(dict.fromkeys(named)),
            }
        )
    distance, relation = taxonomy.tree_matrices(codes)
    progress.step("computed tree distances and relations")

    counts = {
        "n_codes": len(codes),
        "n_training_examples": n_training,
        "n_cross_referenced_activities": n_activities,
        "n_dev": len(dev),
        "n_holdout": len(held_out),
    }
    _write_atomically(
        out_dir,
        {
            CODES_FILE: lambda p: pq.write_table(taxonomy.codes_table(rows), p),
            HOLDOUT_FILE: lambda p: pq.write_table(_item_table(held_out), p),
            DEV_FILE: lambda p: pq.write_table(_item_table(dev), p),
            DISTANCE_MATRIX_FILE: lambda p: np.save(p, distance),
            RELATION_MATRIX_FILE: lambda p: np.save(p, relation),
            DISTANCES_FILE: lambda p: pq.write_table(_pair_table(codes, distance, "distance"), p),
            RELATIONS_FILE: lambda p: pq.write_table(
                _pair_table(codes, relation, "relation_id"), p
            ),
        },
        {
            "fingerprint": fingerprint,
            "code_digest": _code_digest(),
            "data_digest": _content_digest(rows, held_out, dev, distance, relation),
            "counts": counts,
        },
    )
    progress.step(f"wrote {len(OUTPUT_FILES)} files to {out_dir}")
    logger.info("data build: done in %.1f s", time.perf_counter() - progress.started)
    return BuildResult(out_dir, True, **counts)


def _write_atomically(out_dir: Path, writers: dict, manifest: dict) -> None:
    """Write every output into a temporary folder, then move each into ``out_dir``, the
    manifest last: a build killed midway leaves no manifest that vouches for partial files."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    except OSError as exc:
        raise _unwritable(out_dir, exc) from exc
    try:
        for name, write in writers.items():
            write(staging / name)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
        for name in [*writers, MANIFEST_FILE]:
            os.replace(staging / name, out_dir / name)
    except OSError as exc:
        raise _unwritable(out_dir, exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unwritable(out_dir: Path, exc: OSError) -> DataError:
    remedy = (
        "free space on its disk, or give --out (or dirs.data) a folder on another"
        if out_of_room(exc)
        else "give --out (or dirs.data) a folder you can write"
    )
    return DataError(f"cannot write the data build to {out_dir} ({exc.strerror or exc}); {remedy}")
