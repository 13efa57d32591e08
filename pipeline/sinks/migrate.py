"""An output of the previous layout, converted once into a Delta table.

Before Delta, an output root was Parquet files kept consistent by this project's own
lease, journal and ledger (``_lock.json``, ``_state/``, ``_SUCCESS``, ``_manifest.json``,
``_report.json``). ``python -m pipeline migrate OUTPUT`` makes it a table:

1. it refuses a root in use (a lease) or with a commit half applied (a journal): the
   previous release's ``recover`` finishes that first;
2. it writes each data file again beside it, as the table's rows are now (the embedding a
   list of float32, and each row's ``source_version`` and ``fingerprint`` from the old
   ledger, so that the next night knows every input is done);
3. it makes the table's first commit, adding all of them at once;
4. it deletes the old files and the old bookkeeping.

``deltalake.convert_to_deltalake`` alone would take the old files as they are, without
the two columns the nightly job plans with, so every input would be redone. Killed before
(3), the root is still the old layout with some extra files named ``part-migrated-*``,
which the next ``migrate`` deletes before it starts again; killed after (3), the next
``migrate`` finishes (4). Run it while no job writes the root.
"""

from __future__ import annotations

import contextlib
import json
import posixpath

from pipeline import columns as C
from pipeline.sinks.delta import Table, TableError, check_uri, previous_layout
from pipeline.sinks.parquet import write_file
from pipeline.storage import is_hidden, redact

MIGRATED = "part-migrated-"
LEDGER = "_state/ledger/"
LEGACY_LEDGER = "_state/ledger.json"


def migrate(uri: str, storage_options: dict | None = None) -> list[str]:
    """Converts the previous layout at ``uri`` into a Delta table; returns what it did.

    Raises:
        TableError: nothing there, not the previous layout, in use, or a commit half done.
    """
    table = Table(check_uri(uri), storage_options)
    where = redact(table.uri)
    if table.exists:
        names = _names(table)
        live = {f.path for f in table.files()}
        old = [n for n in names if _old(n) and n not in live]
        _delete(table, old)
        done = f"{where} is a Delta table (version {table.version})"
        return (
            [f"{done}; removed {len(old)} files of the previous layout"]
            if old
            else [f"{done}: nothing to do"]
        )
    if not table.is_folder():
        raise TableError(f"no output at {where}: nothing to migrate")
    if not previous_layout(table.fs, table.path):
        raise TableError(f"{where} is not an output of the previous layout: nothing to migrate")
    names = _names(table)
    if "_lock.json" in names:
        raise TableError(
            f"{where} is in use by a run of the previous release (_lock.json); migrate once it ends"
        )
    if any(n.startswith("_state/commit-") for n in names):
        raise TableError(
            f"{where} has a commit of the previous release half applied (_state/commit-*.json): finish it "
            f"with that release's `python -m pipeline recover {where}`, then migrate"
        )
    _delete(
        table, [n for n in names if _data(n) and posixpath.basename(n).startswith(MIGRATED)]
    )  # a killed one's
    data = sorted(n for n in names if _data(n) and MIGRATED not in n)
    if not data:
        raise TableError(f"{where} holds no data files of the previous layout: nothing to migrate")
    ledger = _ledger(table, names)
    partitioned = all(n.startswith(f"{C.PARTITION}=") for n in data)
    files, schema = [], None
    for i, rel in enumerate(data):
        part = rel.split("/", 1)[0].split("=", 1)[1] if partitioned else None
        new_rel = f"{posixpath.dirname(rel) + '/' if posixpath.dirname(rel) else ''}{MIGRATED}{i:06d}.parquet"
        written, schema = _convert(table, rel, new_rel, part, ledger)
        files.append(written)
    tx = table.transaction(
        "migrate", schema, partition=files[0].partition.get(C.PARTITION) if partitioned else None,
        info={"command": "migrate", "files": len(files), "rows": sum(f.rows for f in files),
              "errors": sum(f.errors for f in files)},
    )  # fmt: skip
    committed = tx.commit(files)
    _delete(table, [n for n in names if _old(n)])
    return [
        f"{where}: converted {len(files)} data files ({committed.rows} rows) into Delta table version "
        f"{committed.version}; removed the previous layout's files"
    ]


