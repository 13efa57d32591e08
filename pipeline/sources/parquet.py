"""Parquet files with image bytes: one row per table row; a broken file or row group
costs its own rows (as error rows), never the run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sources.base import ROWS_PER_BATCH, Format, Row, Shard, relative_id

PARQUET_EXTENSIONS = (".parquet", ".pq")


def read(fs, shard: Shard, image_column: str = "image", id_column: str = "id", **_) -> Iterator[Row]:
    """Rows of a Parquet file. A file that cannot be opened is one error row; a file whose
    image column is missing or of another layout gives one error row per image it holds
    (its footer says how many), and a row group that breaks while being read one per image
    of the rest of that group. The run goes on."""
    uri = shard.uris[0]
    name = relative_id(uri, shard.root)
    try:
        f = fs.open(fs._strip_protocol(uri), "rb")
        pf = pq.ParquetFile(f)
        total = pf.metadata.num_rows
    except Exception as e:
        yield name, uri, None, f"unreadable Parquet file: {type(e).__name__}: {e}"[:300]
        return
    with f:
        names = pf.schema_arrow.names
        problem = _image_column_problem(pf.schema_arrow, image_column)
        if problem:
            for row in range(total):
                yield f"{name}#{row}", uri, None, problem
            return
        has_ids = id_column in names
        cols = [image_column] + ([id_column] if has_ids else [])
        row = 0
        # Row group by row group: a broken one costs its own rows (as error rows), not the file's.
        for group in range(pf.num_row_groups):
            end = row + pf.metadata.row_group(group).num_rows
            try:
                for batch in pf.iter_batches(
                    batch_size=ROWS_PER_BATCH, row_groups=[group], columns=cols, use_threads=False
                ):
                    images = batch.column(image_column)
                    if pa.types.is_struct(images.type):  # Hugging Face datasets Image(): {bytes, path}
                        images = images.field("bytes")
                    ids = [None] * batch.num_rows
                    if has_ids:
                        with contextlib.suppress(pa.ArrowException):  # ids of a type without text
                            ids = batch.column(id_column).cast(pa.string()).to_pylist()
                    for data, rid in zip(images.to_pylist(), ids, strict=True):
                        rid = rid if rid is not None else f"{name}#{row}"
                        row += 1
                        if data is None:
                            yield rid, uri, None, "no image bytes (null)"
                        else:
                            yield rid, uri, data, None
            except Exception as e:
                reason = f"unreadable Parquet row group {group} after row {row}: {type(e).__name__}: {e}"
                for r in range(row, end):
                    yield f"{name}#{r}", uri, None, reason[:300]
            row = end


def _image_column_problem(schema: pa.Schema, image_column: str) -> str | None:
    """Why ``image_column`` cannot hold image bytes in a file of ``schema``, or None."""
    if image_column not in schema.names:
        return f"no column {image_column!r} in this file"
    t = schema.field(image_column).type
    if pa.types.is_struct(t):
        if t.get_field_index("bytes") < 0:
            return f"column {image_column!r} is a struct without a 'bytes' field ({t})"
        t = t.field("bytes").type
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        return f"column {image_column!r} holds {t}, not image bytes (binary)"
    return None


FORMAT = Format("parquet", PARQUET_EXTENSIONS, read, container=True, noun="Parquet files")
