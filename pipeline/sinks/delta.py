"""The output is a Delta Lake table: its snapshot, its one commit per run, its upkeep.

A run's write tasks put Parquet data files under the table root (``sinks.datasink``);
nobody sees them until the driver makes one Delta commit (``Transaction.commit``) that adds
them and, where the run replaces rows, removes the files that held the old ones. A reader
sees the table before that commit or after it, never between: Delta's log entry is one
atomic write (a conditional PUT on S3, an exclusive create on disks).

Exactly once, without a lock of our own. Every commit this project makes carries a Delta
application transaction (``APP_ID``, version = the snapshot's + 1). delta-rs refuses a
commit when a commit made since the snapshot it planned from carries the same application
id ("concurrent transaction"), so of two runs that planned from one snapshot only the first
commits; the other commits nothing and fails in one line. A commit whose answer was lost
(the store took it, the reply never came) is known by its version and run id in the log.

A run killed at any moment has committed nothing or everything; the files it wrote and
never committed are in no snapshot, and ``vacuum`` removes them once they are older than
its retention (which keeps a live run's files: they are younger).

The table is its own ledger: each row carries its input's ``source``, ``source_version``
and ``fingerprint``; ``Table.inputs`` reads just those columns of the current snapshot.
"""

from __future__ import annotations

import posixpath
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pipeline import columns as C
from pipeline.errors import BadInputError, RunFailedError
from pipeline.storage import delta_options, redact, redact_all, url_to_fs

# The application id of every commit this project makes to a table (Delta's ``txn``).
APP_ID = "resnet-batch-pipeline"
# What a commit's commitInfo holds the run's facts under.
INFO_KEY = "pipeline"
# Days of history that upkeep keeps: files a commit removed stay this long for time travel.
RETENTION_HOURS = 168
# Threads reading footers and the planning columns: requests in flight on an object store.
READERS = 16


class TableError(BadInputError):
    """The output is not a table this command can use: one line, exit 2, nothing touched."""


class ConcurrentCommit(BadInputError):
    """Another run committed to the table after this one planned: nothing was committed."""


class CommitCheckError(RunFailedError):
    """A run's files are not what its write tasks said, or its commit not what it made."""


@dataclass(frozen=True)
class LiveFile:
    """A data file of the snapshot (paths relative to the table root)."""

    path: str
    size: int
    partition: str | None  # the ``dt`` value, or None in an unpartitioned table
    rows: int
    errors: int


def _local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _now_ms() -> int:
    return int(time.time() * 1000)