def _names(table: Table) -> list[str]:
    fs = table.fs
    fs.invalidate_cache()
    if not fs.exists(table.path) or not fs.isdir(table.path):
        return []
    return sorted(p[len(table.path) :].lstrip("/") for p in fs.find(table.path))


def _data(name: str) -> bool:
    """A data file of the previous layout: ``part-*.parquet`` at the top (run) or in a
    ``dt=`` folder (nightly); nothing else is taken for one."""
    parts = name.split("/")
    base = parts[-1]
    if not (base.startswith("part-") and base.endswith(".parquet")) or is_hidden(name):
        return False
    return len(parts) == 1 or (len(parts) == 2 and parts[0].startswith(f"{C.PARTITION}="))


def _old(name: str) -> bool:
    """A file of the previous layout: its data files and its own bookkeeping."""
    if name.startswith("_delta_log/"):
        return False
    base = posixpath.basename(name)
    return (
        name.startswith(("_state/", "_staging-", "_lock.json", "_report.json"))
        or base in ("_SUCCESS", "_manifest.json")
        or (_data(name) and not base.startswith(MIGRATED))
    )


def _delete(table: Table, names: list[str]) -> None:
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            table.fs.rm_file(table.abs(n))


def _ledger(table: Table, names: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """input URI → (version, fingerprint), from the previous layout's ledger."""
    import pyarrow.parquet as pq

    parts = [n for n in names if n.startswith(LEDGER) and n.endswith(".parquet")]
    out: dict = {}
    if parts:
        t = pq.read_table([table.abs(n) for n in parts], filesystem=table.arrow_fs, partitioning=None)
        for uri, version, model in zip(
            t["uri"].to_pylist(), t["version"].to_pylist(),
            (t["model"] if "model" in t.column_names else [None] * t.num_rows), strict=True,
        ):  # fmt: skip
            out[uri] = (version, model if isinstance(model, str) or model is None else model.as_py())
    elif LEGACY_LEDGER in names:
        for uri, e in json.loads(table.fs.cat_file(table.abs(LEGACY_LEDGER))).items():
            out[uri] = (e.get("version"), e.get("model"))
    return out


def _convert(table: Table, rel: str, new_rel: str, partition: str | None, ledger: dict):
    """One old data file written again as the table's rows are now; (DataFile, schema)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    old = pq.read_table(table.abs(rel), filesystem=table.arrow_fs, partitioning=None)
    task = (
        "both" if C.CLASS_INDEX in old.column_names and C.EMBEDDING in old.column_names
        else "classify" if C.CLASS_INDEX in old.column_names else "features"
    )  # fmt: skip
    dim = old.schema.field(C.EMBEDDING).type.list_size if C.EMBEDDING in old.column_names else 0
    schema = C.output_schema(task, dim, old.schema.metadata)
    keys = sorted(ledger)
    at = pc.index_in(old[C.SOURCE], value_set=pa.array(keys, pa.string()))
    versions = pa.array([ledger[k][0] for k in keys], pa.string()).take(at)
    prints = pa.array([ledger[k][1] for k in keys], pa.string()).take(at)
    columns = []
    for field in schema:
        if field.name == C.SOURCE_VERSION:
            columns.append(versions)
        elif field.name == C.FINGERPRINT:
            columns.append(prints)
        else:
            columns.append(old[field.name].cast(field.type))
    new = pa.Table.from_arrays(columns, schema=schema)
    values = {C.PARTITION: partition} if partition is not None else {}
    return write_file(new, table.arrow_fs, table.path, new_rel, values), schema
