"""Stage 1: input URI + format → shards → rows of (id, source, bytes).

Listing runs on the driver with fsspec (one recursive LIST per prefix on object stores,
no HEAD per object) and fails early with one clear line. Reading runs in Ray tasks:
``read_shards`` turns one *shard* (a tar, a Parquet file, or a chunk of image files)
into rows, streaming.

Why not ``ray.data.read_webdataset`` / ``read_parquet`` / ``read_binary_files``: the
output contract needs one row per input image even when a whole shard is unreadable,
ids of the form ``<file>#<row>`` for Parquet without an id column, and a per-shard
record (URI, size) that the nightly job keys its bookkeeping on. One small reader per
format, on the same fsspec file systems, gives all three.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import columns as C
from pipeline.decode import IMAGE_EXTENSIONS
from pipeline.errors import BadInputError
from pipeline.storage import is_hidden, redact, url_to_fs

FORMATS = ("auto", "images", "webdataset", "parquet")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTENSIONS = (".parquet", ".pq")

# Image files per read task for folders: enough to amortise a task, small enough to spread.
FILES_PER_SHARD = 64
# Rows per batch that a reader yields; bounds a reader's memory on large shards.
ROWS_PER_BATCH = 64

READ_SCHEMA = pa.schema(
    [
        pa.field(C.ID, pa.string()),
        pa.field(C.SOURCE, pa.string()),
        pa.field(C.BYTES, pa.binary()),
        pa.field(C.ERROR, pa.string()),
    ]
)


log = logging.getLogger(__name__)


class InputError(BadInputError):
    """The input cannot be listed, is empty, or is of an unknown format."""


@dataclass(frozen=True)
class Shard:
    """One unit of reading: a tar, a Parquet file, or a chunk of image files."""

    format: str
    root: str  # the input root, for ids relative to it
    uris: tuple[str, ...]
    size: int  # bytes, from the listing


@dataclass(frozen=True)
class Listing:
    format: str
    root: str
    files: tuple[tuple[str, int], ...]  # (uri, size)
    skipped: int  # files under the root that are not of the format
    versions: dict[str, str] = field(default_factory=dict, compare=False)  # uri → size:ETag|mtime

    def only(self, uris: set[str]) -> Listing:
        """The same listing restricted to ``uris`` (for incremental runs)."""
        files = tuple(f for f in self.files if f[0] in uris)
        return replace(self, files=files, versions={u: self.versions[u] for u, _ in files})


def expand_braces(pattern: str) -> list[str]:
    """WebDataset-style brace expansion: ``shard-{000..009}.tar``, ``{a,b}.tar``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def _without_query(uri: str) -> str:
    """An HTTP(S) URL without its query string (a presigned URL's credentials)."""
    return uri.split("?", 1)[0] if uri.lower().startswith(("http://", "https://")) else uri


def _has_ext(path: str, exts: tuple[str, ...]) -> bool:
    return _without_query(path).lower().endswith(exts)


def list_input(uri: str, fmt: str = "auto", storage_options: dict | None = None) -> Listing:
    """Lists the input files and settles the format.

    Raises:
        InputError: nothing there, nothing of the format, or an unknown format.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fs, _ = url_to_fs(expand_braces(uri)[0], storage_options)
    found: dict[str, int] = {}
    versions: dict[str, str] = {}
    root = None
    # A name that exists is taken literally: "img[1].jpg" or "{a}.tar" is a file, not a pattern.
    literal = any(ch in uri for ch in "*?[{") and _exists(fs, fs._strip_protocol(uri))
    for pattern in [uri] if literal else expand_braces(uri):
        path = fs._strip_protocol(pattern)
        try:
            if not literal and any(ch in path for ch in "*?["):
                hits = fs.glob(path, detail=True)
                base = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0]
                entries = {p: d for p, d in hits.items() if d.get("type") != "directory"}
            elif fs.isdir(path):
                base = path.rstrip("/")
                entries = fs.find(path, detail=True)
            else:
                info = fs.info(path)
                base = path.rsplit("/", 1)[0]
                entries = {path: info}
        except FileNotFoundError:
            raise InputError(f"input not found: {pattern}") from None
        except PermissionError as e:
            raise InputError(f"input not readable: {pattern} ({e})") from None
        root = root if root is not None else base
        for p, d in entries.items():
            if not is_hidden(p[len(base) :] if p.startswith(base) else p.rsplit("/", 1)[-1]):
                found[p] = int(d.get("size") or 0)
                versions[p] = _version(d)
    if not found:
        raise InputError(f"input is empty: {uri}")

    fmt = _detect(found, uri) if fmt == "auto" else fmt
    exts = {
        "images": IMAGE_EXTENSIONS,
        "webdataset": TAR_EXTENSIONS,
        "parquet": PARQUET_EXTENSIONS,
    }[fmt]
    keep = [p for p in sorted(found) if _has_ext(p, exts)]
    if not keep:
        raise InputError(f"no {fmt} files ({', '.join(exts)}) under {uri}")
    return Listing(
        fmt,
        fs.unstrip_protocol(root),
        tuple((fs.unstrip_protocol(p), found[p]) for p in keep),
        skipped=len(found) - len(keep),
        versions={fs.unstrip_protocol(p): versions[p] for p in keep},
    )


def _exists(fs, path: str) -> bool:
    try:
        return fs.exists(path)
    except Exception:
        return False


def _version(info: dict) -> str:
    """What tells one version of a file from the next: size plus ETag (object stores) or mtime."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{int(info.get('size') or 0)}:{str(tag).strip(chr(34))}"


