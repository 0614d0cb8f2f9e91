"""The NAICS tree: codes and their texts, tree distances and relations between every pair of codes.

Built once by ``naics-embedder data build`` (see :mod:`naics_mlflow.data.build`) and read back with
:func:`load_taxonomy`. Rows and columns of every matrix follow the row order of
``naics_codes.parquet``: the codes file's order, in which a parent precedes its children.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from naics_mlflow.data.census import RANGE_SECTORS, SECTOR_OF_PREFIX

CODES_FILE = "naics_codes.parquet"
HOLDOUT_FILE = "index_holdout.parquet"
DEV_FILE = "index_dev.parquet"
DISTANCE_MATRIX_FILE = "distance_matrix.npy"
RELATION_MATRIX_FILE = "relation_matrix.npy"
DISTANCES_FILE = "naics_distances.parquet"
RELATIONS_FILE = "naics_relations.parquet"

MIN_LEVEL, MAX_LEVEL = 2, 6
UNRELATED = 15

# Relation ids (the seed's numbering) by the two codes' depths below their lowest common ancestor,
# smaller depth first. Codes in different sectors are UNRELATED.
RELATION_BY_DEPTHS = {
    (0, 0): 0,  # self
    (0, 1): 1,  # child
    (1, 1): 2,  # sibling
    (0, 2): 3,  # grandchild
    (0, 3): 4,  # great-grandchild
    (1, 2): 5,  # nephew/niece
    (0, 4): 6,  # great-great-grandchild
    (2, 2): 7,  # cousin
    (1, 3): 8,  # grand-nephew/niece
    (1, 4): 9,  # grand-grand-nephew/niece
    (2, 3): 10,  # cousin once removed
    (3, 3): 11,  # second cousin
    (2, 4): 12,  # cousin twice removed
    (3, 4): 13,  # second cousin once removed
    (4, 4): 14,  # third cousin
}
RELATION_NAMES = {
    0: "self",
    1: "child",
    2: "sibling",
    3: "grandchild",
    4: "great-grandchild",
    5: "nephew/niece",
    6: "great-great-grandchild",
    7: "cousin",
    8: "grand-nephew/niece",
    9: "grand-grand-nephew/niece",
    10: "cousin once removed",
    11: "second cousin",
    12: "cousin twice removed",
    13: "second cousin once removed",
    14: "third cousin",
    15: "unrelated",
}

_DISPLAY_CODE = {first: display for display, first in RANGE_SECTORS.items()}
_CROSS_REFERENCE_TAIL = re.compile(r"\s*Cross-References\..*$", re.S)
_SECTOR_HEADING = re.compile(r"^\s*The Sector as a Whole\s*", re.S)
_POINTER = re.compile(r"^See industry description for (\d{6})\.?$")
_CODE_MENTION = re.compile(r"\b(\d{2})(?:-\d{2}|(\d{0,4}))\b")
# Where a cross-reference's activity ends and the clause naming its code begins:
# "Growing soybeans--are classified in ...", "Establishments ... are included in ...". A letter
# may precede the verb: 423720's cross-reference reads "--are lclassified in Industry 423730".
_CLASSIFIED_IN = re.compile(r"(?:--|\s)(?:are|is)\s+[a-z]?(?:classified|included)\b")


def sector_of(prefix: str) -> str:
    """The sector code of a two-digit prefix: ``32`` belongs to the range sector ``31``."""
    return SECTOR_OF_PREFIX.get(prefix, prefix)


def parent_of(code: str) -> str | None:
    """The parent code, or None for a sector. ``3211`` -> ``321``, ``321`` -> ``31``."""
    if len(code) == MIN_LEVEL:
        return None
    if len(code) == MIN_LEVEL + 1:
        return sector_of(code[:2])
    return code[:-1]


def display_code(code: str) -> str:
    """The code as the Census writes it: ``31`` -> ``31-33``."""
    return _DISPLAY_CODE.get(code, code)


def clean_title(raw: str) -> str:
    """Strip whitespace and the trailing ``T`` trilateral-agreement marker, if present."""
    title = raw.strip()
    return title[:-1].rstrip() if title.endswith("T") and title[:-1].rstrip() != "" else title


def clean_description(raw: str | None) -> str:
    """Drop the truncated ``Cross-References.`` tail and the sector heading; ``NULL`` is empty."""
    text = "" if raw is None or str(raw).strip() == "NULL" else str(raw)
    text = _CROSS_REFERENCE_TAIL.sub("", text)
    return _SECTOR_HEADING.sub("", text).strip()


def description_pointer(description: str) -> str | None:
    """The code named by a ``See industry description for 111110.`` placeholder, if any."""
    match = _POINTER.match(description)
    return match.group(1) if match else None


def mentioned_codes(sentence: str, valid_codes: set[str]) -> list[str]:
    """Valid NAICS codes named in a sentence, in order, without repeats.

    ``Sector 48-49`` names ``48``; numbers that are not codes of the release are ignored.
    """
    found: list[str] = []
    for match in _CODE_MENTION.finditer(sentence):
        code = match.group(0) if match.group(2) is not None else match.group(1)
        if code in valid_codes and code not in found:
            found.append(code)
    return found


def cross_reference_parts(sentence: str) -> tuple[str, str] | None:
    """A cross-reference split into the activity it excludes and the clause that says where the
    activity is classified instead; None when the sentence names no such place.

    ``"Growing soybeans--are classified in Industry 111110, Soybean Farming;"`` ->
    ``("Growing soybeans", " in Industry 111110, Soybean Farming;")``.
    """
    match = _CLASSIFIED_IN.search(sentence)
    if match is None:
        return None
    return sentence[: match.start()].strip(" ,;"), sentence[match.end() :]


def cross_referenced_activities(
    codes: list[str], cross_references: dict[str, list[str]]
) -> dict[str, list[str]]:
    """The activities that codes' cross-references classify in each national industry, each
    once, in the order of ``codes`` and their sentences: more examples of what a national
    industry covers, in the Census's words.

    Each code a cross-reference names is credited when it is a national industry, or a higher code
    with exactly one national industry under it (``Industry 11114`` is ``111140``); a group of
    several says too little about which one to credit, and a code never credits itself.
    """
    national_under: dict[str, list[str]] = {}
    for code in codes:
        node = code if len(code) == MAX_LEVEL else None
        while node is not None:
            national_under.setdefault(node, []).append(code)
            node = parent_of(node)
    valid = set(codes)
    activities: dict[str, list[str]] = {}
    for source in codes:
        for sentence in cross_references.get(source, []):
            parts = cross_reference_parts(sentence)
            if parts is None or not parts[0]:
                continue
            activity, destination = parts
            for named in mentioned_codes(destination, valid):
                under = national_under.get(named, [])
                if len(under) != 1 or under[0] == source:
                    continue
                credited = activities.setdefault(under[0], [])
                if activity not in credited:
                    credited.append(activity)
    return activities


HELD_OUT, DEV, TRAINING = "holdout", "dev", "train"


def index_split(code: str, text: str) -> str:
    """Which split an index item belongs to, by the last decimal digit of its SHA-1: 0 held out
    (only ever reported), 1 dev (every modelling choice is made on it), else training. Stable
    across runs and machines; dev and held-out items never enter any code's texts."""
    digit = int(hashlib.sha1(f"{code}|{text}".encode()).hexdigest(), 16) % 10
    return {0: HELD_OUT, 1: DEV}.get(digit, TRAINING)


