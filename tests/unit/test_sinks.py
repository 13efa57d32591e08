"""The Parquet sink's counts come from the footers, without reading the rows."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import columns as C
from pipeline import sinks


def rows(n: int, errors: set[int]) -> pa.Table:
    return pa.table({
        C.ID: [f"i{k}" for k in range(n)],
        C.STATUS: [C.STATUS_ERROR if k in errors else C.STATUS_OK for k in range(n)],
        C.ERROR: [f"broken {k}" if k in errors else None for k in range(n)],
    })  # fmt: skip


@pytest.mark.parametrize("statistics", [True, False])
def test_read_back_counts_rows_and_errors(tmp_path, statistics):
    """With statistics (every file we write) only footers are read; without, the column."""
    out = tmp_path / "out"
    (out / "dt=1").mkdir(parents=True)
    pq.write_table(
        rows(10, {2, 7}), out / "dt=1" / "a.parquet", row_group_size=4, write_statistics=statistics
    )
    pq.write_table(rows(5, set()), out / "b.parquet", write_statistics=statistics)
    pq.write_table(rows(3, {0}), out / "_staging-x.parquet")  # readers skip it; so do the counts
    written = sinks.get("parquet").read_back(str(out))
    assert (written.rows, written.ok, written.errors) == (15, 13, 2)
    assert len(written.files) == 2


def test_an_unknown_output_format_is_one_line():
    with pytest.raises(sinks.OutputError, match="unknown output format 'delta'; choose one of parquet"):
        sinks.get("delta")
