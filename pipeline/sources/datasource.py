"""The shards as a Ray Data datasource: read tasks made lazily, each reading a few shards.

``ray.data.from_items`` with one block per shard put every block into the object store
from the driver, one at a time, before any work started: 15-20 s at 10,000 shards and
150-230 s at 100,000 (bench/README.md, "Scale"). A ``Datasource`` only describes its read
tasks; Ray Data asks for them when the execution starts and ships each its own shards.
Imported by the driver's run code, not by ``pipeline.sources`` (the readers run without Ray).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence

from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import efficiency
from pipeline.bulk import bulk
from pipeline.sources.base import Shard
from pipeline.sources.registry import read_shard

# Shards per read task, at most: Ray Data asks for a parallelism (about 200 by default);
# more tasks than that are made for more shards, so that a task stays a few shards long
# (a retry redoes little) and a large cluster has a task for each of its CPUs.
SHARDS_PER_TASK = 4


class ShardDatasource(Datasource):
    """Rows of (id, source, bytes, error) from ``shards``, in read tasks of a few shards each."""

    def __init__(
        self,
        shards: Sequence[Shard],
        image_column: str = "image",
        id_column: str = "id",
        storage_options: dict | None = None,
        stats=None,
    ):
        super().__init__()
        self._shards = list(shards)
        self._read = functools.partial(
            _read_shards,
            image_column=image_column,
            id_column=id_column,
            storage_options=storage_options,
            stats=stats,
        )

    def get_name(self) -> str:
        return "Shards"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(s.size for s in self._shards)

    @bulk
    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        tasks = tasks_for(len(self._shards), parallelism)
        out = []
        for group in split(self._shards, tasks):
            meta = BlockMetadata(num_rows=None, size_bytes=sum(s.size for s in group), exec_stats=None)
            out.append(ReadTask(functools.partial(self._read, tuple(group)), meta))
        return out


def tasks_for(shards: int, parallelism: int) -> int:
    """How many read tasks for ``shards``: Ray Data's parallelism, more for many shards."""
    if shards == 0:
        return 0
    return min(shards, max(parallelism, 1, -(-shards // SHARDS_PER_TASK)))


def split(items: Sequence, parts: int) -> list[Sequence]:
    """``items`` in ``parts`` contiguous groups whose sizes differ by one at most."""
    size, extra = divmod(len(items), parts) if parts else (0, 0)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def _read_shards(group: tuple[Shard, ...], *, image_column, id_column, storage_options, stats) -> Iterator:
    for shard in group:
        tables = read_shard(shard, image_column, id_column, storage_options)
        while True:
            start, t0 = time.time(), time.perf_counter()
            table = next(tables, None)
            if table is None:
                break
            efficiency.tell(stats, "read", table.num_rows, start, t0)
            yield table
