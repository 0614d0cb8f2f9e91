"""Files written whole or not at all, and the one line for an ``--out`` that cannot be written."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from naics_mlflow.files import OutputError, write_output
from tests.commands import file_size_limited


def test_an_output_whose_folder_goes_away_while_written_names_the_target_in_one_line(tmp_path):
    target = tmp_path / "coded" / "embeddings.parquet"

    def write_after_the_folder_is_gone(path):
        shutil.rmtree(path.parent)
        # As `embed` writes; pyarrow's error names the partial file, not the --out given.
        pq.write_table(pa.table({"code": ["311811"]}), path)

    with pytest.raises(OutputError) as refused:
        write_output(target, write_after_the_folder_is_gone)
    assert str(refused.value) == (
        f"cannot write {target} (No such file or directory); give --out a path in a folder you "
        "can write"
    )
    assert not target.parent.exists()


def test_an_output_its_disk_has_no_room_for_says_to_free_space(tmp_path):
    target = tmp_path / "embeddings.parquet"
    with pytest.raises(OutputError) as refused, file_size_limited(10_000):
        write_output(target, lambda path: path.write_bytes(bytes(100_000)))
    assert str(refused.value) == (
        f"cannot write {target} (File too large); free space on its disk, or give --out a path on "
        "another"
    )
    assert list(tmp_path.iterdir()) == []