def ancestor_matrix(codes: list[str]) -> np.ndarray:
    """(N, 5) int32: the row index of each code's ancestor at levels 2..6 (itself at its own
    level), -1 below the code's level."""
    position = {code: i for i, code in enumerate(codes)}
    ancestors = np.full((len(codes), MAX_LEVEL - MIN_LEVEL + 1), -1, dtype=np.int32)
    for i, code in enumerate(codes):
        node: str | None = code
        while node is not None:
            ancestors[i, len(node) - MIN_LEVEL] = position[node]
            node = parent_of(node)
    return ancestors


def tree_matrices(codes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tree distance and relation id for every pair, each (N, N) int8.

    Sectors hang under one virtual root at depth 0, so a code's depth is ``level - 1`` and two
    codes in different sectors are ``depth_i + depth_j`` apart.
    """
    ancestors = ancestor_matrix(codes)
    depth = (ancestors >= 0).sum(axis=1).astype(np.int8)
    common = np.zeros((len(codes), len(codes)), dtype=np.int8)
    for level_column in ancestors.T:
        # Ancestors nest, so sharing the ancestor at one level implies sharing every one above.
        common += (level_column[:, None] == level_column[None, :]) & (level_column[:, None] >= 0)
    below_i = depth[:, None] - common
    below_j = depth[None, :] - common
    distance = (below_i + below_j).astype(np.int8)
    table = np.full((MAX_LEVEL, MAX_LEVEL), UNRELATED, dtype=np.int8)
    for (shallow, deep), relation_id in RELATION_BY_DEPTHS.items():
        table[shallow, deep] = table[deep, shallow] = relation_id
    relation = np.where(common == 0, UNRELATED, table[below_i, below_j]).astype(np.int8)
    return distance, relation


@dataclass(frozen=True)
class Taxonomy:
    """The built data, in memory. Arrays follow the row order of ``codes``."""

    codes: list[str]
    levels: np.ndarray  # (N,) int8, 2..6
    parents: np.ndarray  # (N,) int32 row of the parent, -1 for sectors
    titles: list[str]
    descriptions: list[str]
    examples: list[list[str]]
    excluded: list[list[str]]
    excluded_codes: list[list[str]]
    distance: np.ndarray  # (N, N) int8
    relation: np.ndarray  # (N, N) int8

    @property
    def size(self) -> int:
        return len(self.codes)

    @cached_property
    def positions(self) -> dict[str, int]:
        """Row of each code."""
        return {code: i for i, code in enumerate(self.codes)}

    def excluded_matrix(self) -> np.ndarray:
        """(N, N) bool: ``[i, j]`` is True when code i's cross-references send activity to j."""
        positions = self.positions
        matrix = np.zeros((self.size, self.size), dtype=bool)
        for i, targets in enumerate(self.excluded_codes):
            matrix[i, [positions[code] for code in targets]] = True
        return matrix


def submatrix(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(R, R)`` copy of the square ``(N, N)`` ``matrix`` (tree distances, relations) among
    ``rows`` ``(R,)``: ``matrix[np.ix_(rows, rows)]``, made faster.

    Taken rows first, then columns: numpy's ``np.ix_`` gather of the same block took 3-4 times as
    long (24 ms for all 2,125 codes on a 2-core CPU, a tenth of the quick start's step, whose
    every batch holds every code). All rows in order are copied whole (0.4 ms).
    """
    if np.array_equal(rows, np.arange(len(matrix))):
        return matrix.copy()
    return matrix[rows][:, rows]


def load_taxonomy(data_dir: str | Path) -> Taxonomy:
    """Read what ``data build`` wrote to ``data_dir``."""
    data_dir = Path(data_dir)
    table = pq.read_table(data_dir / CODES_FILE).to_pydict()
    codes = table["code"]
    positions = {code: i for i, code in enumerate(codes)}
    return Taxonomy(
        codes=codes,
        levels=np.asarray(table["level"], dtype=np.int8),
        parents=np.asarray([positions.get(p, -1) for p in table["parent"]], dtype=np.int32),
        titles=table["title"],
        descriptions=table["description"],
        examples=table["examples"],
        excluded=table["excluded"],
        excluded_codes=table["excluded_codes"],
        distance=np.load(data_dir / DISTANCE_MATRIX_FILE),
        relation=np.load(data_dir / RELATION_MATRIX_FILE),
    )


def codes_table(rows: list[dict[str, object]]) -> pa.Table:
    """The ``naics_codes.parquet`` schema (documented in docs/data.md)."""
    schema = pa.schema(
        [
            ("code", pa.string()),
            ("display_code", pa.string()),
            ("level", pa.int8()),
            ("parent", pa.string()),
            ("title", pa.string()),
            ("description", pa.string()),
            ("examples", pa.list_(pa.string())),
            ("excluded", pa.list_(pa.string())),
            ("excluded_codes", pa.list_(pa.string())),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)
