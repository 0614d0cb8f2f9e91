"""Using a trained model: embed, search, evaluate, export, and the served MLflow model, through
real subprocesses against a sqlite store, with a stage trained on the tiny backbone."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.models import get_model_info
from mlflow.tracking import MlflowClient

from naics_mlflow import serving
from naics_mlflow.cli import SEARCH_CHUNK
from naics_mlflow.config import SearchConfig
from naics_mlflow.evaluation.lexical import LexicalIndex, code_documents, six_digit_rows
from naics_mlflow.evaluation.queries import (
    QueryError,
    check_request,
    read_query_file,
    read_unseen_queries,
)
from naics_mlflow.evaluation.retrieval import SearchEngine
from naics_mlflow.model.lorentz import distance, distance_to_origin, manifold_violation
from naics_mlflow.model.merged import dtype_name, inference_device, inference_dtype
from naics_mlflow.model.trained import load_embedder
from naics_mlflow.tracking.runs import process_identity
from tests.commands import (
    environment,
    error_line,
    ok,
    run_cli,
    run_cli_concurrently,
    start_cli,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_conf_factory):
    """A working folder whose store holds one finished head-only run of the quickstart stage."""
    workdir = tmp_path_factory.mktemp("use")
    tiny_conf_factory(workdir)
    ok(
        run_cli(
            workdir,
            "train",
            "-c",
            "quickstart",
            "training.head_only=true",
            "training.trainer.max_epochs=1",
        )
    )
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    checkpoint = next((workdir / "checkpoints").rglob(run.data.tags["best_checkpoint"]))
    return workdir, client, run, checkpoint


def test_a_head_only_stage_trains_the_head_and_leaves_the_adapters(trained):
    *_, checkpoint = trained
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    adapters = [tensor for name, tensor in state.items() if "lora_B" in name]
    assert adapters and not any(tensor.any() for tensor in adapters)  # still LoRA's zero start
    assert state["encoder.fusion.w2"].any()  # the experts' output layer starts at zero: trained


def test_embed_writes_every_code_on_the_manifold(trained):
    workdir, client, run, _ = trained
    ok(run_cli(workdir, "embed", "--from-checkpoint", "quickstart", "--out", "emb.parquet"))
    table = pq.read_table(workdir / "emb.parquet").to_pydict()
    assert len(table["code"]) == 2125
    assert set(table["level"]) == {2, 3, 4, 5, 6}
    assert table["title"][table["code"].index("111110")] == "Soybean Farming"
    assert (
        table["title"][table["code"].index("31-33")] == "Manufacturing"
    )  # as the Census writes it
    embeddings = torch.tensor(np.asarray(table["embedding"], dtype=np.float32))
    assert embeddings.shape == (2125, 17)
    assert manifold_violation(embeddings, 1.0).max() < 1e-4
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "embeddings")]
    assert logged == ["embeddings/emb.parquet"]
    (workdir / "embed-blocker").write_text("")
    refused = run_cli(
        workdir, "embed", "--from-checkpoint", "quickstart", "--out", "embed-blocker/e.parquet"
    )
    assert error_line(refused) == (
        "error: cannot write embed-blocker/e.parquet (Not a directory); give --out a path in a "
        "folder you can write"
    )
    assert refused.stderr.strip() == error_line(refused)  # before the model was loaded
    refused = run_cli(workdir, "embed", "--from-checkpoint", "quickstart", "--out", "emb.csv")
    assert (
        refused.stderr == "error: --out must end in .parquet (embed writes Parquet), got emb.csv\n"
    )
    assert not (workdir / "emb.csv").exists()

    config = (workdir / "conf" / "config.yaml").read_text()
    assert "backbone_dtype: auto" in config
    halved = config.replace("backbone_dtype: auto", "backbone_dtype: bfloat16")
    outputs = f"outputs: {workdir / 'outputs'}"
    assert outputs in halved
    fresh = halved.replace(outputs, f"outputs: {workdir / 'outputs_bf16'}")
    embedded = {}
    for name, text in (("cached", halved), ("fresh", fresh)):
        (workdir / "conf" / f"{name}.yaml").write_text(text)
        ok(
            run_cli(
                workdir,
                "embed",
                "--from-checkpoint",
                "quickstart",
                "--out",
                f"{name}.parquet",
                "--config",
                f"conf/{name}.yaml",
            )
        )
        table = pq.read_table(workdir / f"{name}.parquet").to_pydict()
        embedded[name] = torch.tensor(np.asarray(table["embedding"], dtype=np.float32))
    # bfloat16 asked for: the float32 features the head-only stage cached stand in for its own.
    assert torch.equal(embedded["cached"], embeddings)
    # With nothing cached, the backbone runs in bfloat16: close to float32, not equal.
    assert manifold_violation(embedded["fresh"], 1.0).max() < 1e-4
    moved = distance(embedded["fresh"], embeddings, 1.0)
    assert 0 < moved.max() < 0.05 * distance_to_origin(embeddings, 1.0).mean()


def test_commands_reuse_the_code_embeddings_an_earlier_one_cached(trained):
    workdir, *_ = trained
    cache = workdir / "outputs" / "code_embeddings"
    shutil.rmtree(cache, ignore_errors=True)
    command = ("search", "grow soybeans", "--from-checkpoint", "quickstart")
    first = ok(run_cli(workdir, *command))
    (cached,) = cache.glob("*.pt")
    cache_bytes = cached.stat().st_size
    assert "embedded 2125 codes" in first.stderr
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert f" backbone on {device})" in first.stderr  # where search.device put the model
    second = ok(run_cli(workdir, *command))
    assert f"code embeddings read from {cached}" in second.stderr
    assert "embedded 2125 codes" not in second.stderr
    assert second.stdout == first.stdout
    cached.write_bytes(b"cut short")
    third = ok(run_cli(workdir, *command))
    assert "ignoring unreadable cached code embeddings" in third.stderr
    assert third.stdout == first.stdout
    rewritten = torch.load(cached, weights_only=True)  # computed again, replaced
    assert rewritten["embeddings"].shape[0] == 2125 and len(rewritten["item_vectors"]) > 16000
    shutil.rmtree(cache)
    cache.write_text("")  # a file where the folder should be: nothing can be cached
    fourth = ok(run_cli(workdir, *command))
    assert "could not cache the code embeddings" in fourth.stderr
    assert fourth.stdout == first.stdout
    cache.unlink()
    # A write the system refuses part-way, as a full disk does (here a file size limit the
    # kernel enforces, above the downloaded checkpoint's size, below the cache's): torch's own
    # writer raised 'unexpected pos' and the command failed.
    assert cache_bytes > 1_000_000 and not cache.exists()
    fifth = ok(run_cli(workdir, *command, file_size_limit=1_000_000))
    assert (
        "could not cache the code embeddings" in fifth.stderr and "(File too large)" in fifth.stderr
    )
    assert fifth.stdout == first.stdout
    assert not list(cache.iterdir())  # nothing half-written


def test_commands_read_the_channel_features_the_head_only_stage_cached(trained):
    """Its adapters never moved, so the trained model reads its texts as the stage's start did."""
    workdir, *_ = trained
    folder = workdir / "outputs" / "channel_features"
    cached = sorted(folder.glob("*.pt"))
    shutil.rmtree(workdir / "outputs" / "code_embeddings", ignore_errors=True)
    result = ok(run_cli(workdir, "search", "grow soybeans", "--from-checkpoint", "quickstart"))
    assert f"channel features read from {folder}" in result.stderr
    assert "embedded 2125 codes" in result.stderr  # the head still runs
    assert sorted(folder.glob("*.pt")) == cached  # nothing computed again


