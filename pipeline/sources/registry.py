"""The formats by name, and ``read_shard``, which dispatches through them.

A new format is a module with a ``Format`` and one ``register(...)`` line. The order of
registration is the order of auto detection (among containers, then among loose files)
and of the names in messages.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pyarrow as pa

from pipeline import columns as C
from pipeline.sources import images, parquet, webdataset
from pipeline.sources.base import READ_SCHEMA, ROWS_PER_BATCH, Format, InputError, Shard, relative_id
from pipeline.storage import redact, url_to_fs

AUTO = "auto"  # not a format: detect one from the files' extensions
_FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name == AUTO or fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    _FORMATS.pop(name, None)


def formats() -> tuple[Format, ...]:
    return tuple(_FORMATS.values())


def lookup(name: str) -> Format:
    """The format called ``name``.

    Raises:
        InputError: no such format.
    """
    if name not in _FORMATS:
        choices = ", ".join([AUTO, *_FORMATS])
        raise InputError(f"unknown format {name!r}; choose one of {choices}")
    return _FORMATS[name]


register(images.FORMAT)
register(webdataset.FORMAT)
register(parquet.FORMAT)


def _every_file_has_a_row(shard: Shard, rows: Iterator) -> Iterator:
    """``rows``, then one error row for each file of the shard that gave none (an empty tar
    or Parquet file): every input is in the output, so the nightly job knows it is done,
    and a reader can see that it held no image."""
    seen = set()
    for row in rows:
        seen.add(row[1])
        yield row
    for uri in shard.uris:
        if uri not in seen:
            yield (
                relative_id(uri, shard.root),
                uri,
                None,
                f"no images in this {lookup(shard.format).files[:-1]}",
            )


def read_shard(
    shard: Shard,
    image_column: str = "image",
    id_column: str = "id",
    storage_options: dict | None = None,
) -> Iterator[pa.Table]:
    """Yields tables of READ_SCHEMA; a row has bytes, or an error saying why it has none.

    Each row carries its file's listed version: the nightly job finds it in the table."""
    read = lookup(shard.format).read
    fs, _ = url_to_fs(shard.uris[0], storage_options)
    rows = _every_file_has_a_row(shard, read(fs, shard, image_column=image_column, id_column=id_column))
    while batch := list(itertools.islice(rows, ROWS_PER_BATCH)):
        # ids and sources are stored in the output: never with a URI's credentials.
        yield pa.Table.from_pylist(
            [
                {C.ID: redact(rid), C.SOURCE: redact(src), C.BYTES: data, C.ERROR: error,
                 C.SOURCE_VERSION: shard.version_of(src)}
                for rid, src, data, error in batch
            ],
            schema=READ_SCHEMA,
        )  # fmt: skip
