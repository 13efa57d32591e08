"""What every format module shares: the shard, the format record, the row and its id."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from pipeline import columns as C
from pipeline.errors import BadInputError

# Rows per batch that a reader yields; bounds a reader's memory on large shards.
ROWS_PER_BATCH = 64

READ_SCHEMA = pa.schema(
    [
        pa.field(C.ID, pa.string()),
        pa.field(C.SOURCE, pa.string()),
        pa.field(C.BYTES, pa.binary()),
        pa.field(C.ERROR, pa.string()),
        pa.field(C.SOURCE_VERSION, pa.string()),
    ]
)

Row = tuple  # (id, source, bytes | None, error | None)


class InputError(BadInputError):
    """The input cannot be listed, is empty, or is of an unknown format."""


@dataclass(frozen=True)
class Shard:
    """One unit of reading: a tar, a Parquet file, or a chunk of image files."""

    format: str
    root: str  # the input root, for ids relative to it
    uris: tuple[str, ...]
    size: int  # bytes, from the listing
    versions: tuple[str, ...] = ()  # each file's version (size:ETag|mtime), from the listing

    def version_of(self, uri: str) -> str | None:
        """The listed version of ``uri``, one of this shard's files (None: not known)."""
        if not self.versions:
            return None
        return self.versions[self.uris.index(uri)] if len(self.uris) > 1 else self.versions[0]


@dataclass(frozen=True)
class Format:
    """An input format, as the registry knows it.

    ``read(fs, shard, **options)`` yields one Row per image of the shard, an error row
    for what cannot be read (never raising past it); ``options`` are ``image_column``
    and ``id_column``, which a reader ignores if they mean nothing to it.
    ``container``: each file holds many images and is a shard of its own (a tar, a
    Parquet file), and wins over loose files in auto detection; otherwise each file is
    one image and ``FILES_PER_SHARD`` files make a shard.
    ``noun`` names the files in messages ("tar shards").
    """

    name: str
    extensions: tuple[str, ...]
    read: Callable[..., Iterator[Row]]
    container: bool = False
    noun: str = ""

    @property
    def files(self) -> str:
        return self.noun or f"{self.name} files"


def without_query(uri: str) -> str:
    """An HTTP(S) URL without its query string (a presigned URL's credentials)."""
    return uri.split("?", 1)[0] if uri.lower().startswith(("http://", "https://")) else uri


def has_ext(path: str, exts: tuple[str, ...]) -> bool:
    return without_query(path).lower().endswith(exts)


def relative_id(uri: str, root: str) -> str:
    uri, root = without_query(uri), without_query(root).rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else uri.rsplit("/", 1)[-1]