def test_search_returns_the_closest_codes(trained):
    workdir, _, _, checkpoint = trained
    result = ok(
        run_cli(
            workdir, "search", "grow soybeans", "--top", "3", "--from-checkpoint", str(checkpoint)
        )
    )
    header, *rows = result.stdout.strip().splitlines()
    assert header.split()[:5] == ["rank", "code", "score", "margin", "distance"]
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]
    assert all(len(row.split()[1]) == 6 for row in rows)
    scores = [float(row.split()[2]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    margins = [float(row.split()[3]) for row in rows]
    assert margins[:2] == pytest.approx([a - b for a, b in itertools.pairwise(scores)], abs=2e-3)
    sectors = ok(
        run_cli(
            workdir,
            "search",
            "farming",
            "--level",
            "2",
            "--top",
            "20",
            "--from-checkpoint",
            str(checkpoint),
        )
    )
    sector_rows = sectors.stdout.strip().splitlines()[1:]
    assert len(sector_rows) == 20  # every sector, ranked
    assert sector_rows[-1].split()[3] == "-"  # no code below the last one


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["   "], "query 1 is empty"),
        (["bakery", "--top", "0"], "--top (top_k of a served request) must be between 1 and 100"),
        (
            ["bakery", "search.item_weight=0"],
            "'search.item_weight=0' sets a config key, and search takes no KEY=VALUE overrides",
        ),
    ],
)
def test_search_rejects_bad_requests(trained, arguments, expected):
    workdir, _, _, checkpoint = trained
    line = error_line(run_cli(workdir, "search", *arguments, "--from-checkpoint", str(checkpoint)))
    assert line.startswith("error: ") and expected in line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "query 1 is empty"),
        (float("nan"), "query 1 is empty"),
        (pd.NA, "query 1 is empty"),  # a missing value of pandas' string dtype
        (123, "query 1 is 123, not text"),
        (["bakery"], "query 1 is ['bakery'], not text"),
    ],
)
def test_a_missing_text_is_empty_and_any_other_value_not_text(text, expected):
    with pytest.raises(QueryError) as refused:
        check_request([text], 5, 6)
    assert str(refused.value).startswith(expected)


@pytest.mark.parametrize(
    "contents",
    [
        'id,text,region\n007,"grow soybeans; in Iowa",x\n',
        'id;text;region\n007;"grow soybeans; in Iowa";x\n',
        # Excel's "CSV UTF-8" in a locale whose decimal mark is a comma.
        '\ufeffid;text;region\r\n007;"grow soybeans; in Iowa";x\r\n',
        "id\ttext\tregion\n007\tgrow soybeans; in Iowa\tx\n",
    ],
    ids=["commas", "semicolons", "semicolons from Excel", "tabs"],
)
def test_a_query_csv_is_read_by_the_separator_its_header_shows(tmp_path, contents):
    path = tmp_path / "businesses.csv"
    path.write_text(contents, encoding="utf-8", newline="")
    table = read_query_file(path)
    assert table.to_dict("records") == [
        {"id": "007", "text": "grow soybeans; in Iowa", "region": "x"}
    ]


