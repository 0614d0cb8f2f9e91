"""A search request and its answer, apart from the model: what ``search`` and the served model
check before any model work, the table of matches they give back, and ``evaluate``'s file of
unseen queries. Light to import, so that a bad request is refused in a moment."""

from __future__ import annotations

import csv
import functools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from naics_mlflow.data.census import RANGE_SECTORS
from naics_mlflow.data.taxonomy import MAX_LEVEL, MIN_LEVEL, sector_of
from naics_mlflow.errors import UserError, first_line
from naics_mlflow.files import check_output, write_output

MAX_TOP_K = 100
# One row per match, as `search --out` writes and the served model answers.
MATCH_COLUMNS = ("text", "rank", "code", "title", "level", "distance", "score", "margin")
# What separates a CSV's fields: commas, or the semicolons or tabs that spreadsheet programs save
# "CSV" with in locales whose decimal mark is a comma.
CSV_SEPARATORS = (",", ";", "\t")


def _write_sheet(table: pd.DataFrame, path: Path) -> None:
    """``table`` as the first sheet of an Excel workbook at ``path``, through a file object:
    pandas checks a path's suffix, and ``--out`` is written under a temporary name
    (:func:`naics_mlflow.files.written_whole`)."""
    with path.open("wb") as file:
        table.to_excel(file, index=False, engine="openpyxl")


# `search --out` by the file's suffix.
MATCH_FILE_WRITERS = {
    ".csv": lambda table, path: table.to_csv(path, index=False),
    ".tsv": lambda table, path: table.to_csv(path, index=False, sep="\t"),
    ".parquet": lambda table, path: table.to_parquet(path, index=False),
    ".xlsx": _write_sheet,
}
# The rows of an Excel sheet below its header row.
SHEET_ROWS = 1_048_575
# A query that is nothing but digits, as many as a code has.
CODE_ALONE = re.compile(r"\d{2,6}")
# A code after words that say it is one: "NAICS 441120", "naics code: 4411", "Code #31-33".
CODE_NAMED = re.compile(r"(?:naics(?:\s*2022)?(?:\s*code)?|code)\s*[:#]?\s*(\S+)", re.IGNORECASE)


class QueryError(UserError):
    """A search request that cannot be answered as asked."""


def code_written_as(text: str) -> str | None:
    """The code that ``text`` is, where it holds nothing but one as people write them:
    ``441120``, and a range sector by its range or any of its prefixes (``31-33``, ``32`` ->
    ``31``), alone or after "NAICS" or "code" (``NAICS 441120``); None for any other text.
    Whether the taxonomy has the code is the caller's question.
    """
    written = text.strip()
    if named := CODE_NAMED.fullmatch(written):
        written = named.group(1)
    if CODE_ALONE.fullmatch(written):
        return sector_of(written) if len(written) == MIN_LEVEL else written
    return RANGE_SECTORS.get(written)


@dataclass(frozen=True)
class Match:
    code: str
    title: str
    level: int
    distance: float  # Lorentz distance from the query
    score: float  # what the ranking sorts by, higher first
    # How far the score stands above the next-ranked code's (NaN for a level's last code): the
    # first match's margin says how sure the ranking is (docs/using.md has dev's figures).
    margin: float


def check_request(texts: list[str], top_k: int, level: int | None) -> None:
    """Reject empty texts and out-of-range ``top_k`` / ``level`` before any model work."""
    for position, text in enumerate(texts):
        missing = pd.api.types.is_scalar(text) and bool(pd.isna(text))  # None, NaN, pd.NA
        if not (isinstance(text, str) or missing):
            # A served request's JSON can hold a number or a list where a text belongs.
            raise QueryError(
                f"query {position + 1} is {text!r}, not text; give a business description as a "
                "string"
            )
        if missing or not text.strip():
            raise QueryError(f"query {position + 1} is empty; give a business description")
    if not 1 <= top_k <= MAX_TOP_K:
        raise QueryError(
            f"--top (top_k of a served request) must be between 1 and {MAX_TOP_K}, got {top_k}"
        )
    if level is not None and not MIN_LEVEL <= level <= MAX_LEVEL:
        raise QueryError(f"level must be between {MIN_LEVEL} and {MAX_LEVEL}, got {level}")


def matches_table(texts: list[str], found: list[list[Match]]) -> pd.DataFrame:
    """One row per match (:data:`MATCH_COLUMNS`), each text's matches in rank order."""
    return pd.DataFrame(
        [
            (
                text,
                rank,
                match.code,
                match.title,
                match.level,
                match.distance,
                match.score,
                match.margin,
            )
            for text, matches in zip(texts, found, strict=True)
            for rank, match in enumerate(matches, start=1)
        ],
        columns=list(MATCH_COLUMNS),
    )


def check_matches_file(out: Path, input_path: Path | None) -> None:
    """Refuse an ``--out`` that could not be written as asked, or would overwrite the input."""
    if out.suffix.lower() not in MATCH_FILE_WRITERS:
        raise QueryError(f"--out must end in .csv, .tsv, .parquet or .xlsx, got {out.name}")
    if input_path is not None and out.resolve() == input_path.resolve():
        raise QueryError(f"--out {out} is the --input file; write the matches to another file")
    check_output(out)


def check_matches_fit(out: Path, texts: int, top_k: int) -> None:
    """Refuse an ``.xlsx`` ``--out`` whose ``texts`` times ``top_k`` rows an Excel sheet cannot
    hold, before any model work."""
    rows = texts * top_k
    if out.suffix.lower() == ".xlsx" and rows > SHEET_ROWS:
        raise QueryError(
            f"--out {out.name}: {texts:,} texts with --top {top_k} make up to {rows:,} rows, more "
            f"than an Excel sheet holds ({SHEET_ROWS:,}); write .csv, .tsv or .parquet, or lower "
            "--top"
        )


