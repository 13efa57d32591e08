"""Parquet out: the explicit schema, provenance in the footers, zero-padded file names.

Ray Data's own Parquet datasink writes the files, with our schema and file names; the
driver counts rows from the write result and from the footers, never by reading the rows.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from pipeline import columns as C
from pipeline.sinks import Sink, Staged, Written, counts_schema
from pipeline.storage import arrow_fs, url_to_fs

if TYPE_CHECKING:
    import pyarrow as pa

COMPRESSION = "zstd"


class ParquetSink(Sink):
    name = "parquet"
    extension = ".parquet"

    def write_staged(
        self, ds, staging: str, schema: pa.Schema, rows_per_file: int, storage_options=None, stats=None
    ) -> Staged:
        """Runs the dataset into Parquet under ``staging`` (a path readers skip).

        What Ray wrote and what the driver sees are counted separately: they differ when the
        workers wrote somewhere the driver does not look (a local path on another node).
        """
        import uuid

        import pyarrow.parquet as pq

        sink = _counting_parquet_datasink()(
            staging,
            filesystem=arrow_fs(staging, storage_options),
            arrow_parquet_args={"schema": schema, "compression": COMPRESSION},
            min_rows_per_file=rows_per_file,
            max_rows_per_file=rows_per_file,
            filename_provider=_filename_provider(),
            dataset_uuid=uuid.uuid4().hex,
        )
        sink.stats = stats  # the run's efficiency.Stats actor: each write task tells of its rows
        # Blocks of exactly rows_per_file rows (the last one fewer): a write task's rows were
        # "at least" rows_per_file, so each full file came with a fragment (100,000 + 32).
        ds = ds.repartition(target_num_rows_per_block=rows_per_file, strict=True)
        ds.write_datasink(sink)
        fs, path = url_to_fs(staging, storage_options)
        fs.invalidate_cache()
        files = sorted(p for p in fs.find(path) if p.endswith(self.extension)) if fs.exists(path) else []
        afs = arrow_fs(staging, storage_options)
        visible = sum(pq.read_metadata(f, filesystem=afs).num_rows for f in files)
        return Staged(files, sink.rows, visible, ds)

    def read_back(self, uri: str, storage_options: dict | None = None) -> Written:
        """Counts what a Parquet reader sees under ``uri`` (names starting with _ or . are not data),
        from the files' footers: rows, and error rows as the non-null ``error`` values."""
        fs, path = url_to_fs(uri, storage_options)
        files = sorted(p for p in fs.find(path) if self.is_data(p[len(path) :]))
        afs = arrow_fs(uri, storage_options)
        rows = errors = 0
        for f in files:
            n, e = _footer_counts(f, afs)
            rows, errors = rows + n, errors + e
        return Written(tuple(fs.unstrip_protocol(p) for p in files), rows, rows - errors, errors)

    def rows_per_source(self, files: list[str], uri: str, storage_options=None):
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        fs = arrow_fs(uri, storage_options)
        parts = []
        for path in files:
            t = pq.read_table(path, columns=[C.SOURCE, C.STATUS], filesystem=fs)
            bad = pc.cast(pc.not_equal(t[C.STATUS], C.STATUS_OK), pa.int64())
            g = (
                pa.table({"source": t[C.SOURCE], "bad": bad})
                .group_by("source")
                .aggregate([("bad", "count"), ("bad", "sum")])
            )
            parts.append(
                pa.table({"file": pa.array([path] * g.num_rows, pa.string()), "source": g["source"],
                          "rows": g["bad_count"].cast(pa.int64()), "errors": g["bad_sum"].cast(pa.int64())})
            )  # fmt: skip
        return pa.concat_tables(parts) if parts else counts_schema().empty_table()

    def carry(self, src: str, dst: str, drop, uri: str, storage_options=None) -> int:
        """Streams ``src`` a row group at a time: the driver holds one, whatever the file's size."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        fs = arrow_fs(uri, storage_options)
        dropped = pa.array(sorted(drop), pa.string())
        kept = 0
        with fs.open_input_file(src) as raw:
            f = pq.ParquetFile(raw)
            with pq.ParquetWriter(dst, f.schema_arrow, filesystem=fs, compression=COMPRESSION) as out:
                for g in range(f.num_row_groups):
                    t = f.read_row_group(g)
                    t = t.filter(pc.invert(pc.is_in(t[C.SOURCE], value_set=dropped)))
                    if t.num_rows:
                        out.write_table(t)
                        kept += t.num_rows
        return kept


def _footer_counts(path: str, filesystem) -> tuple[int, int]:
    """(rows, error rows) of one file from its footer; the column itself only when a row
    group has no statistics (files from elsewhere)."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path, filesystem=filesystem)
    column = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == C.ERROR)
    errors = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        stats = group.column(column).statistics
        if stats is None or not stats.has_null_count:
            table = pq.read_table(path, columns=[C.ERROR], filesystem=filesystem)
            return meta.num_rows, table.num_rows - table[C.ERROR].null_count
        errors += group.num_rows - stats.null_count
    return meta.num_rows, errors


def _filename_provider():
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        """``part-<task>-<write uuid>.parquet``: zero-padded, sortable, unique per run."""

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:06d}-{write_uuid}.parquet"

    return PartNames(file_format="parquet")


@functools.cache
def _counting_parquet_datasink():
    """Ray Data's Parquet datasink, keeping the row count of its write result on the driver."""
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink

    class CountingParquetDatasink(ParquetDatasink):
        rows = 0
        stats = None

        def write(self, blocks, ctx):
            import time

            from ray.data.block import BlockAccessor

            from pipeline.efficiency import tell

            start, t0 = time.time(), time.perf_counter()
            blocks = list(blocks)
            out = super().write(blocks, ctx)
            tell(self.stats, "write", sum(BlockAccessor.for_block(b).num_rows() for b in blocks), start, t0)
            return out

        def on_write_complete(self, write_result):
            super().on_write_complete(write_result)
            self.rows = write_result.num_rows

    return CountingParquetDatasink