def _workbook(path: Path, *rows: list) -> Path:
    """An Excel workbook at ``path`` whose first sheet holds ``rows`` and a second sheet that
    holds something else."""
    import openpyxl

    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(row)
    book.create_sheet("notes").append(["text", "not a business"])
    book.save(path)
    return path


def test_a_query_workbook_is_read_from_its_first_sheet(tmp_path):
    path = _workbook(
        tmp_path / "businesses.xlsx",
        ["id", "text", "region"],
        ["007", "grow soybeans", "Iowa, US"],  # an id typed as text keeps its zeros
        [8, "retail bakery", None],
    )
    assert read_query_file(path).to_dict("records") == [
        {"id": "007", "text": "grow soybeans", "region": "Iowa, US"},
        {"id": "8", "text": "retail bakery", "region": ""},
    ]


@pytest.mark.parametrize(
    ("name", "rows", "expected"),
    [
        ("b.xlsx", [["id", "text"], [1, "bakery"], [2, None]], "row 3 has an empty text"),
        ("b.xlsx", [], "has no `text` column (its columns: none)"),
        ("b.xlsx", None, "is not an Excel workbook that can be read; save it as .xlsx or as CSV"),
        ("b.xls", None, "is in Excel's format of before 2007, which is not read"),
    ],
    ids=["empty text at Excel's row 3", "empty sheet", "not a workbook", "old Excel format"],
)
def test_a_bad_query_workbook_is_one_line(tmp_path, name, rows, expected):
    path = tmp_path / name
    if rows is None:
        path.write_text("id,text\n1,bakery\n")
    else:
        _workbook(path, *rows)
    with pytest.raises(QueryError) as refused:
        read_query_file(path)
    line = str(refused.value)
    assert line.startswith(f"{path} ") and expected in line and "\n" not in line


