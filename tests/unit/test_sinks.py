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


def test_carry_keeps_the_other_inputs_rows_schema_and_footer(tmp_path):
    """How a changed input is replaced in a file it shares: the others' rows, copied as they are."""
    n = 10
    table = rows(n, {3}).append_column(C.SOURCE, pa.array([f"s3://b/{k % 3}.tar" for k in range(n)]))
    table = table.replace_schema_metadata({b"pipeline.model": b"resnet18"})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=4)
    sink = sinks.get("parquet")
    kept = sink.carry(
        str(tmp_path / "f.parquet"), str(tmp_path / "g.parquet"), {"s3://b/1.tar"}, str(tmp_path)
    )
    out = pq.read_table(tmp_path / "g.parquet")
    assert kept == out.num_rows == 7
    assert out[C.ID].to_pylist() == [f"i{k}" for k in range(n) if k % 3 != 1]
    assert out.schema == table.schema and out.schema.metadata[b"pipeline.model"] == b"resnet18"
    written = sink.read_back(str(tmp_path))  # both files: f (10 rows, 1 error) and g (7, 1)
    assert (written.rows, written.errors) == (17, 2)


def test_rows_per_source_counts_each_input_in_each_file(tmp_path):
    sink = sinks.get("parquet")
    paths = []
    for name, n in (("f", 10), ("g", 4)):
        t = rows(n, {0, 3}).append_column(C.SOURCE, pa.array([f"s{k % 2}" for k in range(n)]))
        pq.write_table(t, tmp_path / f"{name}.parquet")
        paths.append(str(tmp_path / f"{name}.parquet"))
    got = sink.rows_per_source(paths, str(tmp_path)).sort_by([("file", "ascending"), ("source", "ascending")])
    assert got.schema == sinks.counts_schema()
    assert [(r["file"][-9:], r["source"], r["rows"], r["errors"]) for r in got.to_pylist()] == [
        ("f.parquet", "s0", 5, 1), ("f.parquet", "s1", 5, 1),
        ("g.parquet", "s0", 2, 1), ("g.parquet", "s1", 2, 1),
    ]  # fmt: skip
    assert sink.rows_per_source([], str(tmp_path)).num_rows == 0
