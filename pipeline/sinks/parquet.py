"""One data file of the table: Parquet (zstd), provenance in its footer, and what Delta
records of it (size, row count, min/max and null counts) taken from the footer it wrote.

Plain pyarrow, no Ray: the write tasks call ``write_file``, and so can a test.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline import columns as C

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

COMPRESSION = "zstd"
# Row groups of about this many bytes: a reader holds one at a time. (pyarrow's default
# of a million rows would make one row group of 8 GB of 2048-d embeddings.)
ROW_GROUP_BYTES = 128 << 20


@dataclass(frozen=True)
class DataFile:
    """A written data file, as the commit adds it (paths relative to the table root)."""

    path: str
    size: int
    partition: dict[str, str] = field(default_factory=dict)  # partition column → value
    rows: int = 0
    errors: int = 0  # rows with an error (status "error")
    stats: str = "{}"  # Delta's per-file statistics, JSON
    modified_ms: int = 0
    carried: bool = False  # rows kept from a file the commit replaces, not new ones


def write_file(
    table: pa.Table, fs: pafs.FileSystem, root: str, path: str, partition=None, carried: bool = False
) -> DataFile:
    """Writes ``table`` to ``<root>/<path>`` on the pyarrow file system ``fs``."""
    import pyarrow.parquet as pq

    per_row = max(1, table.nbytes // max(1, table.num_rows))
    collected: list = []
    folder = f"{root}/{path}".rsplit("/", 1)[0]
    fs.create_dir(folder, recursive=True)  # on object stores, no request
    with fs.open_output_stream(f"{root}/{path}") as out:
        with pq.ParquetWriter(
            out, table.schema, compression=COMPRESSION, metadata_collector=collected
        ) as writer:
            writer.write_table(table, row_group_size=max(1, ROW_GROUP_BYTES // per_row))
        size = out.tell()
    meta = collected[0]
    rows, stats = delta_stats(meta)
    nulls = stats["nullCount"].get(C.ERROR)
    errors = rows - nulls if nulls is not None else _errors(table)
    return DataFile(
        path=path,
        size=size,
        partition=dict(partition or {}),
        rows=rows,
        errors=errors,
        stats=json.dumps(stats, separators=(",", ":")),
        modified_ms=int(time.time() * 1000),
        carried=carried,
    )


def delta_stats(meta) -> tuple[int, dict]:
    """(rows, Delta's stats) of a Parquet footer: ``numRecords``, and ``minValues``,
    ``maxValues`` and ``nullCount`` of each top-level column of a plain type whose every row
    group has statistics (readers skip files with them; nested columns get none)."""
    mins: dict = {}
    maxs: dict = {}
    nulls: dict = {}
    for i in range(meta.num_columns):
        column = meta.schema.column(i)
        if "." in column.path:
            continue  # nested (the lists): no statistics of their own in Delta
        groups = [meta.row_group(g).column(i).statistics for g in range(meta.num_row_groups)]
        if not groups or any(s is None for s in groups):
            continue
        if all(s.has_null_count for s in groups):
            nulls[column.path] = sum(s.null_count for s in groups)
        have = [s for s in groups if s.has_min_max]
        if have and len(have) == len([s for s in groups if s.num_values]):
            lo, hi = min(s.min for s in have), max(s.max for s in have)
            if _jsonable(lo) and _jsonable(hi):
                mins[column.path], maxs[column.path] = lo, hi
    return meta.num_rows, {
        "numRecords": meta.num_rows,
        "minValues": mins,
        "maxValues": maxs,
        "nullCount": nulls,
    }


def _jsonable(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int))


def _errors(table: pa.Table) -> int:
    if C.STATUS not in table.column_names:
        return 0
    import pyarrow.compute as pc

    return pc.sum(pc.equal(table[C.STATUS], C.STATUS_ERROR)).as_py() or 0
