"""Stage 5 in Ray Data: the write tasks put data files under the table root, and the driver
commits them all at once.

``TableSink`` is a public ``ray.data.Datasink``: each write task writes its blocks as
Parquet files (``parquet.write_file``) where readers never look until a commit names them,
and returns what Delta records of each file; ``on_write_complete`` runs on the driver once
every task is done and makes the run's one commit (``delta.Transaction.commit``). Ray's own
``write_delta`` was measured against it and not taken (README, "Why our own datasink").

A night that replaces an input's rows also writes again the rows of other inputs that
shared a file with it (``kept_rows``): they flow through the same write tasks, keep their
``dt``, and the commit removes the old file as it adds the new ones.

Imported by the driver's run code only (it imports Ray).
"""

from __future__ import annotations

import time
from collections import defaultdict

from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from pipeline import columns as C
from pipeline import efficiency
from pipeline.sinks.parquet import DataFile, write_file


class TableSink(Datasink):
    """Writes a run's rows into ``tx``'s table and commits them in ``on_write_complete``.

    ``tx``: the run's ``delta.Transaction`` (driver only: never shipped to the tasks);
    ``stats``: the run's ``efficiency`` actor; ``before_commit``: called on the driver right
    before the commit (the run's stall watchdog stands down there); ``info``: called with
    the files to give the facts commitInfo adds (rows, errors, the error budget).
    """

    def __init__(self, tx, stats=None, before_commit=None, info=None):
        self.tx = tx
        self.root = tx.table.path
        self.fs = tx.table.arrow_fs
        self.run_id = tx.run_id
        self.partition = tx.partition
        self.stats = stats
        self.before_commit = before_commit
        self.info = info
        self.committed = None

    def __getstate__(self):
        # What a write task needs: not the transaction (it holds the table's Delta handle).
        state = dict(self.__dict__)
        state.update(tx=None, before_commit=None, info=None)
        return state

    def get_name(self) -> str:
        return "WriteTable"

    def write(self, blocks, ctx) -> list[DataFile]:
        files = []
        for i, block in enumerate(blocks):
            start, t0 = time.time(), time.perf_counter()
            table = BlockAccessor.for_block(block).to_arrow()
            if not table.num_rows:
                continue
            for part, rows, carried in self._partitions(table):
                folder = f"{C.PARTITION}={part}/" if part is not None else ""
                kept = "-kept" if carried else ""
                name = f"{folder}part-{self.run_id}-{ctx.task_idx:05d}-{i:04d}{kept}.parquet"
                values = {C.PARTITION: part} if part is not None else {}
                files.append(write_file(rows, self.fs, self.root, name, values, carried))
            new = table.num_rows if C.PARTITION not in table.column_names else 0
            efficiency.tell(self.stats, "write" if new else "carry", table.num_rows, start, t0)
        return files

    def _partitions(self, table):
        """(dt, rows without the dt column, kept?) of a block: a block of kept rows carries
        each row's own ``dt``; a block of new rows goes to the run's."""
        if C.PARTITION not in table.column_names:
            yield self.partition, table, False
            return
        import pyarrow.compute as pc

        values = table[C.PARTITION]
        rows = table.drop_columns([C.PARTITION])
        for part in pc.unique(values).to_pylist():
            mask = pc.is_null(values) if part is None else pc.equal(values, part)
            yield part, rows.filter(mask), True

    def on_write_complete(self, write_result) -> None:
        files = [f for r in write_result.write_returns if r for f in r]
        if self.before_commit is not None:
            self.before_commit()
        facts = self.info(files) if self.info is not None else None
        self.committed = self.tx.commit(files, write_result.num_rows, facts)


def kept_rows(table, removes, drop: set[str], stats=None, num_cpus: float = 0.5):
    """The rows of ``removes`` (files the commit replaces) that are not of the inputs
    ``drop``, as a Ray dataset with each row's ``dt``; None when there are none to keep."""
    import ray

    by_part: dict[str | None, list[str]] = defaultdict(list)
    for f in removes:
        by_part[f.partition].append(table.abs(f.path))
    parts = []
    for part, paths in sorted(by_part.items(), key=lambda kv: str(kv[0])):
        ds = ray.data.read_parquet(paths, filesystem=table.arrow_fs, partitioning=None, num_cpus=num_cpus)
        parts.append(
            ds.map_batches(
                _keep,
                batch_format="pyarrow",
                batch_size=None,
                num_cpus=num_cpus,
                fn_kwargs={"drop": sorted(drop), "partition": part},
            )
        )
    if not parts:
        return None
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _keep(table, *, drop: list[str], partition: str | None):
    import pyarrow as pa
    import pyarrow.compute as pc

    kept = table.filter(pc.invert(pc.is_in(table[C.SOURCE], value_set=pa.array(drop, pa.string()))))
    return kept.append_column(C.PARTITION, pa.array([partition] * kept.num_rows, pa.string()))