class Table:
    """The output table at ``uri``: its file system, resolved once, and its snapshot (None
    where there is no table yet). Every path given to it is relative to its root."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

        self.uri = uri.rstrip("/")
        self.fs, path = url_to_fs(self.uri, storage_options)
        self.path = path.rstrip("/")
        # pyarrow's own file system on disks (a Python handler would cost each read a few
        # calls into Python); fsspec's, with the run's options, on object stores.
        self.arrow_fs = LocalFileSystem() if _local(self.fs) else PyFileSystem(FSSpecHandler(self.fs))
        self.options = delta_options(self.uri, storage_options)
        self.delta = None
        self.load()

    def __repr__(self) -> str:
        return f"Table({redact(self.uri)!r}, version={self.version})"

    # -- the snapshot

    def load(self, version: int | None = None) -> Table:
        """Reads the table's latest snapshot (or ``version``); no table: ``delta`` is None."""
        from deltalake import DeltaTable

        self.delta = None
        self._files = None
        if self.is_table():
            self.delta = DeltaTable(self.uri, version=version, storage_options=self.options)
        return self

    def is_folder(self) -> bool:
        """Whether the root is a folder that exists (False where the store will not say)."""
        try:
            return bool(self.fs.isdir(self.path))
        except Exception:
            return False

    def is_table(self) -> bool:
        """Whether a Delta log is at the root (one LIST of ``_delta_log/``; creates nothing)."""
        try:
            return bool(self.fs.ls(f"{self.path}/_delta_log", detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return False

    @property
    def exists(self) -> bool:
        return self.delta is not None

    @property
    def version(self) -> int | None:
        return self.delta.version() if self.delta is not None else None

    @property
    def partitioned(self) -> bool:
        return self.delta is not None and C.PARTITION in self.delta.metadata().partition_columns

    def abs(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    def schema(self):
        """The table's Arrow schema (the partition column included), or None."""
        import pyarrow as pa

        return pa.schema(self.delta.schema().to_arrow()) if self.delta is not None else None

    def files(self) -> list[LiveFile]:
        """The snapshot's data files, from the log (no data file is opened)."""
        if self.delta is None:
            return []
        if self._files is None:
            import pyarrow as pa

            t = pa.table(self.delta.get_add_actions(flatten=True))
            cols = set(t.column_names)
            part = f"partition.{C.PARTITION}"
            nulls = f"null_count.{C.ERROR}"
            out = []
            for r in t.to_pylist():
                rows = r.get("num_records") or 0
                err = r.get(nulls) if nulls in cols else None
                out.append(
                    LiveFile(
                        r["path"], r["size_bytes"], r.get(part) if part in cols else None,
                        rows, rows - err if err is not None else 0,
                    )
                )  # fmt: skip
            self._files = out
        return self._files

    def rows(self) -> int:
        return sum(f.rows for f in self.files())

    def transaction_version(self) -> int:
        """The last application-transaction version this project committed (0: none)."""
        return (self.delta.transaction_version(APP_ID) if self.delta is not None else None) or 0

    def inputs(self, files: list[LiveFile] | None = None):
        """What each data file holds of each input: a table of (file, partition, source,
        source_version, fingerprint, rows, errors), one row per file and input.

        Reads only the ``source``, ``source_version``, ``fingerprint`` and ``status``
        columns, dictionary-encoded, in one pyarrow dataset scan (its threads read many
        files at once), and turns each file's batches into runs of equal values with
        numpy: a file's rows of one input are contiguous, so the work is a pass over the
        indices, not a Python object per row (``make bench-scale``).
        """
        import pyarrow as pa
        import pyarrow.dataset as pads

        files = self.files() if files is None else files
        if not files:
            return _inputs_schema().empty_table()
        cols = [C.SOURCE, C.SOURCE_VERSION, C.FINGERPRINT, C.STATUS]
        by_path = {self.abs(f.path): f for f in files}
        read = pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(dictionary_columns=cols))
        data = pads.dataset(list(by_path), filesystem=self.arrow_fs, format=read, partitioning=None)
        present = [c for c in cols if c in data.schema.names]
        batches = data.to_batches(
            columns=[*present, "__filename"], batch_size=1 << 20, fragment_readahead=READERS
        )
        parts = [_runs(b, by_path[b.column("__filename")[0].as_py()], present) for b in batches if b.num_rows]
        t = pa.concat_tables(parts)
        keys = ["file", "partition", C.SOURCE, C.SOURCE_VERSION, C.FINGERPRINT]
        g = t.group_by(keys, use_threads=False).aggregate([("rows", "sum"), ("errors", "sum")])
        return g.rename_columns([*keys, "rows", "errors"]).select([*keys, "rows", "errors"])

    # -- checks before any work

    def check_writable(self, schema, *, partitioned: bool, replace: bool) -> None:
        """Refuses, in one line and before any work, an output this run must not write.

        ``schema``: the rows' (``columns.output_schema``); ``partitioned``: by ``dt`` (the
        nightly job); ``replace``: ``run --overwrite``, which replaces a table's rows.

        Raises:
            TableError: the output is a file, a bucket that does not exist, a folder that
                holds other files (the previous Parquet layout among them: named with the
                command that converts it), a table of another layout or columns, or a
                table that ``run`` would write without ``--overwrite``.
        """
        uri = redact(self.uri)
        if self.delta is None:
            self._check_not_a_table_yet(uri)
            return
        if self.partitioned != partitioned:
            kind = "partitioned by dt (a nightly table)" if self.partitioned else "not partitioned"
            raise TableError(
                f"output {uri} is a table {kind}; "
                f"{'nightly' if partitioned else 'run'} cannot write it: choose another --output"
            )
        if not partitioned and not replace:
            raise TableError(
                f"output {uri} is a table of {self.rows()} rows; pass --overwrite to replace them"
            )
        differ = _column_difference(self.schema(), schema)
        if differ:
            raise TableError(f"output {uri} is a table of other columns ({differ}); choose another --output")

    def _check_not_a_table_yet(self, uri: str) -> None:
        fs, path = self.fs, self.path
        try:
            if not fs.exists(path):
                bucket = path.split("/", 1)[0]
                if "://" in self.uri and not self.uri.startswith("file://") and not fs.exists(bucket):
                    raise TableError(f"output bucket {bucket} does not exist")
                return
            if not fs.isdir(path):
                raise TableError(f"output {uri} exists and is a file; pass a folder URI")
            found = fs.ls(path, detail=False)
        except PermissionError as e:
            raise TableError(f"output {uri} is not accessible: {e}") from None
        if not found or _only_unreferenced(fs, path, found):
            return
        if previous_layout(fs, path):
            raise TableError(
                f"output {uri} holds Parquet files of the previous layout, without a Delta log; "
                f"convert it once with `python -m pipeline migrate {uri}`"
            )
        raise TableError(
            f"output {uri} exists, is not empty and is not a Delta table; choose another --output"
        )

    # -- the commit

    def transaction(
        self,
        run_id: str,
        schema,
        *,
        partition: str | None = None,
        removes: list[LiveFile] = (),
        carried_rows: int = 0,
        info: dict | None = None,
    ) -> Transaction:
        """The one commit of run ``run_id``, planned on this snapshot (see the module doc).

        ``schema``: the rows' schema; ``partition``: the ``dt`` of the run's new rows
        (nightly), or None; ``removes``: the snapshot's files the commit replaces;
        ``carried_rows``: the rows of ``removes`` the run writes again (kept rows);
        ``info``: the run's facts for commitInfo.
        """
        return Transaction(
            self, run_id, schema, partition, list(removes), carried_rows, dict(info or {}),
            read_version=self.version, txn_version=self.transaction_version() + 1,
        )  # fmt: skip


def _runs(batch, f: LiveFile, present: list[str]):
    """One batch of one file as runs of equal (source, version, fingerprint, status)."""
    import numpy as np
    import pyarrow as pa

    n = batch.num_rows
    arrays = {c: batch.column(c) for c in present}
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for a in arrays.values():
        idx = a.indices.to_numpy(zero_copy_only=False)
        valid = np.asarray(a.is_valid())
        change[1:] |= (idx[1:] != idx[:-1]) | (valid[1:] != valid[:-1])
    starts = np.flatnonzero(change)
    counts = np.diff(np.append(starts, n))
    take = pa.array(starts)
    picked = {c: arrays[c].take(take).cast(pa.string()) for c in present}
    status = picked.get(C.STATUS)
    errors = np.zeros(len(counts), dtype=np.int64)
    if status is not None:
        errors = np.where(np.asarray(status.to_pylist(), dtype=object) == C.STATUS_ERROR, counts, 0)
    k = len(starts)
    return pa.table(
        {
            "file": pa.array([f.path] * k, pa.string()),
            "partition": pa.array([f.partition] * k, pa.string()),
            **{
                c: picked.get(c, pa.nulls(k, pa.string()))
                for c in (C.SOURCE, C.SOURCE_VERSION, C.FINGERPRINT)
            },
            "rows": pa.array(counts, pa.int64()),
            "errors": pa.array(errors, pa.int64()),
        },
        schema=_inputs_schema(),
    )


def _inputs_schema():
    import pyarrow as pa

    return pa.schema(
        [("file", pa.string()), ("partition", pa.string()), (C.SOURCE, pa.string()),
         (C.SOURCE_VERSION, pa.string()), (C.FINGERPRINT, pa.string()),
         ("rows", pa.int64()), ("errors", pa.int64())]
    )  # fmt: skip


def _column_difference(table_schema, rows_schema) -> str | None:
    """How the table's columns differ from the rows' (names and value types), or None."""

    def shape(schema) -> dict[str, str]:
        out = {}
        for f in schema:
            if f.name == C.PARTITION:
                continue
            t = f.type
            out[f.name] = f"list<{t.value_type}>" if hasattr(t, "value_type") else str(t)
        return out

    a, b = shape(table_schema), shape(rows_schema)
    if a == b:
        return None
    missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    if missing or extra:
        parts = ([f"without {', '.join(missing)}"] if missing else []) + (
            [f"with {', '.join(extra)}"] if extra else []
        )
        return "; ".join(parts)
    return ", ".join(f"{k} is {a[k]}, not {b[k]}" for k in a if a[k] != b[k])


def previous_layout(fs, path: str) -> bool:
    """Whether the folder at ``path`` is an output of this project's layout before Delta:
    ``_report.json`` (a run), ``_state/`` (a nightly root's ledger and journals) or
    ``_lock.json`` at its top, or ``dt=…`` folders with ``_SUCCESS`` or ``_manifest.json``.
    Looks at the top and at one ``dt=`` folder only: never walks what is below."""
    try:
        top = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return False
    if {"_report.json", "_state", "_lock.json"} & set(top):
        return True
    for name in sorted(n for n in top if n.startswith(f"{C.PARTITION}="))[:1]:
        inside = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(f"{path}/{name}", detail=False)]
        return bool({"_SUCCESS", "_manifest.json"} & set(inside))
    return False


# The data files a run writes: part-<run id>-<task>-<block>[-kept].parquet (sinks.datasink).
_RUN_FILE = re.compile(r"part-\d{8}T\d{6}Z-[0-9a-f]{8}-\d+-\d+(-kept)?\.parquet")


def _only_unreferenced(fs, path: str, top: list[str]) -> bool:
    """Whether a folder without a table holds only data files of this project's runs that
    never committed (a first run killed before its commit): no table names them, ``vacuum``
    removes them once the table exists, and the folder counts as empty."""
    for entry in top:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if _RUN_FILE.fullmatch(name):
            continue
        if not re.fullmatch(rf"{C.PARTITION}=\d{{4}}-\d{{2}}-\d{{2}}", name):
            return False
        inside = fs.ls(f"{path}/{name}", detail=False)
        if not all(_RUN_FILE.fullmatch(n.rstrip("/").rsplit("/", 1)[-1]) for n in inside):
            return False
    return True


def check_uri(uri: str) -> str:
    """Refuses a table URI that names no folder: empty, or a scheme without a bucket."""
    bare = uri.strip().rstrip("/")
    if not bare or bare.endswith(":") or bare.endswith(":/"):
        raise TableError(f"not a table URI: {redact(uri)!r}")
    return uri


@dataclass(frozen=True)
class Committed:
    version: int
    files: list  # parquet.DataFile, as added
    rows: int  # the table's rows after the commit
    added_rows: int
    added_errors: int
    removed_rows: int


@dataclass
class Transaction:
    """One run's commit: what it adds (the write tasks' files), what it removes, and the
    run's facts in commitInfo. ``commit`` is called once, by the sink, on the driver."""

    table: Table
    run_id: str
    schema: object  # pa.Schema of the rows (no partition column)
    partition: str | None
    removes: list[LiveFile]
    carried_rows: int
    info: dict
    read_version: int | None
    txn_version: int
    committed: Committed | None = field(default=None)

    @property
    def partition_values(self) -> dict[str, str]:
        return {C.PARTITION: self.partition} if self.partition is not None else {}

    def commit(self, files: list, written_rows: int | None = None, info: dict | None = None) -> Committed:
        """Checks ``files`` (``parquet.DataFile``), then commits them in one Delta commit.

        ``written_rows``: the rows Ray Data says its write tasks wrote; ``info``: more facts
        for commitInfo (rows, errors, the error budget), merged into the transaction's.

        Raises:
            CommitCheckError: the files' rows are not the rows written, or the driver cannot
                see a file the workers wrote (a local --output that is not shared storage).
            ConcurrentCommit: another run committed meanwhile; nothing was committed.
        """
        self._check(files, written_rows)
        rows_before = self.table.rows() if self.read_version is not None else 0  # the snapshot's
        from deltalake import CommitProperties
        from deltalake import Transaction as Txn
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import AddAction, RemoveAction

        t = self.table
        now = _now_ms()
        adds = [AddAction(f.path, f.size, f.partition, f.modified_ms, True, f.stats) for f in files]
        removes = [
            RemoveAction(
                r.path, True, now, r.size, {C.PARTITION: r.partition} if r.partition is not None else {}
            )
            for r in self.removes
        ]
        facts = redact_all({**self.info, **(info or {}), "run_id": self.run_id})
        props = CommitProperties(
            custom_metadata={INFO_KEY: facts}, app_transactions=[Txn(APP_ID, self.txn_version)]
        )
        schema = _table_schema(self.schema, self.partition is not None)
        partition_by = [C.PARTITION] if self.partition is not None else []
        if self.read_version is None:
            self._create(schema, partition_by)
        try:
            t.delta.create_write_transaction(
                [*adds, *removes], "append", schema, partition_by=partition_by, commit_properties=props
            )
        except CommitFailedError:
            self._raise_concurrent()
        except Exception:
            if not self._landed():  # the store may have taken it and lost the answer
                raise
        version = self._landed()
        if version is None:
            raise CommitCheckError(f"the commit of run {self.run_id} is not in {redact(t.uri)}'s log")
        self.committed = self._verify(version, files, rows_before)
        return self.committed

    def _create(self, schema, partition_by: list[str]) -> None:
        """Creates the table, empty, for a run that planned from no table; then that run's
        commit is an ordinary one, checked against every commit since the table began.

        Two runs creating one table at once may both succeed here (delta-rs then writes a
        second, equal CREATE): harmless, no data. What counts is the data commit: if another
        run committed since this one planned (its application transaction is in the log),
        this run commits nothing."""
        from deltalake import Schema
        from deltalake.transaction import create_table_with_add_actions

        t = self.table
        create_table_with_add_actions(
            t.uri, Schema.from_arrow(schema), [], mode="ignore", partition_by=partition_by,
            name=posixpath.basename(t.path), storage_options=t.options,
        )  # fmt: skip
        t.load()
        same = t.partitioned == bool(partition_by) and not _column_difference(t.schema(), self.schema)
        if t.transaction_version() >= self.txn_version or t.rows() or not same:
            self._raise_concurrent()

    def _raise_concurrent(self):
        self.table.load()
        raise ConcurrentCommit(
            f"output {redact(self.table.uri)} changed while this run worked: another run committed "
            f"version {self.table.version}; nothing was committed, and running again does what is left"
        ) from None

    def _landed(self) -> int | None:
        """The version at which this run's commit is in the log, or None. Leaves the table
        at its latest version (usually this commit: then one load, and one commit read)."""
        t = self.table.load()
        if t.transaction_version() < self.txn_version:
            return None
        for limit in (1, 100):
            for entry in t.delta.history(limit=limit):
                if (entry.get(INFO_KEY) or {}).get("run_id") == self.run_id:
                    return entry["version"]
        return None

    def _check(self, files: list, written_rows: int | None) -> None:
        rows = sum(f.rows for f in files)
        if written_rows is not None and rows != written_rows:
            raise CommitCheckError(
                f"the write tasks wrote {written_rows} rows but their files hold {rows}; nothing committed"
            )
        carried = sum(f.rows for f in files if f.carried)
        if carried != self.carried_rows:
            raise CommitCheckError(
                f"{self.carried_rows} rows were to be kept from the files this run replaces, but "
                f"{carried} were written; nothing committed"
            )
        seen: dict[str, int] = {}
        fs = self.table.fs
        for folder in sorted({posixpath.dirname(f.path) for f in files}):
            path = self.table.abs(folder) if folder else self.table.path
            fs.invalidate_cache(path)
            try:
                for e in fs.ls(path, detail=True):
                    seen[e["name"].rstrip("/")[len(self.table.path) :].lstrip("/")] = int(e.get("size") or 0)
            except FileNotFoundError:
                continue
        lost = [f.path for f in files if seen.get(f.path) != f.size]
        if lost:
            raise CommitCheckError(
                f"{len(lost)} of the {len(files)} files the workers wrote are not under "
                f"{redact(self.table.uri)} as the driver sees it (first: {lost[0]}); nothing "
                "committed. A local --output must be storage that the driver and every node share"
            )

    def _verify(self, version: int, files: list, old: int) -> Committed:
        """The rows of the committed version are the snapshot's (``old``), less the files
        removed, plus the files added: no run says it succeeded with rows missing."""
        t = self.table
        latest = t.version
        if version != latest:
            t.load(version)
        before = sum(r.rows for r in self.removes)
        added = sum(f.rows for f in files)
        now = t.rows()
        if version != latest:
            t.load()
        if now != old - before + added:
            raise CommitCheckError(
                f"version {version} of {redact(t.uri)} holds {now} rows, not the {old} of version "
                f"{self.read_version} less {before} replaced plus {added} written"
            )
        return Committed(version, files, now, added, sum(f.errors for f in files), before)


def _table_schema(rows_schema, partitioned: bool):
    """The table's schema: the rows' columns (nullable, as Delta keeps them), then ``dt``."""
    import pyarrow as pa

    fields = [f.with_nullable(True) for f in rows_schema]
    if partitioned:
        fields.append(pa.field(C.PARTITION, pa.string()))
    return pa.schema(fields)


# ----------------------------------------------------------------------------- upkeep


def maintain(table: Table, partitions: list[str], retention_hours: float) -> list[str]:
    """A night's upkeep after its commit: compacts the small files of ``partitions``,
    checkpoints the log, and vacuums what is unreferenced for longer than the retention
    (files removed by commits, and files no commit took: a killed run's). Returns what it
    did, one line each. A failure here loses nothing: it is a warning, and the next night
    tries again."""
    done = []
    d = table.delta  # its latest version, as the commit left it
    try:
        if partitions:
            metrics = d.optimize.compact(partition_filters=[(C.PARTITION, "in", sorted(partitions))])
            if metrics.get("numFilesRemoved"):
                done.append(f"compacted {metrics['numFilesRemoved']} files into {metrics['numFilesAdded']}")
        d.create_checkpoint()
        d.cleanup_metadata()
        gone = vacuum(table, retention_hours)
        if gone:
            done.append(f"vacuumed {len(gone)} files unreferenced for over {retention_hours:g} h")
    except Exception as e:
        print(redact(f"warning: upkeep of {table.uri} stopped: {e}".splitlines()[0]), file=sys.stderr)
    return done


def vacuum(table: Table, retention_hours: float, dry_run: bool = False) -> list[str]:
    """Deletes the files no snapshot within ``retention_hours`` needs (or lists them)."""
    return table.delta.vacuum(
        retention_hours=int(retention_hours), dry_run=dry_run, enforce_retention_duration=False, full=True
    )


def history_lines(table: Table, limit: int | None = None) -> list[str]:
    """The table's commits, newest first, one line each; then what the files take up."""
    lines = []
    for h in table.delta.history(limit=limit):
        when = datetime.fromtimestamp(h["timestamp"] / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        info = h.get(INFO_KEY) or {}
        op = h.get("operation", "?")
        line = f"v{h['version']:<5} {when}  {op:<12}"
        if info:
            held = info.get("error_budget_held")
            budget = "" if held is None else ("  budget held" if held else "  OVER the error budget")
            line += (
                f"  {info.get('command', '')} {info.get('partition') or ''}".rstrip()
                + f"  run {info.get('run_id')}  {info.get('model')} {info.get('weights')}"
                + f"  +{info.get('rows', 0)} rows ({info.get('errors', 0)} errors)"
                + (f" -{info['rows_replaced']} replaced" if info.get("rows_replaced") else "")
                + (f" {info['rows_carried']} kept" if info.get("rows_carried") else "")
                + budget
            )
        else:
            params = h.get("operationMetrics") or {}
            if op == "OPTIMIZE" and params:
                line += (
                    f"  {params.get('numFilesRemoved', '?')} files into {params.get('numFilesAdded', '?')}"
                )
            elif op.startswith("VACUUM") and params.get("numDeletedFiles") is not None:
                line += f"  {params['numDeletedFiles']} files deleted"
        lines.append(redact(line))
    live = table.files()
    live_bytes = sum(f.size for f in live)
    on_disk = {p: s for p, s in _data_files_on_disk(table).items()}
    extra = {p: s for p, s in on_disk.items() if p not in {f.path for f in live}}
    lines.append(
        f"version {table.version}: {len(live)} files, {table.rows()} rows, {_mb(live_bytes)}; "
        f"{len(extra)} more files on disk ({_mb(sum(extra.values()))}): removed by later commits "
        "or never committed, kept for time travel until `vacuum`"
    )
    return lines


def _data_files_on_disk(table: Table) -> dict[str, int]:
    table.fs.invalidate_cache()
    out = {}
    for p, d in table.fs.find(table.path, detail=True).items():
        rel = p[len(table.path) :].lstrip("/")
        if not rel.startswith("_") and not any(part.startswith(("_", ".")) for part in rel.split("/")):
            out[rel] = int(d.get("size") or 0)
    return out


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def open_existing(uri: str, storage_options: dict | None = None) -> Table:
    """The table at ``uri`` for the commands that only read or tend one (history, vacuum):
    a path that is not a table root is refused in one line, and nothing is created.

    Raises:
        TableError: an empty URI, a bare scheme, a path that does not exist, or one
            without a Delta log.
    """
    table = Table(check_uri(uri), storage_options)
    if not table.exists:
        where = redact(table.uri)
        if not table.is_folder():
            raise TableError(f"no table at {where}: it does not exist")
        if previous_layout(table.fs, table.path):
            raise TableError(
                f"{where} holds the previous Parquet layout; convert it once with "
                f"`python -m pipeline migrate {where}`"
            )
        raise TableError(f"no table at {where}: it has no Delta log (_delta_log/)")
    return table
