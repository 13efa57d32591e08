"""Stage 1: input URI + format → shards → rows of (id, source, bytes).

Listing runs on the driver with fsspec (``listing``) and fails early with one clear line.
Reading runs in Ray tasks: ``read_shard`` turns one *shard* (a tar, a Parquet file, or a
chunk of image files) into rows, streaming, with the reader the registry holds for the
shard's format. One module per format (``images``, ``webdataset``, ``parquet``); a new
format is one more module and one ``register(...)`` line in ``registry``.

Why not ``ray.data.read_webdataset`` / ``read_parquet`` / ``read_binary_files`` (or a
``FileBasedDatasource`` of our own): the output contract needs one row per input image
even when a whole shard is unreadable, ids of the form ``<file>#<row>`` for Parquet
without an id column, and a per-shard record (URI, size, version) from our own
LIST-only listing that the nightly job keys its bookkeeping on. One small reader per
format, on the same fsspec file systems, gives all three.
"""

from pipeline.sources.base import READ_SCHEMA, ROWS_PER_BATCH, Format, InputError, Row, Shard, relative_id
from pipeline.sources.images import IMAGE_EXTENSIONS
from pipeline.sources.listing import FILES_PER_SHARD, Listing, expand_braces, list_input, shards
from pipeline.sources.parquet import PARQUET_EXTENSIONS
from pipeline.sources.registry import formats, lookup, read_shard, register, unregister
from pipeline.sources.webdataset import TAR_EXTENSIONS

__all__ = [
    "FILES_PER_SHARD",
    "IMAGE_EXTENSIONS",
    "PARQUET_EXTENSIONS",
    "READ_SCHEMA",
    "ROWS_PER_BATCH",
    "TAR_EXTENSIONS",
    "Format",
    "InputError",
    "Listing",
    "Row",
    "Shard",
    "expand_braces",
    "formats",
    "list_input",
    "lookup",
    "read_shard",
    "register",
    "relative_id",
    "shards",
    "unregister",
]