def _detect(found: dict[str, int], uri: str) -> str:
    counts = {
        "webdataset": sum(_has_ext(p, TAR_EXTENSIONS) for p in found),
        "parquet": sum(_has_ext(p, PARQUET_EXTENSIONS) for p in found),
        "images": sum(_has_ext(p, IMAGE_EXTENSIONS) for p in found),
    }
    if counts["webdataset"] and counts["parquet"]:
        raise InputError(f"{uri} mixes tar shards and Parquet files; pass --format")
    for fmt in ("webdataset", "parquet", "images"):
        if counts[fmt]:
            return fmt
    raise InputError(f"no image files, tar shards or Parquet files under {uri}")


def shards(listing: Listing) -> list[Shard]:
    """Groups the listing into read units: one per tar or Parquet file, chunks of images."""
    if listing.format != "images":
        return [Shard(listing.format, listing.root, (u,), s) for u, s in listing.files]
    out = []
    for i in range(0, len(listing.files), FILES_PER_SHARD):
        chunk = listing.files[i : i + FILES_PER_SHARD]
        out.append(Shard("images", listing.root, tuple(u for u, _ in chunk), sum(s for _, s in chunk)))
    return out


def relative_id(uri: str, root: str) -> str:
    uri, root = _without_query(uri), _without_query(root).rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else uri.rsplit("/", 1)[-1]


def read_shard(
    shard: Shard,
    image_column: str = "image",
    id_column: str = "id",
    storage_options: dict | None = None,
) -> Iterator[pa.Table]:
    """Yields tables of READ_SCHEMA; a row has bytes, or an error saying why it has none."""
    fs, _ = url_to_fs(shard.uris[0], storage_options)
    if shard.format == "images":
        rows = _image_rows(fs, shard)
    elif shard.format == "webdataset":
        rows = _tar_rows(fs, shard)
    else:
        rows = _parquet_rows(fs, shard, image_column, id_column)
    while batch := list(itertools.islice(rows, ROWS_PER_BATCH)):
        # ids and sources are stored in the output: never with a URI's credentials.
        yield pa.Table.from_pylist(
            [
                {C.ID: redact(rid), C.SOURCE: redact(src), C.BYTES: data, C.ERROR: error}
                for rid, src, data, error in batch
            ],
            schema=READ_SCHEMA,
        )


Row = tuple  # (id, source, bytes | None, error | None)


def _image_rows(fs, shard: Shard) -> Iterator[Row]:
    paths = [fs._strip_protocol(u) for u in shard.uris]
    # cat_ranges fetches whole files, concurrently on object stores, and takes each path
    # literally (cat() would read "img[1].jpg" as a glob pattern).
    data = fs.cat_ranges(paths, None, None, on_error="return")
    for uri, value in zip(shard.uris, data, strict=True):
        rid = relative_id(uri, shard.root)
        if isinstance(value, BaseException):
            yield rid, uri, None, f"cannot read file: {type(value).__name__}: {value}"[:300]
        else:
            yield rid, uri, bytes(value), None


# WebDataset's rule (webdataset.tariterators): a member's key is its path up to the first
# dot of its file name, which must not be empty. Unlike WebDataset's own pattern, the part
# before that dot may not hold a "/" (which made "photos/._x.jpg" the key "photos/").
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$")


def _split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member, as WebDataset splits it; None for a name it skips
    (no extension, or an empty key such as macOS's ``._photo.jpg``)."""
    match = _KEY_EXT.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def _pick_image(members: dict[str, bytes]) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        if ext.lstrip(".") in members:
            return ext.lstrip(".")
    return None


def _tar_rows(fs, shard: Shard) -> Iterator[Row]:
    """Samples of a tar shard (plain, gzip, bzip2 or xz), in order.

    Regular files and hard links (followed within the tar) are members; directories,
    symbolic links, devices and names WebDataset skips are counted and logged, never rows.
    """
    uri = shard.uris[0]
    key, members = None, {}

    def emit(key, members):
        ext = _pick_image(members)
        if ext is None:
            have = ", ".join(sorted(members)) or "nothing"
            return key, uri, None, f"sample has no image member (has {have})"
        return key, uri, members[ext], None

    seen = skipped = 0
    try:
        # Random access ("r:*", not the stream mode "r|*"): a hard link reads its target's
        # data, which comes earlier in the tar. Members are still read in order.
        with fs.open(fs._strip_protocol(uri), "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for info in tar:
                split = _split_key(info.name) if info.isfile() or info.islnk() else None
                if split is None:
                    skipped += 1
                    continue
                k, ext = split
                if k != key and key is not None:
                    seen += 1
                    yield emit(key, members)
                    members = {}
                key = k
                members[ext] = tar.extractfile(info).read()
            if key is not None:
                seen += 1
                yield emit(key, members)
    except Exception as e:
        # The rest of the shard is unreadable: one row stands for it, so nothing vanishes.
        yield (
            f"{relative_id(uri, shard.root)}#after-{seen}",
            uri,
            None,
            (f"unreadable tar shard after {seen} samples: {type(e).__name__}: {e}"[:300]),
        )
    if skipped:
        log.warning(
            "%s: %d tar members skipped (not files, or not WebDataset sample names)", redact(uri), skipped
        )


def _parquet_rows(fs, shard: Shard, image_column: str, id_column: str) -> Iterator[Row]:
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
