"""WebDataset tar shards: one row per sample (members grouped by key), its image member."""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Iterator

from pipeline.sources.base import Format, Row, Shard, relative_id
from pipeline.sources.images import IMAGE_EXTENSIONS
from pipeline.storage import redact

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")

log = logging.getLogger(__name__)

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


def read(fs, shard: Shard, **_) -> Iterator[Row]:
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


FORMAT = Format("webdataset", TAR_EXTENSIONS, read, container=True, noun="tar shards")