def write_matches(out: Path, queries: pd.DataFrame, found: list[list[Match]]) -> int:
    """Write :func:`matches_table` of ``queries["text"]`` to ``out`` whole or not at all, each
    text's other input columns leading its rows; returns how many rows it wrote."""
    owners = np.repeat(np.arange(len(queries)), [len(matches) for matches in found])
    leading = queries.drop(columns="text").iloc[owners].reset_index(drop=True)
    table = pd.concat([leading, matches_table(queries["text"].tolist(), found)], axis=1)
    write_output(out, functools.partial(MATCH_FILE_WRITERS[out.suffix.lower()], table))
    return len(table)


def csv_separator(header: str) -> str:
    """The one of :data:`CSV_SEPARATORS` that splits a CSV's ``header`` line into the most
    column names (quotes respected), a comma where none splits it."""
    fields = {sep: len(next(csv.reader([header], delimiter=sep), [])) for sep in CSV_SEPARATORS}
    return max(CSV_SEPARATORS, key=lambda sep: fields[sep])


def read_text_csv(path: Path) -> pd.DataFrame:
    """An existing CSV file's rows, every column as strings (an id such as ``007`` keeps its
    zeros, an empty cell is ``""``), its fields separated as its header line shows
    (:func:`csv_separator`); a file that is not UTF-8 or not a CSV ends in one line."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            separator = csv_separator(file.readline())
        return pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QueryError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 "
            "(in Excel: CSV UTF-8)"
        ) from exc
    except OSError as exc:
        raise QueryError(f"{path} cannot be read ({exc.strerror})") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise QueryError(f"{path} is not a CSV that can be read: {first_line(exc)}") from exc


def read_text_sheet(path: Path) -> pd.DataFrame:
    """The rows of an existing Excel workbook's first sheet, its first row naming the columns,
    every cell as a string (an empty one ``""``); a file that is not a workbook ends in one
    line."""
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        return pd.read_excel(
            path, sheet_name=0, engine="openpyxl", dtype=str, keep_default_na=False
        )
    except OSError as exc:
        raise QueryError(f"{path} cannot be read ({exc.strerror})") from exc
    # A file that is not a zip archive, or a zip archive without a workbook's parts.
    except (zipfile.BadZipFile, InvalidFileException, KeyError) as exc:
        raise QueryError(
            f"{path} is not an Excel workbook that can be read; save it as .xlsx or as CSV"
        ) from exc


def read_query_file(path: Path) -> pd.DataFrame:
    """The rows of a file with a ``text`` column of business descriptions: the first sheet of an
    Excel workbook (``.xlsx``, ``.xlsm``) or else a CSV, every column as strings (an id such as
    ``007`` keeps its zeros); its other columns will lead each match row, so none may share a
    name with :data:`MATCH_COLUMNS`.

    An empty text is named by its row as the file's reader counts it: Excel's row number in a
    workbook (the header is row 1), the row below the header in a CSV.
    """
    if not path.is_file():
        raise QueryError(
            f"{path} not found; give the path of a CSV or an .xlsx workbook with a `text` column"
        )
    suffix = path.suffix.lower()
    if suffix == ".xls":
        raise QueryError(
            f"{path} is in Excel's format of before 2007, which is not read; save it as .xlsx "
            "or as CSV"
        )
    workbook = suffix in (".xlsx", ".xlsm")
    table = read_text_sheet(path) if workbook else read_text_csv(path)
    if "text" not in table.columns:
        raise QueryError(
            f"{path} has no `text` column (its columns: "
            f"{', '.join(map(str, table.columns)) or 'none'}); "
            "name the column of business descriptions `text`"
        )
    clashing = [name for name in table.columns if name != "text" and name in MATCH_COLUMNS]
    if clashing:
        raise QueryError(
            f"{path} has the column(s) {', '.join(clashing)}, which each match row also has; "
            f"rename them (a match row adds {', '.join(MATCH_COLUMNS)})"
        )
    if table.empty:
        raise QueryError(f"{path} holds no rows; give one business description per row")
    for row, text in enumerate(table["text"], start=2 if workbook else 1):
        if not text.strip():
            raise QueryError(f"{path} row {row} has an empty text; give a business description")
    return table


@dataclass(frozen=True)
class UnseenQueries:
    """``evaluate``'s unseen queries (by default the NAICS 2017 phrasings): one code and one
    text per row of ``path``."""

    path: Path
    codes: list[str]
    texts: list[str]


def read_unseen_queries(path: Path) -> UnseenQueries:
    """The unseen queries' file (columns code,text) that ``evaluate`` reads first, so that a
    wrong file ends it at once, in one line (its codes are checked against the taxonomy later)."""
    if not path.is_file():
        raise QueryError(
            f"evaluation queries {path} not found; pass --unseen-queries PATH or set "
            "evaluation.unseen_queries"
        )
    table = read_text_csv(path)
    if not {"code", "text"} <= set(table.columns):
        raise QueryError(f"{path} must have the columns code,text")
    if table.empty:
        raise QueryError(f"{path} holds no rows; give one code,text row per query")
    for line, text in enumerate(table["text"], start=2):
        if not text.strip():
            raise QueryError(f"{path} line {line} has an empty text; give each code a phrasing")
    return UnseenQueries(path, [code.strip() for code in table["code"]], list(table["text"]))
