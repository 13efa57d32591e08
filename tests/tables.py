"""Rows of the output contract and tables built from them, without Ray: what the write
tasks would write (``sinks.write_file``), committed by the real ``Transaction``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline import columns as C
from pipeline import sinks

FINGERPRINT = "resnet18 none 0123456789ab"


def rows(source: str, n: int, *, version: str = "1:a", fingerprint: str = FINGERPRINT, errors: int = 0,
         dim: int = 4, start: int = 0) -> pa.Table:  # fmt: skip
    """``n`` rows of input ``source`` (task features), the first ``errors`` of them error rows."""
    ids = [f"{source.rsplit('/', 1)[-1].split('.')[0]}/{start + i:03d}" for i in range(n)]
    errs = [f"broken {i}" if i < errors else None for i in range(n)]
    good = n - min(errors, n)
    emb = np.arange(good * dim, dtype=np.float32).reshape(good, dim) + start
    return C.to_table(
        "features", ids, [source] * n, errs, model="resnet18", weights="none", embeddings=emb,
        source_versions=[version] * n, fingerprint=fingerprint, schema=C.output_schema("features", dim),
    )  # fmt: skip


def write(table: sinks.Table, data: pa.Table, name: str, partition: str | None = None, carried=False):
    """One data file under the table root, as a write task writes it."""
    folder = f"{C.PARTITION}={partition}/" if partition is not None else ""
    values = {C.PARTITION: partition} if partition is not None else {}
    return sinks.write_file(data, table.arrow_fs, table.path, f"{folder}{name}", values, carried)


def commit(uri: str, files_rows: list[tuple[str, pa.Table]], partition: str | None = None, run_id: str = "r",
           removes=(), carried_rows: int = 0, so=None) -> sinks.Committed:  # fmt: skip
    """Writes each (name, rows) as a file and commits them all as one run."""
    table = sinks.Table(uri, so)
    files = [write(table, data, name, partition) for name, data in files_rows]
    schema = files_rows[0][1].schema if files_rows else C.output_schema("features", 4)
    tx = table.transaction(
        run_id, schema, partition=partition, removes=list(removes), carried_rows=carried_rows,
        info={"command": "test"},
    )  # fmt: skip
    return tx.commit(files)


def read(uri: str, version: int | None = None, so=None) -> pa.Table:
    """What a reader gets: the snapshot's files, read with pyarrow."""
    t = sinks.Table(uri, so)
    if version is not None:
        t.load(version)
    if not t.exists:
        return pa.table({C.ID: pa.array([], pa.string()), C.SOURCE: pa.array([], pa.string())})
    import pyarrow.parquet as pq

    files = [t.abs(f.path) for f in t.files()]
    if not files:
        return pa.table({C.ID: pa.array([], pa.string()), C.SOURCE: pa.array([], pa.string())})
    return pq.read_table(files, filesystem=t.arrow_fs, partitioning=None, columns=[C.ID, C.SOURCE])


def columns(schema) -> list[tuple[str, str]]:
    """(name, type) of a schema's columns, as every reader of the table must see them: no
    nullability (Delta keeps every column nullable), lists by their value type."""
    return [
        (f.name, f"list<{f.type.value_type}>" if hasattr(f.type, "value_type") else str(f.type))
        for f in schema
    ]
