"""The four Census NAICS 2022 workbooks: find or download them, and read them as validated rows.

Each reader returns plain Python rows with codes as text. Every structural problem (unreadable
workbook, wrong sheet, missing column, malformed code) raises :class:`DataError` naming the file,
the row and the reason, before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openpyxl
import requests
from openpyxl.utils.exceptions import InvalidFileException
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError
from urllib3.util import Retry

from naics_mlflow.config import read_yaml
from naics_mlflow.errors import UserError
from naics_mlflow.files import written_whole

logger = logging.getLogger(__name__)

RAW_DIR_ENV = "NAICS_RAW_DIR"

# The three sectors published as ranges; codes below them start with any prefix of the range.
RANGE_SECTORS = {"31-33": "31", "44-45": "44", "48-49": "48"}
SECTOR_OF_PREFIX = {"32": "31", "33": "31", "45": "44", "49": "48"}
INDEX_POINTER_CODE = "******"

_CODE_PATTERN = re.compile(r"^\d{2,6}$")
# Answers of a busy or briefly failing server, worth asking again; a 404 is not.
RETRY_STATUSES = (429, 500, 502, 503, 504)
DOWNLOAD_CHUNK_BYTES = 1 << 20


class DataError(UserError):
    """A Census file that is missing, unreadable or not shaped as the 2022 release."""


@dataclass(frozen=True)
class CensusFile:
    """Where one workbook's data lives: its file name, sheet and the header columns we read."""

    role: str
    name: str
    sheet: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class CensusRelease:
    """The four workbooks by role, and where to fetch a missing one (``conf/data.yaml``)."""

    base_url: str
    files: dict[str, CensusFile]
    timeout_seconds: float
    retries: int
    backoff_factor: float


_LAYOUT = {
    "codes": ("tbl_2022_title_description_coun", ("2022 NAICS US   Code", "2022 NAICS US Title")),
    "descriptions": ("2022_NAICS_Descriptions", ("Code", "Title", "Description")),
    "index": ("2022NAICS", ("NAICS22", "INDEX ITEM DESCRIPTION")),
    "cross_references": ("2022_NAICS_Cross_References", ("Code", "Cross-Reference")),
}


def load_release(data_conf_path: str | Path = "conf/data.yaml") -> CensusRelease:
    conf = read_yaml(data_conf_path)

    def setting(*keys: str) -> Any:
        value = conf
        for depth, key in enumerate(keys):
            if not isinstance(value, dict) or key not in value:
                dotted = ".".join(keys[: depth + 1])
                raise DataError(
                    f"{data_conf_path}: key '{dotted}' is missing; add it "
                    "(the project's conf/data.yaml lists every key)"
                )
            value = value[key]
        return value

    files = {
        role: CensusFile(role, setting("files", role), sheet, columns)
        for role, (sheet, columns) in _LAYOUT.items()
    }
    return CensusRelease(
        base_url=setting("base_url"),
        files=files,
        timeout_seconds=float(setting("download", "timeout_seconds")),
        retries=int(setting("download", "retries")),
        backoff_factor=float(setting("download", "backoff_factor")),
    )


def resolve_raw_dir(cli_value: str | None, config_default: str) -> Path:
    """``--raw-dir``, else ``$NAICS_RAW_DIR``, else the configured default (``data/raw``)."""
    return Path(cli_value or os.environ.get(RAW_DIR_ENV) or config_default)


def ensure_raw_files(raw_dir: Path, release: CensusRelease) -> dict[str, Path]:
    """Paths of the four workbooks by role, downloading any that is missing from ``raw_dir``."""
    if raw_dir.exists() and not raw_dir.is_dir():
        raise DataError(
            f"the Census folder {raw_dir} is a file; point --raw-dir (or NAICS_RAW_DIR) at the "
            "folder that holds the four NAICS 2022 workbooks, or is to hold them"
        )
    paths = {}
    with (
        _retrying_session(release.retries, release.backoff_factor) as session,
        _retries_unannounced(),
    ):
        for role, census_file in release.files.items():
            path = raw_dir / census_file.name
            if not path.is_file():
                url = release.base_url + urllib.parse.quote(census_file.name)
                logger.info("downloading %s from %s", census_file.name, url)
                _download(session, url, path, release.timeout_seconds)
            paths[role] = path
    return paths


@contextlib.contextmanager
def _retries_unannounced() -> Iterator[None]:
    """Without urllib3's warning at each retry, which repeats the whole connection error: a
    download that fails for good ends in one line saying why (:func:`_download`)."""
    pool_logger = logging.getLogger("urllib3.connectionpool")
    level = pool_logger.level
    pool_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pool_logger.setLevel(level)