def test_evaluation_queries_saved_with_semicolons_are_read(tmp_path):
    path = tmp_path / "unseen.csv"
    path.write_text('code;text\n111110;"Soybean farming, field and seed"\n')
    queries = read_unseen_queries(path)
    assert (queries.codes, queries.texts) == (["111110"], ["Soybean farming, field and seed"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_search_on_a_gpu_that_is_not_there_is_one_line(trained):
    workdir, _, _, checkpoint = trained
    config = (workdir / "conf" / "config.yaml").read_text()
    assert "device: auto" in config
    (workdir / "conf" / "cuda.yaml").write_text(config.replace("device: auto", "device: cuda"))
    result = run_cli(
        workdir,
        "search",
        "bakery",
        "--from-checkpoint",
        str(checkpoint),
        "--config",
        "conf/cuda.yaml",
    )
    line = error_line(result)
    assert line.startswith("error: search.device is cuda, but torch sees no CUDA GPU here")
    assert "set search.device to auto or cpu" in line


def _table_rows(lines: list[str]) -> list[list[str]]:
    """rank, code, score, distance of each row of a printed table (titles have spaces)."""
    return [line.split()[:4] for line in lines]


def test_search_answers_several_texts_one_table_each(trained):
    workdir, _, _, checkpoint = trained
    alone = ok(
        run_cli(
            workdir, "search", "grow soybeans", "--top", "3", "--from-checkpoint", str(checkpoint)
        )
    )
    texts = ["grow soybeans", "retail bakery", "grow soybeans"]
    together = ok(
        run_cli(workdir, "search", *texts, "--top", "3", "--from-checkpoint", str(checkpoint))
    )
    blocks = together.stdout.strip().split("\n\n")
    assert len(blocks) == 3  # a repeated text is answered again, not merged
    header, *expected = alone.stdout.strip().splitlines()
    for number, (block, text) in enumerate(zip(blocks, texts, strict=True), start=1):
        heading, block_header, *rows = block.splitlines()
        assert (heading, block_header) == (f"{number}. {text}", header)
        assert [row[0] for row in _table_rows(rows)] == ["1", "2", "3"]
    for block in (blocks[0], blocks[2]):  # as the text alone ranks it
        rows = block.splitlines()[2:]
        assert [row[:2] for row in _table_rows(rows)] == [r[:2] for r in _table_rows(expected)]
    assert _table_rows(blocks[1].splitlines()[2:]) != _table_rows(blocks[0].splitlines()[2:])


def test_search_writes_the_matches_of_a_csv_with_its_other_columns(trained):
    workdir, _, _, checkpoint = trained
    queries = workdir / "businesses.csv"
    queries.write_text(
        'id,text,region\n007,grow soybeans,"Iowa, US"\n008,retail bakery,\n009,grow soybeans,x\n'
    )
    single = ok(
        run_cli(
            workdir, "search", "grow soybeans", "--top", "2", "--from-checkpoint", str(checkpoint)
        )
    )
    expected_codes = [row[1] for row in _table_rows(single.stdout.strip().splitlines()[1:])]

    def search_file(out: str) -> subprocess.CompletedProcess:
        return run_cli(
            workdir,
            "search",
            *("--input", str(queries), "--out", out, "--top", "2"),
            *("--from-checkpoint", str(checkpoint)),
        )

    readers = {
        "coded/matches.CSV": pd.read_csv,  # suffixes in any case
        "coded/matches.tsv": lambda path, **read: pd.read_csv(path, sep="\t", **read),
        "coded/matches.parquet": None,
        "coded/matches.xlsx": pd.read_excel,
    }
    for out, reader in readers.items():
        result = ok(search_file(out))
        assert result.stdout.strip() == f"{out}: 6 matches of 3 texts"
        table = (
            reader(workdir / out, dtype={"id": str, "code": str}, keep_default_na=False)
            if reader
            else pd.read_parquet(workdir / out)
        )
        assert list(table.columns) == [
            "id", "region", "text", "rank", "code", "title", "level", "distance", "score", "margin"
        ]  # fmt: skip
        assert table["id"].tolist() == ["007", "007", "008", "008", "009", "009"]
        assert table["region"].tolist() == ["Iowa, US", "Iowa, US", "", "", "x", "x"]
        assert table["rank"].tolist() == [1, 2] * 3
        assert table["code"].tolist()[:2] == expected_codes
        assert table["code"].tolist()[4:] == expected_codes
        assert (table["level"] == 6).all()
        first, second = table.iloc[0], table.iloc[1]
        assert first["margin"] == pytest.approx(first["score"] - second["score"])
        assert (table["margin"] >= 0).all()
        assert not list((workdir / "coded").glob("*.partial"))

    # The same businesses in an Excel workbook give the same rows.
    workbook = _workbook(
        workdir / "businesses.xlsx",
        ["id", "text", "region"],
        ["007", "grow soybeans", "Iowa, US"],
        ["008", "retail bakery", None],
        ["009", "grow soybeans", "x"],
    )
    ok(
        run_cli(
            workdir,
            "search",
            *("--input", workbook.name, "--out", "coded/from_workbook.parquet", "--top", "2"),
            *("--from-checkpoint", str(checkpoint)),
        )
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(workdir / "coded/from_workbook.parquet"),
        pd.read_parquet(workdir / "coded/matches.parquet"),
    )

    one = run_cli(
        workdir,
        "search",
        "retail bakery",
        "--out",
        "coded/one.csv",
        "--top",
        "1",
        *("--from-checkpoint", str(checkpoint)),
    )
    assert ok(one).stdout.strip() == "coded/one.csv: 1 match of 1 text"

    # Past one chunk of texts: a progress line per chunk, and every row still matches its text.
    many = SEARCH_CHUNK + 1
    queries.write_text(
        "id,text\n"
        + "".join(f"{i},{('grow soybeans', 'retail bakery')[i % 2]}\n" for i in range(many))
    )
    result = ok(search_file("coded/many.csv"))
    assert f"searched {SEARCH_CHUNK:,} of {many:,} texts" in result.stderr
    assert f"searched {many:,} of {many:,} texts" in result.stderr
    table = pd.read_csv(workdir / "coded/many.csv", dtype={"code": str})
    firsts = table[table["rank"] == 1]
    assert firsts["id"].tolist() == list(range(many))
    assert set(firsts["code"].iloc[::2]) == {expected_codes[0]}
    assert set(firsts["code"].iloc[1::2]) == {firsts["code"].iloc[1]}

    blocked = workdir / "not-a-folder"
    blocked.write_text("")
    refused = search_file(f"{blocked.name}/matches.csv")
    line = error_line(refused)
    assert line == (
        f"error: cannot write {blocked.name}/matches.csv (Not a directory); give --out a path in "
        "a folder you can write"
    )
    assert refused.stderr.strip() == line  # before the model was loaded
    assert blocked.read_text() == ""


# (input file, further arguments, what the error line says); {input} is the file's name.
BAD_SEARCH_INPUTS = [
    ("id,description\n1,bakery\n", [], "has no `text` column (its columns: id, description)"),
    ("code,text\n311811,bakery\n", [], "has the column(s) code, which each match row"),
    ("id,text\n1,bakery\n2,  \n", [], "row 2 has an empty text"),
    ("id,text\n", [], "holds no rows"),
    (b"id,text\n1,caf\xe9\n", [], "is not UTF-8 text"),
    ("id,text\n1,bakery\n", ["bakery"], "TEXT arguments or --input, not both"),
    (
        "id,text\n1,bakery\n",
        ["--out", "matches.txt"],
        "--out must end in .csv, .tsv, .parquet or .xlsx",
    ),
    (
        "id,text\n" + "".join(f"{row},bakery\n" for row in range(10_486)),
        ["--top", "100", "--out", "big.xlsx"],
        "10,486 texts with --top 100 make up to 1,048,600 rows, more than an Excel sheet holds",
    ),
    ("id,text\n1,bakery\n", ["--out", "{input}"], "is the --input file"),
]


def test_search_refuses_bad_input_files_before_any_model_work(trained):
    workdir, _, _, checkpoint = trained
    commands = []
    for number, (contents, arguments, _) in enumerate(BAD_SEARCH_INPUTS):
        queries = workdir / f"queries{number}.csv"
        queries.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
        further = [argument.format(input=queries.name) for argument in arguments]
        out = ["--out", f"matches{number}.csv"]
        # The case's own arguments come last, so that their --out wins.
        commands.append(
            [
                "search",
                "--input",
                queries.name,
                *out,
                "--from-checkpoint",
                str(checkpoint),
                *further,
            ]
        )
    results = run_cli_concurrently(workdir, commands)
    for number, ((contents, _, expected), result) in enumerate(
        zip(BAD_SEARCH_INPUTS, results, strict=True)
    ):
        line = error_line(result)
        assert line.startswith("error: ") and expected in line
        assert result.stderr.strip() == line  # refused before the model was loaded
        written = (workdir / f"queries{number}.csv").read_bytes()
        assert written == (contents if isinstance(contents, bytes) else contents.encode())
        assert not (workdir / f"matches{number}.csv").exists()


def test_search_needs_a_text_or_an_input_file(trained):
    workdir, _, _, checkpoint = trained
    nothing, missing = run_cli_concurrently(
        workdir,
        [
            ["search", "--from-checkpoint", str(checkpoint)],
            ["search", "--input", "nowhere.csv", "--from-checkpoint", str(checkpoint)],
        ],
    )
    assert error_line(nothing) == (
        "error: give a business description as TEXT, or a CSV or .xlsx workbook of them as --input"
    )
    assert error_line(missing) == (
        "error: nowhere.csv not found; give the path of a CSV or an .xlsx workbook with a `text` "
        "column"
    )


class _RunsCode:
    """Unpickling this creates the file ``marker``: a stand-in for any code a file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_holding_python_objects_needs_trust_checkpoint(trained):
    workdir, _, _, checkpoint = trained
    saved = torch.load(checkpoint, weights_only=True)
    marker = workdir / "code-ran"
    unsafe = workdir / "unsafe.ckpt"
    torch.save({**saved, "note": _RunsCode(marker)}, unsafe)

    line = error_line(run_cli(workdir, "search", "bakery", "--from-checkpoint", str(unsafe)))
    assert line == (
        f"error: {unsafe} holds Python objects besides weights, and loading them could run "
        "code; pass --trust-checkpoint only if you trust where it came from"
    )
    assert not marker.exists()

    trusted = ok(
        run_cli(workdir, "search", "bakery", "--from-checkpoint", str(unsafe), "--trust-checkpoint")
    )
    assert marker.exists()  # trusted, it was unpickled in full
    plain = ok(run_cli(workdir, "search", "bakery", "--from-checkpoint", str(checkpoint)))
    assert trusted.stdout == plain.stdout  # the same weights
    # Its copy refused part-way, as by a full temporary disk (a file size limit far below the
    # weights' size; the copy is the command's first write).
    refused = run_cli(
        workdir,
        *("search", "bakery", "--from-checkpoint", str(unsafe), "--trust-checkpoint"),
        file_size_limit=10_000,
    )
    assert error_line(refused).startswith(f"error: cannot write the weights-only copy of {unsafe} ")
    assert "(File too large); free space there" in error_line(refused)


def test_search_with_a_checkpoint_of_another_model(trained):
    workdir, *_ = trained
    foreign = workdir / "foreign.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, foreign)
    line = error_line(run_cli(workdir, "search", "bakery", "--from-checkpoint", str(foreign)))
    assert "not a naics-embedder checkpoint" in line


def test_evaluate_reports_model_and_baselines_in_a_nested_run(trained, data_dir):
    workdir, client, run, _ = trained
    queries = workdir / "unseen.csv"
    queries.write_text("code,text\n111110,Soybean growing\n541511,Writing custom software\n")
    result = ok(
        run_cli(
            workdir,
            "evaluate",
            "--from-checkpoint",
            "quickstart",
            "--json",
            "--unseen-queries",
            str(queries),
        )
    )
    report = json.loads(result.stdout)
    # The untrained baseline reads its texts as the head-only stage did: cached features.
    assert "channel features read from" in result.stderr
    assert {"spearman", "ndcg_at_10"} <= {k.removeprefix("val/") for k in report["hierarchy"]}
    assert "radius_depth_spearman" in {k.removeprefix("val/") for k in report["hierarchy"]}
    # The third set is named for its place, whatever file it came from; the report and the
    # run's datasets say which file that was.
    assert list(report["retrieval"]) == ["dev", "holdout", "unseen"]
    assert report["query_sets"]["unseen"] == {"source": str(queries), "queries": 2}
    for query_set, systems in report["retrieval"].items():
        assert set(systems) == {"model", "embedding", "untrained", "knn", "bm25"}
        for metrics in systems.values():
            assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
        for metric, winners in report["winners"][query_set].items():
            best = max(values[metric] for values in systems.values())
            assert winners and all(systems[name][metric] == best for name in winners)
    evaluation = client.get_run(report["run_id"])
    assert evaluation.data.tags["evaluation"] == "true"
    assert evaluation.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert "holdout/bm25/top5" in evaluation.data.metrics
    assert "unseen/model/top1" in evaluation.data.metrics
    read = {
        entry.tags[0].value: (entry.dataset.name, json.loads(entry.dataset.source))
        for entry in evaluation.inputs.dataset_inputs
    }
    assert read == {
        "dev": ("index_dev", {"uri": str((data_dir / "index_dev.parquet").resolve())}),
        "holdout": ("index_holdout", {"uri": str((data_dir / "index_holdout.parquet").resolve())}),
        "unseen": ("unseen", {"uri": str(queries.resolve())}),
    }
    (unseen,) = [e.dataset for e in evaluation.inputs.dataset_inputs if e.dataset.name == "unseen"]
    assert json.loads(unseen.profile)["num_rows"] == 2
    assert evaluation.data.params == {
        "search.lexical_weight": "32.0",
        "search.item_weight": "12.0",
        "search.backbone_dtype": "auto",
        "search.device": "auto",
        "search.query_max_length": "64",
        "backbone_dtype": dtype_name(inference_dtype("auto", inference_device("auto"))),
        "device": str(torch.device("cuda", 0) if torch.cuda.is_available() else "cpu"),
    }

    missing = workdir / "missing.csv"
    result = run_cli(
        workdir, "evaluate", "--from-checkpoint", "quickstart", "--unseen-queries", str(missing)
    )
    assert error_line(result) == (
        f"error: evaluation queries {missing} not found; pass --unseen-queries PATH or set "
        "evaluation.unseen_queries"
    )
    # It stopped before anything else: the checkpoint's run is not even looked up.
    assert result.stderr.strip() == error_line(result)
    queries.write_bytes(b"code,text\n111110,Soybean caf\xe9\n")
    line = error_line(
        run_cli(
            workdir, "evaluate", "--from-checkpoint", "quickstart", "--unseen-queries", str(queries)
        )
    )
    assert line.startswith(f"error: {queries} is not UTF-8 text (")
    queries.write_text("code,text\n111110,Soybean farming\n111120,\n")
    line = error_line(
        run_cli(
            workdir, "evaluate", "--from-checkpoint", "quickstart", "--unseen-queries", str(queries)
        )
    )
    assert line == f"error: {queries} line 3 has an empty text; give each code a phrasing"
    queries.write_text("code,text\n")
    line = error_line(
        run_cli(
            workdir, "evaluate", "--from-checkpoint", "quickstart", "--unseen-queries", str(queries)
        )
    )
    assert line == f"error: {queries} holds no rows; give one code,text row per query"

    # Retrieval ranks national industries only: a sector's query could never be found.
    for code in ("999999", "11"):
        queries.write_text(f"code,text\n{code},Not a national industry\n")
        result = run_cli(
            workdir, "evaluate", "--from-checkpoint", "quickstart", "--unseen-queries", str(queries)
        )
        assert error_line(result) == (
            f"error: {queries} line 2: code '{code}' is not a six-digit NAICS 2022 code; give "
            "each query the national industry it belongs to"
        )
        # The codes are checked against the taxonomy before the model embeds every code.
        assert "code embeddings" not in result.stderr and "embedded" not in result.stderr
    # A sample coded in NAICS 2017 is told every wrong row at once, in one line.
    rows = ["454110,Online shopping", "111110,Soybeans", *[f"44314{i},Radios" for i in range(4)]]
    queries.write_text("code,text\n" + "\n".join(rows) + "\n")
    line = error_line(
        run_cli(
            workdir, "evaluate", "--from-checkpoint", "quickstart", "--unseen-queries", str(queries)
        )
    )
    assert line == (
        f"error: {queries}: 5 of 6 codes are not six-digit NAICS 2022 codes (line 2: '454110', "
        "line 4: '443140', line 5: '443141' and 2 more); give each query the national industry "
        "it belongs to"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_exported_model_loads_in_a_fresh_process_and_serves(trained, taxonomy):
    workdir, client, run, _ = trained
    logged = len(client.search_logged_models([run.info.experiment_id]))
    refused = run_cli(workdir, "export", "--from-checkpoint", "quickstart", "--register", "a/b")
    assert error_line(refused) == (
        "error: --register 'a/b' is not a name the model registry accepts; give a non-empty name "
        "without '/' or ':'"
    )
    assert refused.stderr.strip() == error_line(refused)  # before any model was built or logged
    assert len(client.search_logged_models([run.info.experiment_id])) == logged
    result = ok(
        run_cli(workdir, "export", "--from-checkpoint", "quickstart", "--register", "naics")
    )
    uri = f"runs:/{run.info.run_id}/model"
    assert uri in result.stdout
    # Logged as MLflow's models from code: loading it runs the project's file, unpickles nothing.
    (model,) = client.search_logged_models(
        [run.info.experiment_id], order_by=[{"field_name": "creation_time", "ascending": False}]
    )[:1]
    files = {path.name for path in Path(model.artifact_location.removeprefix("file://")).iterdir()}
    assert "served_model.py" in files and "python_model.pkl" not in files
    load = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mlflow, pandas as pd, sys\n"
            f"model = mlflow.pyfunc.load_model('{uri}')\n"
            "import gc\n"
            "print(len(gc.get_objects()), gc.get_freeze_count())\n"
            "out = model.predict(pd.DataFrame({'text': ['grow soybeans'], 'top_k': [3]}))\n"
            "emb = model.predict(pd.DataFrame({'text': ['grow soybeans']}),"
            " params={'output': 'embedding'})\n"
            "none = pd.DataFrame({'text': pd.Series([], dtype=str)})\n"
            "print(len(out), list(out.columns), len(emb.iloc[0]['embedding']))\n"
            "print(model.predict(none).shape,"
            " model.predict(none, params={'output': 'embedding'}).shape)\n",
        ],
        cwd=workdir,
        env={**environment(workdir), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert load.returncode == 0, load.stderr[-3000:]
    gc_counts, *answers = load.stdout.strip().splitlines()[-3:]
    assert answers == [
        "3 ['text', 'rank', 'code', 'title', 'level', 'distance', 'score', 'margin'] 17",
        "(0, 8) (0, 2)",  # an empty batch is answered with no rows
    ]
    # Loading froze what it made for the collector, as a server starting up should: a full
    # collection while serving then scans what requests make, not the libraries' objects.
    collected, frozen = map(int, gc_counts.split())
    assert frozen > 100 * collected
    store = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    assert store.get_registered_model("naics").name == "naics"

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=workdir,
        env=environment(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, "the model server exited"
                time.sleep(0.5)
        # Its words are read as `search` reads them: "subsector", a word of the backbone's
        # vocabulary that no national industry's document holds, is not "sub sector".
        query = "grow soybeans, a farming subsector"
        documents = code_documents(taxonomy, six_digit_rows(taxonomy))
        assert LexicalIndex(documents).read_as("subsector") == ["sub", "sector"]
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_records": [{"text": query}], "params": {"top_k": 2}},
        )
        assert status == 200
        assert [p["rank"] for p in body["predictions"]] == [1, 2]
        # The served model ranks as `search` does (the same embeddings and lexical weight).
        searched = ok(
            run_cli(workdir, "search", query, "--top", "2", "--from-checkpoint", "quickstart")
        )
        # The same codes with the same scores: the nearest-item signal is served as well.
        rows = [line.split() for line in searched.stdout.strip().splitlines()[1:]]
        assert [(p["code"], f"{p['score']:.3f}") for p in body["predictions"]] == [
            (row[1], row[2]) for row in rows
        ]
        # The registered model names the same checkpoint for the commands, by its version or
        # by an alias, the registry's way to name the model a team ships.
        store.set_registered_model_alias("naics", "champion", "1")
        for registered_as in ("models:/naics/1", "models:/naics@champion"):
            by_registry = ok(
                run_cli(
                    *(workdir, "search", query, "--top", "2"),
                    *("--from-checkpoint", registered_as),
                )
            )
            assert by_registry.stdout == searched.stdout
        # level 0 ranks the codes of every level, as `search --level any` does.
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_records": [{"text": query}], "params": {"top_k": 3, "level": 0}},
        )
        assert status == 200
        any_level = ok(
            run_cli(
                workdir,
                *("search", query, "--top", "3", "--level", "any"),
                *("--from-checkpoint", "quickstart"),
            )
        )
        rows = [line.split() for line in any_level.stdout.strip().splitlines()[1:]]
        assert [p["code"] for p in body["predictions"]] == [row[1] for row in rows]
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_records": [{"text": query}], "params": {"level": 9}},
        )
        assert status == 400
        assert "between 2 and 6, or 0 for codes of every level, got 9" in body["message"]
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_split": {"columns": ["text"], "data": []}},
        )
        assert (status, body) == (200, {"predictions": []})
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_split": {"columns": ["text"], "data": []}, "params": {"top_k": 0}},
        )
        assert status == 400 and "must be between 1" in body["message"]
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"text": " "}]}
        )
        assert status == 400 and "query 1 is empty" in body["message"]
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_records": [{"text": 123}]},
        )
        assert status == 400 and "query 1 is 123, not text" in body["message"]
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_records": [{"text": "bakery"}], "params": {"top_k": 1000}},
        )
        assert status == 400 and "top_k of a served request) must be between 1" in body["message"]
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"query": "bakery"}]}
        )
        assert status == 400 and "text" in body["message"]  # the schema names the missing column
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _models_of(client: MlflowClient, run) -> list:
    """The models named ``model`` of ``run`` that the store lists, newest first."""
    return client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = 'model'",
    )


def test_export_leaves_its_run_as_it_was_and_a_stopped_one_leaves_no_model(trained, monkeypatch):
    """`export` logs into the run its checkpoint came from without reopening it. Reopened, a
    finished stage's end time became the export's (its duration in the MLflow UI ran to that
    day), and a stopped export left it KILLED, which `--from-checkpoint <stage>` then passed over,
    with a PENDING model that `runs:/<id>/model` read instead of the whole one. Nor are the run's
    params touched: MLflow copied the model's search settings into them, and refused an export's
    other settings there after the first."""
    workdir, client, run, _ = trained
    config = yaml.safe_load((workdir / "conf" / "config.yaml").read_text())
    config["search"]["lexical_weight"] += 1.5
    (workdir / "conf" / "other_search.yaml").write_text(yaml.safe_dump(config))
    ok(
        run_cli(
            workdir,
            *("export", "--from-checkpoint", "quickstart"),
            *("--config", "conf/other_search.yaml"),
        )
    )
    (whole, *_) = _models_of(client, run)
    assert whole.status == LoggedModelStatus.READY
    assert client.get_run(run.info.run_id).data.params == run.data.params
    # The model's params are the run's, with the settings it searches with.
    assert whole.params == {
        **run.data.params,
        "search.lexical_weight": str(config["search"]["lexical_weight"]),
    }

    _export_stopped_while_pending(workdir, client, run, signal.SIGINT)
    said = f"stopped: model 'model' was not logged into run {run.info.run_id}"
    assert said in (workdir / "stopped_export.log").read_text()

    after = client.get_run(run.info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", run.info.end_time)
    assert _models_of(client, run)[0].model_id == whole.model_id  # the cut-short one is gone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    assert get_model_info(f"runs:/{run.info.run_id}/model").model_id == whole.model_id
    ok(run_cli(workdir, "search", "grow soybeans", "--from-checkpoint", "quickstart"))

    # A SIGKILL cannot delete its model. The next export deletes it, its writer being dead, and
    # keeps those whose writer lives (this process) or ran on another machine.
    killed = _export_stopped_while_pending(workdir, client, run, signal.SIGKILL)
    (left,) = [m for m in _models_of(client, run) if m.status == LoggedModelStatus.PENDING]
    assert left.tags["process"].split(":")[1] == str(killed)
    kept = [
        client.create_logged_model(
            run.info.experiment_id, name="model", source_run_id=run.info.run_id, tags=tags
        )
        for tags in ({"process": process_identity(os.getpid())}, {"process": "far:1:2"})
    ]
    exported = ok(run_cli(workdir, "export", "--from-checkpoint", "quickstart"))
    said = f"deleted model {left.model_id} of run {run.info.run_id}: left PENDING by a process"
    assert said in exported.stderr
    pending = {m.model_id for m in _models_of(client, run) if m.status == LoggedModelStatus.PENDING}
    assert pending == {model.model_id for model in kept}
    for model in kept:
        client.delete_logged_model(model.model_id)
    assert _models_of(client, run)[0].status == LoggedModelStatus.READY


def _export_stopped_while_pending(workdir: Path, client: MlflowClient, run, stop: int) -> int:
    """The pid of an export stopped by ``stop`` while its model was being written (made
    PENDING, filled, then marked READY)."""
    log = workdir / "stopped_export.log"
    process = start_cli(workdir, "export", "--from-checkpoint", "quickstart", output=log)
    try:
        while not any(m.status == LoggedModelStatus.PENDING for m in _models_of(client, run)):
            assert process.poll() is None, f"the export ended before the stop: {log.read_text()}"
            time.sleep(0.02)
        os.killpg(process.pid, stop)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -stop
    return process.pid


@pytest.mark.parametrize("carried_as", ["settings file", "model_config"])
def test_a_served_model_loads_the_settings_it_was_logged_with(
    trained, taxonomy, tmp_path, carried_as
):
    """Models logged before 2026-12-06 carry their search settings as MLflow's model_config,
    later ones as a file; a process that has this package imported loads either with this
    code."""
    *_, checkpoint = trained
    settings = SearchConfig(
        lexical_weight=7.0,
        item_weight=2.0,
        backbone_dtype="float32",
        device="cpu",
        query_max_length=20,
    )
    engine = SearchEngine.build(load_embedder(checkpoint, torch.device("cpu")), taxonomy, settings)
    codes = tmp_path / "codes.parquet"
    pq.write_table(serving._codes_table(engine), codes)
    artifacts = {"checkpoint": str(checkpoint), "codes": str(codes)}
    if carried_as == "settings file":
        (tmp_path / "search_settings.json").write_text(json.dumps(dataclasses.asdict(settings)))
        artifacts["search_settings"] = str(tmp_path / "search_settings.json")
        model_config = {}
    else:
        model_config = dataclasses.asdict(settings)
    served = serving.NaicsSearchModel()
    served.load_context(mlflow.pyfunc.PythonModelContext(artifacts, model_config))
    assert served.engine.settings == settings


def test_a_registry_that_fails_leaves_the_logged_model(trained, tmp_path):
    """`export --register` with a registry of its own (MLFLOW_REGISTRY_URI). One that cannot be
    used is refused before any model is built, and a `models:/` reference read from it names
    it. One that refuses the new version once the model is logged (here a sqlite trigger; a
    server gone since the check, in life) ends in one line naming the model, which stays READY:
    registered inside MLflow's logging, its failure deleted the finished model and ended in a
    traceback."""
    workdir, client, run, _ = trained
    before = [model.model_id for model in _models_of(client, run)]
    unusable = f"sqlite:///{workdir / 'conf' / 'config.yaml'}/registry.db"  # under a file
    refused = run_cli(
        workdir,
        *("export", "--from-checkpoint", "quickstart", "--register", "naics"),
        more_env={"MLFLOW_REGISTRY_URI": unusable},
    )
    assert error_line(refused).startswith(f"error: cannot use the model registry {unusable} (")
    assert refused.stderr.strip() == error_line(refused)  # before any model was built or logged
    assert [model.model_id for model in _models_of(client, run)] == before
    # A registered model read from there names the registry, not the tracking store.
    unread = run_cli(
        workdir,
        *("search", "grow soybeans", "--from-checkpoint", "models:/naics/1"),
        more_env={"MLFLOW_REGISTRY_URI": unusable},
    )
    assert error_line(unread).startswith(
        f"error: cannot download models:/naics/1 from the model registry {unusable} ("
    )

    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    MlflowClient(registry_uri=registry).search_registered_models()
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as database:
        database.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON model_versions "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        database.commit()
    failed = run_cli(
        workdir,
        *("export", "--from-checkpoint", "quickstart", "--register", "naics"),
        more_env={"MLFLOW_REGISTRY_URI": registry},
    )
    assert error_line(failed).startswith(
        f"error: model logged as runs:/{run.info.run_id}/model, but registering it as 'naics' in "
        f"{registry} failed ("
    )
    logged, *_ = _models_of(client, run)
    assert logged.model_id not in before and logged.status == LoggedModelStatus.READY
    assert MlflowClient(registry_uri=registry).search_model_versions("name = 'naics'") == []


def test_an_export_the_disk_refuses_is_one_line_and_leaves_no_model(trained):
    """A full disk where the model's files are gathered or stored (here a file size limit, which
    the kernel enforces the same way): pyarrow's or shutil's OSError came through as a traceback,
    and the run's newest `model` was a FAILED one that `runs:/<id>/model` could not load."""
    workdir, client, run, _ = trained
    before = [model.model_id for model in _models_of(client, run)]
    # Past the store's own file (about 1 MB), short of the codes' table (about 3.8 MB).
    refused = run_cli(workdir, "export", "--from-checkpoint", "quickstart", file_size_limit=2**21)
    assert error_line(refused).startswith(
        f"error: cannot write model 'model' of run {run.info.run_id} (File too large); free space "
        "in the temporary folder "
    )
    assert [model.model_id for model in _models_of(client, run)] == before
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
