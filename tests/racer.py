"""One side of a commit race (``tests/e2e/test_faults.py``): a process that, per race it is
sent, opens the table, plans a night from its snapshot with the pipeline's own planning,
writes the files as the write tasks would, waits for the other racer at a barrier, and
commits with the pipeline's own transaction. It answers what happened."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import incremental, sinks
from tests.tables import FINGERPRINT, rows, write

PARTITION = "2026-11-26"


def prepare(uri: str, so, versions: dict[str, str], worker: int):
    table = sinks.Table(uri, so)
    files = table.files()
    run = uuid.uuid4().hex[:8]  # file names are a run's own, as the write tasks' are
    night = incremental.plan(table.inputs(files), versions, FINGERPRINT, files)
    written = [
        write(
            table,
            rows(key, 3, version=versions[key]),
            f"part-{run}-{key.rsplit('/', 1)[-1]}.parquet",
            PARTITION,
        )
        for key in night.todo
    ]
    kept = night.kept
    if kept:  # the rows of other inputs in the files it replaces, written again
        for f in kept.files:
            t = pq.read_table(table.abs(f.path), filesystem=table.arrow_fs, partitioning=None)
            t = t.filter(pc.invert(pc.is_in(t["source"], value_set=pa.array(sorted(kept.drop), pa.string()))))
            written.append(write(table, t, f"kept-{run}-{f.path.rsplit('/', 1)[-1]}", f.partition, True))
    tx = table.transaction(
        f"race-{worker}", rows("x", 1).schema, partition=PARTITION, removes=night.removes,
        carried_rows=kept.rows if kept else 0,
    )  # fmt: skip
    return tx, written, len(night.todo)


def main(conn, barrier, worker: int) -> None:
    while True:
        job = conn.recv()
        if job is None:
            return
        uri, so, versions = job
        try:
            tx, written, todo = prepare(uri, so, versions, worker)
            barrier.wait(timeout=60)  # both planned from one snapshot: now both commit
            if not todo:
                conn.send("nothing")
                continue
            tx.commit(written)
            conn.send("committed")
        except sinks.ConcurrentCommit:
            conn.send("refused")
        except Exception as e:
            conn.send(f"error: {e!r}")
