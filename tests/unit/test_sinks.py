"""One data file as the write tasks write it, and what Delta records of it (no Ray)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import columns as C
from pipeline.sinks import write_file
from pipeline.sinks.parquet import delta_stats


def test_a_data_file_is_zstd_with_its_footer_and_delta_statistics(tmp_path):
    meta = {"pipeline.model": "resnet18"}
    t = C.to_table(
        "both", ["b", "a", "c"], ["s3://x/1.tar"] * 3, [None, "broken", None], model="m", weights="none",
        topk_index=np.array([[1, 2], [3, 4]]), topk_score=np.array([[0.5, 0.25], [0.75, 0.125]], np.float32),
        categories=[str(i) for i in range(5)], embeddings=np.ones((2, 3), np.float32),
        source_versions=["7:e", "7:e", "7:e"], fingerprint="fp", schema=C.output_schema("both", 3, meta),
    )  # fmt: skip
    f = write_file(
        t, pafs.LocalFileSystem(), str(tmp_path), "dt=2026-11-01/part-x.parquet", {"dt": "2026-11-01"}
    )
    path = tmp_path / "dt=2026-11-01" / "part-x.parquet"
    assert (f.path, f.size, f.rows, f.errors) == ("dt=2026-11-01/part-x.parquet", path.stat().st_size, 3, 1)
    assert f.partition == {"dt": "2026-11-01"} and not f.carried
    stats = json.loads(f.stats)
    assert (
        stats["numRecords"] == 3
        and stats["nullCount"][C.ERROR] == 2
        and stats["nullCount"][C.CLASS_INDEX] == 1
    )
    assert (stats["minValues"][C.ID], stats["maxValues"][C.ID]) == ("a", "c")
    assert (stats["minValues"][C.SCORE], stats["maxValues"][C.SCORE]) == (0.5, 0.75)
    assert C.EMBEDDING not in stats["nullCount"] and C.TOPK_INDEX not in stats["minValues"]  # nested: none
    written = pq.ParquetFile(path)
    assert written.metadata.row_group(0).column(0).compression == "ZSTD"
    assert written.schema_arrow.metadata[b"pipeline.model"] == b"resnet18"
    assert written.schema_arrow.field(C.EMBEDDING).type == pa.list_(pa.float32())


def test_statistics_leave_out_what_json_cannot_hold_and_columns_without_them():
    """NaN scores have no JSON number; an all-null column has no min or max."""
    t = pa.table({"score": pa.array([float("nan"), 1.0], pa.float32()), "none": pa.nulls(2, pa.string())})
    sink = pa.BufferOutputStream()
    collected = []
    with pq.ParquetWriter(sink, t.schema, metadata_collector=collected) as w:
        w.write_table(t)
    rows, stats = delta_stats(collected[0])
    assert rows == 2 and stats["nullCount"] == {"score": 0, "none": 2}
    assert "none" not in stats["minValues"] and json.dumps(stats)
