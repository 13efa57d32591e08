"""A format that exists only in the tests: a ``.fake`` file is a text file naming image
files next to it, one a line. A sample is ``<list>#<name>``; a name that cannot be read
is an error row. All a new format needs is a module like this one and one
``register(FORMAT)`` line."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.sources import Format, Row, Shard, relative_id


def read(fs, shard: Shard, **_) -> Iterator[Row]:
    for uri in shard.uris:
        path = fs._strip_protocol(uri)
        folder, name = path.rsplit("/", 1)[0], relative_id(uri, shard.root)
        for line in fs.cat_file(path).decode().split():
            try:
                yield f"{name}#{line}", uri, fs.cat_file(f"{folder}/{line}"), None
            except OSError as e:
                yield f"{name}#{line}", uri, None, f"cannot read {line}: {type(e).__name__}"


FORMAT = Format("fake", (".fake",), read, container=True, noun="fake lists")
