"""Folders of image files: one row per file, read whole."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.sources.base import Format, Row, Shard, relative_id

# Extensions of the image files read from folders and picked out of WebDataset samples.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read(fs, shard: Shard, **_) -> Iterator[Row]:
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


FORMAT = Format("images", IMAGE_EXTENSIONS, read, noun="image files")