def _retrying_session(retries: int, backoff_factor: float) -> requests.Session:
    """A session that asks again after a refused connection, a timeout or a busy answer.

    urllib3 waits ``backoff_factor * 2 ** (n - 1)`` seconds before the n-th retry (none before
    the first), or what a ``Retry-After`` header asks.
    """
    retry = Retry(
        total=retries,
        backoff_factor=backoff_factor,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _download(session: requests.Session, url: str, target: Path, timeout_seconds: float) -> None:
    """Fetch ``url`` to ``target`` through a temporary file, so a broken transfer leaves nothing."""
    try:
        with (
            written_whole(target) as partial,
            session.get(url, timeout=timeout_seconds, stream=True) as response,
        ):
            response.raise_for_status()
            with partial.open("wb") as file:
                for chunk in response.iter_content(DOWNLOAD_CHUNK_BYTES):
                    file.write(chunk)
    except (requests.RequestException, OSError) as exc:
        raise DataError(
            f"{target.name} is missing from {target.parent} and could not be downloaded from "
            f"{url} ({_why_not_downloaded(exc)}); copy it there, or point --raw-dir (or "
            f"{RAW_DIR_ENV}) at a folder that has the four NAICS 2022 workbooks"
        ) from exc


def _why_not_downloaded(error: BaseException) -> str:
    """The cause of a failed download, without the wrapping that repeats the URL: requests holds
    urllib3's "Max retries exceeded with url ..." whose reason names the connection first."""
    if error.args and isinstance(error.args[0], MaxRetryError):
        error = error.args[0].reason or error
    connection = getattr(error, "conn", None)
    return str(error).removeprefix(f"{connection}: ") if connection is not None else str(error)


def _open_sheet(path: Path, census_file: CensusFile) -> Iterator[tuple[Any, ...]]:
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, InvalidFileException, KeyError, OSError, ValueError) as exc:
        raise DataError(
            f"{path}: not a readable xlsx workbook ({exc or type(exc).__name__}); "
            f"replace it with the Census file {census_file.name}"
        ) from exc
    if census_file.sheet not in workbook.sheetnames:
        raise DataError(
            f"{path}: no sheet '{census_file.sheet}' (found {', '.join(workbook.sheetnames)}); "
            f"is this the Census file {census_file.name}?"
        )
    try:
        yield from workbook[census_file.sheet].iter_rows(values_only=True)
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise DataError(f"{path}: the workbook is truncated or corrupt ({exc})") from exc
    finally:
        workbook.close()


def read_rows(path: Path, census_file: CensusFile) -> list[tuple[int, dict[str, Any]]]:
    """``(spreadsheet row number, {column: value})`` for each non-blank data row."""
    rows = _open_sheet(path, census_file)
    header = [str(cell).strip() if cell is not None else "" for cell in next(rows, ())]
    # Header cells are matched with inner whitespace normalised: the codes file has three spaces.
    normalised = {" ".join(name.split()): i for i, name in enumerate(header)}
    positions = {}
    for column in census_file.columns:
        position = normalised.get(" ".join(column.split()))
        if position is None:
            raise DataError(
                f"{path}: sheet '{census_file.sheet}' has no column '{column}' "
                f"(header row: {', '.join(h for h in header if h)})"
            )
        positions[column] = position
    records = []
    for row_number, row in enumerate(rows, start=2):
        if row is None or all(cell is None or str(cell).strip() == "" for cell in row):
            continue
        values = {column: row[i] if i < len(row) else None for column, i in positions.items()}
        records.append((row_number, values))
    return records


def parse_code(value: Any, path: Path, row_number: int) -> str:
    """A code as text: ``111110``; range sectors (``31-33``) become their first prefix (``31``)."""
    text = str(value).strip() if value is not None else ""
    if text in RANGE_SECTORS:
        return RANGE_SECTORS[text]
    if not _CODE_PATTERN.match(text):
        raise DataError(
            f"{path} row {row_number}: code {text or '(empty)'!r} is not a 2-6 digit NAICS code "
            "or a range sector such as 31-33"
        )
    return text


def parse_text(value: Any, path: Path, row_number: int, column: str) -> str:
    """A cell as stripped text; a missing required text is an error."""
    if value is None or str(value).strip() == "":
        raise DataError(f"{path} row {row_number}: column '{column}' is empty")
    return str(value).strip()
