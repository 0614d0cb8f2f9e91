"""The data build on the real Census files: counts, cleaning, split, tree matrices, errors."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.server
import json
import logging
import math
import shutil
import socket
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import openpyxl
import pyarrow.parquet as pq
import pytest
import yaml

from naics_mlflow.data.build import (
    MANIFEST_FILE,
    MAX_INHERITED_EXAMPLES,
    OUTPUT_FILES,
    build_data,
    data_digest,
    warn_if_built_by_other_code,
)
from naics_mlflow.data.census import DataError, ensure_raw_files, load_release
from naics_mlflow.data.taxonomy import (
    DEV_FILE,
    DISTANCES_FILE,
    HOLDOUT_FILE,
    RELATIONS_FILE,
    cross_reference_parts,
    cross_referenced_activities,
    index_split,
    submatrix,
)
from tests.commands import file_size_limited, run_cli
from tests.conftest import REPO_ROOT


def test_level_counts(taxonomy):
    assert taxonomy.size == 2125
    assert collections.Counter(taxonomy.levels.tolist()) == {2: 20, 3: 96, 4: 308, 5: 689, 6: 1012}


def test_range_sectors_and_parents(data_dir, taxonomy):
    rows = {r["code"]: r for r in pq.read_table(data_dir / "naics_codes.parquet").to_pylist()}
    assert rows["31"]["display_code"] == "31-33"
    assert rows["44"]["display_code"] == "44-45"
    assert rows["541511"]["display_code"] == "541511"
    assert rows["31"]["parent"] is None
    assert rows["321"]["parent"] == "31"
    assert rows["493"]["parent"] == "48"
    assert rows["541511"]["parent"] == "54151"
    assert "32" not in taxonomy.positions


def test_titles_lose_the_trilateral_marker(taxonomy):
    assert taxonomy.titles[taxonomy.positions["111110"]] == "Soybean Farming"
    assert taxonomy.titles[taxonomy.positions["31"]] == "Manufacturing"
    assert all(t == t.strip() and t for t in taxonomy.titles)


def test_descriptions_are_cleaned_and_filled(taxonomy):
    descriptions = dict(zip(taxonomy.codes, taxonomy.descriptions, strict=True))
    assert all(descriptions.values())
    assert not any("Cross-References" in d for d in descriptions.values())
    assert not any(d.startswith("See industry description") for d in descriptions.values())
    assert descriptions["541511"].startswith("This U.S. industry comprises establishments")
    # 1111 (Oilseed and Grain Farming) has a description of its own in the file.
    assert descriptions["1111"].startswith("This industry group comprises")
    # 11111 pointed at 111110's text.
    assert descriptions["11111"] == descriptions["111110"]


def test_empty_four_digit_descriptions_come_from_only_child_or_title(taxonomy):
    positions = taxonomy.positions
    children = collections.defaultdict(list)
    for i, parent in enumerate(taxonomy.parents):
        if parent >= 0:
            children[int(parent)].append(i)
    # 1133 (Logging) has the single child 11331 in the 2022 release and no text of its own.
    logging = positions["1133"]
    assert children[logging] == [positions["11331"]]
    assert taxonomy.descriptions[logging] == taxonomy.descriptions[positions["11331"]]


def test_excluded_codes_of_541511(taxonomy):
    i = taxonomy.positions["541511"]
    assert taxonomy.excluded_codes[i] == ["513210", "518210", "541512"]
    assert len(taxonomy.excluded[i]) == 3
    assert taxonomy.excluded_matrix()[i, taxonomy.positions["541512"]]


def test_a_cross_reference_splits_into_its_activity_and_where_it_goes():
    assert cross_reference_parts(
        "Growing wheat--are classified in Industry 11114, Wheat Farming;"
    ) == ("Growing wheat", " in Industry 11114, Wheat Farming;")
    assert cross_reference_parts(
        "Establishments primarily engaged in X are included in Industry 1, Y."
    ) == ("Establishments primarily engaged in X", " in Industry 1, Y.")
    assert cross_reference_parts("Growing wheat, see Wheat Farming.") is None
    # The Census's typo in 423720's cross-reference.
    assert cross_reference_parts("Wholesaling X--are lclassified in Industry 423730, Y; and") == (
        "Wholesaling X",
        " in Industry 423730, Y; and",
    )


def test_cross_references_credit_the_one_national_industry_they_name():
    codes = ["11", "111", "1111", "11111", "111110", "11112", "111120", "111121"]
    cross_references = {
        "111110": [
            "Growing peas--are classified in Industry 11112, Pea Farming;",  # two under 11112
            "Growing oats--are classified in Industry 11111, Oat Farming.",  # itself
        ],
        "111120": [
            "Growing rye--are classified in Industry 11111, Rye Farming; and",  # one under 11111
            "Growing rye--are classified in U.S. Industry 111110, Rye Farming.",  # credited once
            "Farming--are classified in Sector 11, Agriculture.",  # a group
        ],
        "111121": ["Growing hops--are classified in U.S. Industries 111110 or 111120."],  # both
    }
    assert cross_referenced_activities(codes, cross_references) == {
        "111110": ["Growing rye", "Growing hops"],
        "111120": ["Growing hops"],
    }


def test_a_national_industrys_examples_end_with_the_activities_cross_references_send_it(
    taxonomy, data_dir
):
    dev = set(pq.read_table(data_dir / DEV_FILE).column("text").to_pylist())
    # 11119 sends "Growing wheat" to Industry 11114, whose one national industry is 111140.
    wheat = taxonomy.examples[taxonomy.positions["111140"]]
    assert wheat[-1] == "Growing wheat" and not dev & set(wheat)
    # 488111 sends military air traffic control to 928110, National Security.
    security = taxonomy.examples[taxonomy.positions["928110"]]
    assert any("military air traffic control" in example for example in security)
    # 926130 sends "Operating utilities" to Subsector 221, which holds many: none is credited.
    assert all("Operating utilities" not in examples for examples in taxonomy.examples)
    # Codes at levels 2-5 sample their descendants' training index items only.
    sector = taxonomy.examples[taxonomy.positions["11"]]
    assert "Growing wheat" not in sector and len(sector) == 64


def test_index_split_rule():
    """The last decimal digit of SHA-1(code|text): 0 held out, 1 dev, anything else training."""
    for code, text in [("111110", "Soybean farming"), ("541511", "Software programming")]:
        digit = int(hashlib.sha1(f"{code}|{text}".encode()).hexdigest(), 16) % 10
        assert index_split(code, text) == {0: "holdout", 1: "dev"}.get(digit, "train")
    splits = collections.Counter(index_split("111110", f"item {i}") for i in range(10_000))
    assert splits["holdout"] == pytest.approx(1000, abs=100)
    assert splits["dev"] == pytest.approx(1000, abs=100)


def test_dev_and_held_out_items_never_enter_code_texts(data_dir, taxonomy):
    held_out = pq.read_table(data_dir / HOLDOUT_FILE).to_pylist()
    dev = pq.read_table(data_dir / DEV_FILE).to_pylist()
    assert (len(held_out), len(dev)) == (1951, 2075)
    training_texts = {text for examples in taxonomy.examples for text in examples}
    for rows, split in ((held_out, "holdout"), (dev, "dev")):
        assert all(index_split(row["code"], row["text"]) == split for row in rows)
        texts = {row["text"] for row in rows}
        assert not texts & (training_texts | set(taxonomy.descriptions))
    # Two index rows of the Census file are their own code's title, word for word.
    assert {row["text"] for row in dev} & set(taxonomy.titles) == {"Sawmills", "Marinas"}
    counts = json.loads((data_dir / MANIFEST_FILE).read_text())["counts"]
    assert counts["n_training_examples"] + len(dev) + len(held_out) == 20373
    six_digit_examples = sum(
        len(e) for e, level in zip(taxonomy.examples, taxonomy.levels, strict=True) if level == 6
    )
    assert (
        six_digit_examples
        == counts["n_training_examples"] + counts["n_cross_referenced_activities"]
    )
    # An activity that repeats its code's own training item is not added a second time.
    assert all(
        len(set(e)) == len(e)
        for e, level in zip(taxonomy.examples, taxonomy.levels, strict=True)
        if level == 6
    )


def test_upper_levels_sample_their_descendants_examples(taxonomy):
    def descendants_items(prefix: str) -> list[str]:
        return [
            text
            for code, ex in zip(taxonomy.codes, taxonomy.examples, strict=True)
            for text in ex
            if code.startswith(prefix) and len(code) == 6
        ]

    # 54192 (Photographic Services) has fewer items than the cap: all of them, in code order. No
    # cross-reference sends an activity to its two national industries, so all are index items.
    assert taxonomy.examples[taxonomy.positions["54192"]] == descendants_items("54192")
    sector = taxonomy.examples[taxonomy.positions["11"]]
    everything = descendants_items("11")
    assert len(sector) == MAX_INHERITED_EXAMPLES < len(everything)
    assert set(sector) < set(everything)
    assert sector == sorted(sector, key=everything.index)  # kept in code order
    assert len({text[:4] for text in sector}) > 20  # drawn from across the sector


@pytest.mark.parametrize(
    ("a", "b", "distance", "relation"),
    [
        ("541511", "541512", 2, 2),
        ("111110", "541511", 10, 15),
        ("54", "541511", 4, 6),
        ("5415", "54151", 1, 1),
        ("541511", "541511", 0, 0),
        ("5416", "54151", 3, 5),
        ("541511", "5416", 4, 8),
        ("541511", "5617", 8, 15),
        ("541511", "54", 4, 6),
        ("54151", "54161", 4, 7),
        ("541511", "541611", 6, 11),
        ("31", "325110", 4, 6),
        ("311111", "331110", 8, 14),
    ],
)
def test_tree_distance_and_relation(taxonomy, a, b, distance, relation):
    i, j = taxonomy.positions[a], taxonomy.positions[b]
    assert taxonomy.distance[i, j] == taxonomy.distance[j, i] == distance
    assert taxonomy.relation[i, j] == taxonomy.relation[j, i] == relation


@pytest.mark.parametrize("rows", ["all in order", "all shuffled", "some", "some shuffled"])
def test_a_submatrix_is_the_block_among_its_rows_and_a_copy(taxonomy, rows):
    rng = np.random.default_rng(0)
    chosen = {
        "all in order": np.arange(taxonomy.size),
        "all shuffled": rng.permutation(taxonomy.size),
        "some": np.sort(rng.choice(taxonomy.size, 700, replace=False)),
        "some shuffled": rng.choice(taxonomy.size, 700, replace=False),
    }[rows]
    matrix = taxonomy.distance.copy()
    block = submatrix(matrix, chosen)
    assert np.array_equal(block, taxonomy.distance[np.ix_(chosen, chosen)])
    block += 1  # a batch's matrix that is written to leaves the taxonomy's as it was
    assert np.array_equal(matrix, taxonomy.distance)


def test_matrices_are_consistent(taxonomy, data_dir):
    assert taxonomy.distance.dtype == taxonomy.relation.dtype == np.int8
    assert (np.diag(taxonomy.distance) == 0).all()
    different_sectors = taxonomy.relation == 15
    depth = taxonomy.levels.astype(int) - 1
    assert (
        taxonomy.distance[different_sectors] == (depth[:, None] + depth[None, :])[different_sectors]
    ).all()
    long_distances = pq.read_table(data_dir / DISTANCES_FILE).slice(2125 * 7, 2125)
    assert long_distances["code_i"][0].as_py() == taxonomy.codes[7]
    assert long_distances["distance"].to_numpy().tolist() == taxonomy.distance[7].tolist()
    long_relations = pq.read_table(data_dir / RELATIONS_FILE).slice(2125 * 9, 2125)
    assert long_relations["relation_id"].to_numpy().tolist() == taxonomy.relation[9].tolist()


def test_a_build_made_by_other_code_is_named_with_the_command_that_rebuilds_it(
    data_dir, tmp_path, caplog
):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    with caplog.at_level(logging.WARNING, logger="naics_mlflow.data.build"):
        warn_if_built_by_other_code(copy)
    assert not caplog.records  # built by this code: nothing to say
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    del manifest["code_digest"]  # as an earlier version wrote it
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="naics_mlflow.data.build"):
        warn_if_built_by_other_code(copy)
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{copy} was built by another version of naics-embedder; run `naics-embedder data "
        "build` to rebuild it from the Census files"
    )


def test_the_data_digest_is_of_the_content_not_of_the_files_bytes(
    data_dir, raw_dir, tmp_path, release, monkeypatch
):
    """Another pyarrow writes other bytes (its version is in every parquet file's footer): the
    same data built there has the same digest, so a chain continued there is the same chain."""
    import naics_mlflow.data.build as build

    write_table = pq.write_table

    def write_as_another_pyarrow(table, where):
        write_table(table, where, compression="gzip")

    monkeypatch.setattr(build.pq, "write_table", write_as_another_pyarrow)
    build_data(raw_dir, tmp_path / "elsewhere", release)
    codes = "naics_codes.parquet"
    assert (tmp_path / "elsewhere" / codes).read_bytes() != (data_dir / codes).read_bytes()
    assert data_digest(tmp_path / "elsewhere") == data_digest(data_dir)


def test_unchanged_rebuild_does_nothing_unless_forced(data_dir, raw_dir, release):
    before = (data_dir / "naics_codes.parquet").stat().st_mtime_ns
    assert not build_data(raw_dir, data_dir, release).rebuilt
    assert (data_dir / "naics_codes.parquet").stat().st_mtime_ns == before
    assert build_data(raw_dir, data_dir, release, force=True).rebuilt


# --- malformed inputs ------------------------------------------------------------------------


@pytest.fixture()
def raw_copy(tmp_path: Path, raw_dir: Path) -> Path:
    copy = tmp_path / "raw"
    shutil.copytree(raw_dir, copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    return copy


def _assert_build_fails_cleanly(raw: Path, out: Path, release, *fragments: str) -> None:
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("user data")
    with pytest.raises(DataError) as caught:
        build_data(raw, out, release)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def _rewrite_sheet(path: Path, edit) -> None:
    workbook = openpyxl.load_workbook(path)
    edit(workbook)
    workbook.save(path)


def test_corrupt_workbook(raw_copy, tmp_path, release):
    target = raw_copy / "2022_NAICS_Index_File.xlsx"
    target.write_bytes(b"this is not a zip file")
    _assert_build_fails_cleanly(
        raw_copy, tmp_path / "out", release, str(target), "not a readable xlsx"
    )


def test_truncated_workbook(raw_copy, tmp_path, release):
    target = raw_copy / "2022_NAICS_Cross_References.xlsx"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    _assert_build_fails_cleanly(raw_copy, tmp_path / "out", release, str(target))


def test_missing_column(raw_copy, tmp_path, release):
    target = raw_copy / "2022_NAICS_Descriptions.xlsx"
    _rewrite_sheet(target, lambda wb: wb.active.cell(row=1, column=3, value="Text"))
    _assert_build_fails_cleanly(
        raw_copy, tmp_path / "out", release, str(target), "no column 'Description'"
    )


def test_wrong_sheet(raw_copy, tmp_path, release):
    target = raw_copy / "2022_NAICS_Cross_References.xlsx"

    def rename(wb):
        wb.active.title = "Sheet1"

    _rewrite_sheet(target, rename)
    _assert_build_fails_cleanly(
        raw_copy, tmp_path / "out", release, "no sheet '2022_NAICS_Cross_References'", "Sheet1"
    )


@pytest.mark.parametrize("bad_code", ["1234567", "5", "54-AB", "abc"])
def test_malformed_code_names_file_and_row(raw_copy, tmp_path, release, bad_code):
    target = raw_copy / "2022_NAICS_Index_File.xlsx"
    _rewrite_sheet(target, lambda wb: wb.active.cell(row=5, column=1, value=bad_code))
    _assert_build_fails_cleanly(
        raw_copy, tmp_path / "out", release, str(target), "row 5", repr(bad_code)
    )


def test_duplicate_code(raw_copy, tmp_path, release):
    target = raw_copy / "2-6 digit_2022_Codes.xlsx"
    _rewrite_sheet(target, lambda wb: wb.active.cell(row=5, column=2, value=111))
    _assert_build_fails_cleanly(raw_copy, tmp_path / "out", release, "row 5", "appears twice")


def test_failed_rebuild_keeps_previous_outputs(raw_copy, tmp_path, release):
    out = tmp_path / "out"
    build_data(raw_copy, out, release)
    before = {name: (out / name).read_bytes() for name in (*OUTPUT_FILES, MANIFEST_FILE)}
    (raw_copy / "2022_NAICS_Index_File.xlsx").write_bytes(b"garbage")
    with pytest.raises(DataError):
        build_data(raw_copy, out, release)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob(".build-*"))


def test_a_file_where_a_folder_belongs_fails_in_one_line(raw_dir, tmp_path, release):
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    with pytest.raises(DataError) as unwritable:
        build_data(raw_dir, blocker / "data", release)
    # As the Census folder: otherwise the first workbook's download fails on it, naming the site.
    with pytest.raises(DataError) as census_folder:
        build_data(blocker, tmp_path / "data", release)
    assert str(unwritable.value) == (
        f"cannot write the data build to {blocker / 'data'} (Not a directory); give --out (or "
        "dirs.data) a folder you can write"
    )
    assert str(census_folder.value) == (
        f"the Census folder {blocker} is a file; point --raw-dir (or NAICS_RAW_DIR) at the "
        "folder that holds the four NAICS 2022 workbooks, or is to hold them"
    )
    assert blocker.read_text() == "kept"
    assert not (tmp_path / "data").exists()


def test_a_disk_without_room_for_the_build_says_to_free_space(raw_dir, tmp_path, release):
    out = tmp_path / "data"
    with pytest.raises(DataError) as refused, file_size_limited(50_000):
        build_data(raw_dir, out, release)
    assert str(refused.value).startswith(f"cannot write the data build to {out} (")
    assert str(refused.value).endswith(
        "); free space on its disk, or give --out (or dirs.data) a folder on another"
    )
    assert not out.exists() or list(out.iterdir()) == []  # nothing half-written


# --- missing files: download ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_missing_file_without_network_names_it(raw_copy, tmp_path, release):
    (raw_copy / "2022_NAICS_Index_File.xlsx").unlink()
    offline = replace(release, base_url=f"http://127.0.0.1:{_free_port()}/", retries=1)
    _assert_build_fails_cleanly(
        raw_copy, tmp_path / "out", offline, "2022_NAICS_Index_File.xlsx", "--raw-dir"
    )
    assert not (raw_copy / "2022_NAICS_Index_File.xlsx").exists()


def test_the_command_without_network_ends_in_one_line_saying_why(tmp_path):
    """Retries are not announced one traceback-like warning each; the error names the cause."""
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy(REPO_ROOT / "conf" / "config.yaml", conf)
    sources = yaml.safe_load((REPO_ROOT / "conf" / "data.yaml").read_text())
    sources["base_url"] = f"http://127.0.0.1:{_free_port()}/"
    sources["download"].update(retries=2, backoff_factor=0.001)
    (conf / "data.yaml").write_text(yaml.safe_dump(sources))
    (tmp_path / "raw").mkdir()

    result = run_cli(tmp_path, "data", "build", "--raw-dir", "raw", "--out", "out")

    assert result.returncode == 2
    url = f"{sources['base_url']}2-6%20digit_2022_Codes.xlsx"
    assert result.stderr.splitlines() == [
        f"downloading 2-6 digit_2022_Codes.xlsx from {url}",
        f"error: 2-6 digit_2022_Codes.xlsx is missing from raw and could not be downloaded from "
        f"{url} (Failed to establish a new connection: [Errno 111] Connection refused); copy it "
        "there, or point --raw-dir (or NAICS_RAW_DIR) at a folder that has the four NAICS 2022 "
        "workbooks",
    ]
    assert not list((tmp_path / "raw").iterdir()) and not (tmp_path / "out").exists()


class _FlakyFileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, answering 503 to the server's first ``failures`` requests (``math.inf``:
    to every request)."""

    def __init__(self, *args, failures: float, **kwargs):
        self.failures = failures
        super().__init__(*args, **kwargs)  # answers the request

    def do_GET(self):
        self.server.requests += 1
        if self.server.requests <= self.failures:
            self.send_error(503, "busy")
        else:
            super().do_GET()

    def log_message(self, format, *args):
        pass  # no access log in the test output


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1 MiB and hangs up after 1 KiB, as a connection lost mid-transfer."""

    def do_GET(self):
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        self.wfile.write(b"x" * 1024)
        self.close_connection = True

    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def _local_server(handler):
    """An HTTP server on 127.0.0.1 answering with ``handler`` in a thread, for one test;
    ``server.requests`` counts the requests."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _census_server(directory: Path, failures: float = 0):
    return _local_server(partial(_FlakyFileHandler, directory=str(directory), failures=failures))


def _base_url(server: http.server.HTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


def test_missing_file_is_downloaded(raw_copy, raw_dir, tmp_path, release):
    served = tmp_path / "served"
    shutil.copytree(raw_dir, served)
    (raw_copy / "2-6 digit_2022_Codes.xlsx").unlink()
    with _census_server(served) as server:
        result = build_data(
            raw_copy, tmp_path / "out", replace(release, base_url=_base_url(server))
        )
    assert result.n_codes == 2125
    assert (raw_copy / "2-6 digit_2022_Codes.xlsx").read_bytes() == (
        served / "2-6 digit_2022_Codes.xlsx"
    ).read_bytes()


def _one_file_release(release, server, retries: int):
    """``release`` fetching only the codes workbook from ``server``, without waiting between
    tries (``backoff_factor`` near zero)."""
    return replace(
        release,
        base_url=_base_url(server),
        files={"codes": release.files["codes"]},
        retries=retries,
        backoff_factor=0.001,
    )


def test_a_busy_server_is_asked_again_until_it_answers(tmp_path, release):
    served, raw = tmp_path / "served", tmp_path / "raw"
    served.mkdir()
    workbook = served / release.files["codes"].name
    workbook.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: more than one download chunk
    with _census_server(served, failures=2) as server:
        paths = ensure_raw_files(raw, _one_file_release(release, server, retries=3))
    assert server.requests == 3
    assert paths == {"codes": raw / workbook.name}
    assert paths["codes"].read_bytes() == workbook.read_bytes()
    assert [p.name for p in raw.iterdir()] == [workbook.name]


def test_a_server_that_stays_busy_ends_in_one_line_and_leaves_nothing(tmp_path, release):
    served, raw = tmp_path / "served", tmp_path / "raw"
    served.mkdir()
    (served / release.files["codes"].name).write_bytes(b"never served")
    with _census_server(served, failures=math.inf) as server:
        failing = _one_file_release(release, server, retries=2)
        with pytest.raises(DataError) as caught:
            ensure_raw_files(raw, failing)
    assert server.requests == 3  # the first try and two retries
    message = str(caught.value)
    assert "\n" not in message
    assert f"could not be downloaded from {failing.base_url}2-6%20digit_2022_Codes.xlsx" in message
    assert "503" in message and "--raw-dir" in message
    assert not list(raw.iterdir())


def test_a_transfer_cut_short_leaves_no_partial_file(tmp_path, release):
    raw = tmp_path / "raw"
    with (
        _local_server(_TruncatingHandler) as server,
        pytest.raises(DataError, match="could not be downloaded") as caught,
    ):
        ensure_raw_files(raw, _one_file_release(release, server, retries=0))
    assert server.requests == 1
    assert "\n" not in str(caught.value)
    assert not list(raw.iterdir())


@pytest.mark.parametrize("missing", [("download", "backoff_factor"), ("files", "index")])
def test_a_data_conf_without_a_key_names_it(tmp_path, missing):
    conf = yaml.safe_load((REPO_ROOT / "conf" / "data.yaml").read_text())
    del conf[missing[0]][missing[1]]
    edited = tmp_path / "data.yaml"
    edited.write_text(yaml.safe_dump(conf))
    with pytest.raises(DataError, match=rf"key '{'.'.join(missing)}' is missing; add it"):
        load_release(edited)
