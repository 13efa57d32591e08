"""The nightly ledger: each input done, at which version, in which files, by which model.

One Parquet file per output partition, holding the entries of the inputs whose rows are
in that partition:

    _state/ledger/dt=YYYY-MM-DD/<run id>.parquet

A night reads them all at once (columnar: a million entries in well under a second),
plans with Arrow compute rather than a Python object per entry, and writes only the
partitions it touched, each under a new name, the old one deleted in the same journal.
So what a night writes is in proportion to what it changed, not to everything ever done,
and a journal never names a file that existed before it (``commit.recover`` tells an
unapplied journal by its files being absent).

Roots written before this kept one ``_state/ledger.json``: it is read as the ledger, and
replaced by the per-partition files at the root's next commit.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.bulk import bulk
from pipeline.commit import Root, staging_rel
from pipeline.errors import RunFailedError

FOLDER = "_state/ledger"
LEGACY = "_state/ledger.json"
SCHEMA = pa.schema(
    [
        ("uri", pa.string()),  # the input as the `source` column holds it (redacted)
        ("version", pa.string()),  # size:ETag, or size:mtime
        ("partition", pa.string()),  # where its rows are: dt=YYYY-MM-DD
        ("files", pa.list_(pa.string())),  # its output files, relative to the root
        ("rows", pa.int64()),
        ("errors", pa.int64()),
        ("run_id", pa.string()),
        ("model", pa.string()),  # Plan.fingerprint; null in entries from before fingerprints
    ]
)


@dataclass
class Ledger:
    """The ledger as read: one row per input done (``SCHEMA``), and where it was read from."""

    table: pa.Table
    files: dict[str, list[str]] = field(default_factory=dict)  # partition → its ledger files
    legacy: bool = False  # read from ``LEGACY``: every partition is rewritten at the next commit

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> pa.Array:
        return (
            self.table[name].combine_chunks()
            if self.table.num_rows
            else pa.array([], SCHEMA.field(name).type)
        )

    def entries(self) -> dict[str, dict]:
        """uri → entry, as Python objects (for tests and small ledgers)."""
        return {r.pop("uri"): r for r in self.table.to_pylist()}


def empty() -> pa.Table:
    return SCHEMA.empty_table()


def table_of(entries: dict[str, dict]) -> pa.Table:
    """A ledger table from uri → entry dicts (entries without a model have none)."""
    return pa.Table.from_pylist(
        [{"uri": u, **{k: e.get(k) for k in SCHEMA.names if k != "uri"}} for u, e in entries.items()],
        schema=SCHEMA,
    )


def load(root: Root, names: list[str] | None = None) -> Ledger:
    """Reads the ledger of ``root``; ``names``: ``root.listing()``, if the caller has it."""
    names = root.listing() if names is None else names
    parts = sorted(n for n in names if n.startswith(f"{FOLDER}/") and n.endswith(".parquet"))
    if not parts:
        legacy = root.read_json(LEGACY, None)
        if legacy is None:
            return Ledger(empty())
        return Ledger(table_of(legacy), legacy=True)
    by_partition: dict[str, list[str]] = defaultdict(list)
    for n in parts:
        by_partition[posixpath.basename(posixpath.dirname(n))].append(n)
    # partitioning=None: a root under a key=value folder (".../model=resnet50/") must not
    # have that value read into every row's column of the same name.
    table = pq.read_table([root.abs(n) for n in parts], filesystem=root.fs, schema=SCHEMA, partitioning=None)
    if pc.count_distinct(table["uri"]).as_py() != table.num_rows:
        raise RunFailedError(
            f"the ledger under {root.uri}/{FOLDER} holds an input twice; run `recover` first"
        )
    return Ledger(table, dict(by_partition))


@dataclass(frozen=True)
class Planned:
    """What a night has to do, from the listing and the ledger."""

    redo: list[str]  # new, changed, or whose files are gone: the night's own work
    backfill: list[str]  # listed, unchanged, done by another model
    others: list[str]  # the fingerprints of other models that made rows of listed inputs

    @property
    def todo(self) -> list[str]:
        return self.redo + self.backfill


@bulk
def plan(ledger: Ledger, versions: dict[str, str], visible, fingerprint: str | None) -> Planned:
    """Which listed inputs (``versions``: uri → version) to redo, with Arrow compute.

    An input is redone when it is new, its version changed, or one of its committed files is
    not ``visible``; backfilled when a model other than ``fingerprint`` made its rows (entries
    without a fingerprint count as this model's). Only the input itself: inputs that share
    an output file with it keep their rows (``shared_files`` and the sink's ``carry``).
    """
    uris = pa.array(list(versions), pa.string())
    wanted = pa.array(list(versions.values()), pa.string())
    at = pc.index_in(uris, value_set=ledger.column("uri"))  # each listed input's ledger row, or null
    changed = pc.fill_null(pc.not_equal(ledger.column("version").take(at), wanted), True)
    files = ledger.column("files")
    gone = pc.invert(pc.is_in(pc.list_flatten(files), value_set=pa.array(sorted(visible), pa.string())))
    lost = np.zeros(len(ledger), dtype=bool)
    lost[pc.list_parent_indices(files).filter(gone).to_numpy()] = True
    lost_files = pc.fill_null(pa.array(lost).take(at), False)
    redo = pc.or_(changed, lost_files)
    model = ledger.column("model").take(at)
    if fingerprint:
        other = pc.fill_null(pc.not_equal(model, fingerprint), False)
    else:
        other = pa.array(np.zeros(len(uris), dtype=bool))
    return Planned(
        redo=sorted(uris.filter(redo).to_pylist()),
        backfill=sorted(uris.filter(pc.and_(pc.invert(redo), other)).to_pylist()),
        # Changed inputs too: a night of another model is refused even if all it would
        # redo changed, so that two models' rows never mix without --backfill.
        others=sorted(pc.unique(model.filter(other)).to_pylist()),
    )


def shared_files(ledger: Ledger, todo, visible) -> tuple[list[str], list[str]]:
    """The committed files of the inputs ``todo``: (those only they have rows in, which go,
    those other inputs have rows in too, which are carried over without the rows of ``todo``).

    A shared file that is not ``visible`` (gone) is in neither: there is nothing to carry,
    and the other inputs that had rows in it are redone by ``plan`` when they are listed.
    """
    todo_set = pa.array(sorted(todo), pa.string())
    mine = pc.is_in(ledger.column("uri"), value_set=todo_set)
    files = ledger.column("files")
    old = pc.unique(pc.list_flatten(files.filter(mine)))
    if not len(old):
        return [], []
    flat, parents = pc.list_flatten(files), pc.list_parent_indices(files)
    of_others = pc.invert(mine.take(parents))
    kept = pc.unique(flat.filter(pc.and_(of_others, pc.is_in(flat, value_set=old))))
    shared = set(kept.to_pylist())
    return sorted(f for f in old.to_pylist() if f not in shared), sorted(shared & set(visible))


def update(
    ledger: Ledger, todo, done: pa.Table, renamed: dict[str, str], partition: str
) -> dict[str, pa.Table]:
    """The new ledger of each partition the night touched: partition → its table.

    ``done``: the entries of the inputs ``todo`` just done into ``partition``; ``renamed``:
    carried file → its new name, in the entries of the inputs that keep their rows there.
    Touched: ``partition``, the partitions ``todo`` leaves, and those with a carried file;
    every partition when the ledger was the legacy JSON file. The others are not read again.
    """
    uris, parts = ledger.column("uri"), ledger.column("partition")
    mine = pc.is_in(uris, value_set=pa.array(sorted(todo), pa.string()))
    touched = {partition, *pc.unique(parts.filter(mine)).to_pylist()}
    touched |= {f.split("/", 1)[0] for f in renamed}
    if ledger.legacy:
        touched |= set(pc.unique(parts).to_pylist())
    keep = ledger.table.filter(pc.and_(pc.invert(mine), pc.is_in(parts, value_set=pa.array(sorted(touched)))))
    if renamed and keep.num_rows:
        files = [[renamed.get(f, f) for f in fs] for fs in keep["files"].to_pylist()]
        keep = keep.set_column(
            SCHEMA.get_field_index("files"), "files", pa.array(files, SCHEMA.field("files").type)
        )
    table = pa.concat_tables([keep, done.cast(SCHEMA)])
    out = {}
    for p in sorted(touched):
        out[p] = table.filter(pc.equal(table["partition"], p))
    return out


@bulk
def entries(todo, counts: pa.Table, versions: dict, partition: str, run_id: str, model: str) -> pa.Table:
    """The ledger entries of the inputs ``todo`` just done into ``partition``.

    ``counts`` (``sinks.counts_schema()``, as ``Sink.rows_per_source`` gives them, with each file's
    committed path): rows and error rows per file and input. Grouped by input with Arrow
    (a sort, then runs of equal inputs), not a Python object per row; ``model``: the plan's
    fingerprint. An input with no rows (an empty shard) gets an entry without files.
    """
    uris = pa.array(sorted(todo), pa.string())
    s = counts.sort_by([("source", "ascending"), ("file", "ascending")])
    src, n = s["source"].combine_chunks(), s.num_rows
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = pc.not_equal(src.slice(1), src.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(first)
    files = pa.ListArray.from_arrays(pa.array(np.append(starts, n), pa.int32()), s["file"].combine_chunks())
    rows = pa.array(np.add.reduceat(s["rows"].to_numpy(), starts) if n else [], pa.int64())
    errors = pa.array(np.add.reduceat(s["errors"].to_numpy(), starts) if n else [], pa.int64())
    at = pc.index_in(uris, value_set=src.take(starts))
    k = len(uris)
    return pa.table(
        {
            "uri": uris,
            "version": pa.array([versions[u] for u in uris.to_pylist()], pa.string()),
            "partition": pa.array([partition] * k, pa.string()),
            "files": pc.fill_null(files.take(at), pa.scalar([], SCHEMA.field("files").type)),
            "rows": pc.fill_null(rows.take(at), 0),
            "errors": pc.fill_null(errors.take(at), 0),
            "run_id": pa.array([run_id] * k, pa.string()),
            "model": pa.array([model] * k, pa.string()),
        },
        schema=SCHEMA,
    )


def stage(root: Root, run_id: str, tables: dict[str, pa.Table], ledger: Ledger) -> tuple[list[str], list]:
    """Writes each touched partition's ledger into the run's staging: (what the journal
    deletes: the partitions' old ledger files, and the legacy file; what it moves in).

    A partition left without inputs gets no new file: its old one just goes.
    """
    deletes = [f for p in tables for f in ledger.files.get(p, [])]
    if ledger.legacy:
        deletes.append(LEGACY)
    moves = []
    staging = staging_rel(run_id)
    for p, table in tables.items():
        if not table.num_rows:
            continue
        src = f"{staging}/_ledger/{p}.parquet"
        root.fs.makedirs(posixpath.dirname(root.abs(src)), exist_ok=True)
        pq.write_table(table, root.abs(src), filesystem=root.fs, compression="zstd")
        moves.append((src, f"{FOLDER}/{p}/{run_id}.parquet"))
    return deletes, moves
