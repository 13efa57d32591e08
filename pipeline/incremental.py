"""Nightly incremental runs: only new or changed input files, exactly once, even when killed.

Layout under ROOT (readers skip every path with a part starting with ``_`` or ``.``):

    dt=YYYY-MM-DD/part-*.parquet        the data
    dt=YYYY-MM-DD/_SUCCESS              the partition's last run finished within its error budget
    dt=YYYY-MM-DD/_manifest.json        inputs, row counts, files, model, weights, run ids
    _state/ledger.json                  input URI → version (size:ETag|mtime), partition, files, rows
    _state/pending-<run>.json           a commit in progress
    _staging-<run>/                     files still being written

The mechanism is staging plus a logged commit. A run writes everything under
``_staging-<run>/``. Its commit then (1) records what it is about to do in
``pending-<run>.json``, (2) deletes the old files of every input it redid, (3) moves its
files into ``dt=<date>/``, (4) replaces the ledger (one atomic write), (5) drops the
pending record. Old files go before new ones arrive, so a reader never sees an image twice,
and every file appears whole (a rename, or an object-store copy). A run killed anywhere is
repaired by the next one: it deletes whatever a pending record had already moved, and
redoes every input whose ledger entry is stale or whose files are gone.

An output file may hold rows of several inputs; when one of them changes, every input in
that file is redone with it, so the file is replaced whole rather than rewritten.
"""

from __future__ import annotations

import json
import posixpath
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline import columns as C
from pipeline import run as runner
from pipeline import sinks, sources
from pipeline.config import ConfigError, RunConfig
from pipeline.storage import is_hidden, redact, url_to_fs

STATE = "_state"
LEDGER = f"{STATE}/ledger.json"
PENDING = f"{STATE}/pending-"
SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
EXIT_OVER_BUDGET = 3


@dataclass(frozen=True)
class NightlyResult:
    exit_code: int
    message: str
    partition: str
    run_id: str = ""
    inputs: int = 0
    rows: int = 0
    errors: int = 0


class Root:
    """The output root on its file system; paths are relative to it."""

    def __init__(self, uri: str, storage_options: dict | None):
        self.uri = uri.rstrip("/")
        self.fs, self.path = url_to_fs(self.uri, storage_options)
        self.path = self.path.rstrip("/")

    def abs(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    def rel(self, path: str) -> str:
        return path[len(self.path) :].lstrip("/")

    def read_json(self, rel: str, default):
        try:
            with self.fs.open(self.abs(rel), "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return default

    def write_json(self, rel: str, value) -> None:
        """Atomic: a whole object PUT on object stores, write-then-rename on disks."""
        data = json.dumps(value, indent=1, sort_keys=True).encode()
        if isinstance(self.fs, LocalFileSystem):
            tmp = self.abs(f"{rel}.tmp")
            self.fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, self.abs(rel))
        else:
            self.fs.pipe_file(self.abs(rel), data)

    def move_in(self, src: str, rel: str) -> None:
        """Moves a staged file to ``rel``: a rename on disks, a whole-object copy on object stores."""
        self.fs.makedirs(posixpath.dirname(self.abs(rel)), exist_ok=True)
        self.fs.mv(src, self.abs(rel))

    def touch(self, rel: str) -> None:
        self.fs.makedirs(posixpath.dirname(self.abs(rel)), exist_ok=True)
        self.fs.pipe_file(self.abs(rel), b"")

    def remove(self, rel: str) -> None:
        if self.fs.exists(self.abs(rel)):
            self.fs.rm(self.abs(rel), recursive=True)

    def listing(self) -> list[str]:
        self.fs.invalidate_cache()
        if not self.fs.exists(self.path):
            return []
        return [self.rel(p) for p in self.fs.find(self.path)]

    def visible_parquet(self, names: list[str]) -> set[str]:
        return {n for n in names if n.endswith(".parquet") and not is_hidden(n)}


def recover(root: Root) -> int:
    """Undoes commits that a killed run left half done, and drops its staging. Returns how many."""
    names = root.listing()
    pending = sorted(n for n in names if n.startswith(PENDING) and n.endswith(".json"))
    for rel in pending:
        record = root.read_json(rel, {})
        for f in record.get("new_files", []):
            root.remove(f)  # its inputs are not in the ledger yet: they are redone
        root.remove(rel)
    for stale in {n.split("/", 1)[0] for n in names if n.startswith(sinks.STAGING_PREFIX)}:
        root.remove(stale)
    return len(pending)


def plan_inputs(versions: dict[str, str], ledger: dict, visible: set[str]) -> set[str]:
    """The inputs to (re)do: new, changed, or whose committed files are gone, plus every
    input sharing an output file with one of those."""
    todo = {u for u, v in versions.items() if ledger.get(u, {}).get("version") != v}
    todo |= {u for u, e in ledger.items() if u in versions and not set(e["files"]) <= visible}
    by_file = defaultdict(set)
    for u, e in ledger.items():
        for f in e["files"]:
            by_file[f].add(u)
    grow = set(todo)
    while grow:
        u = grow.pop()
        for f in ledger.get(u, {}).get("files", []):
            for v in by_file[f] - todo:
                if v in versions:
                    todo.add(v)
                    grow.add(v)
    return todo


def _per_input(staged: list[str], root: Root, storage_options) -> dict[str, dict[str, list[int]]]:
    """staged path → input URI → [rows, errors], read from the staged files themselves."""
    from pipeline.sinks import _arrow_fs

    fs = _arrow_fs(root.uri, storage_options)
    out = {}
    for path in staged:
        t = pq.read_table(path, columns=[C.SOURCE, C.STATUS], filesystem=fs)
        counts: dict[str, list[int]] = {}
        for src, status in zip(t[C.SOURCE].to_pylist(), t[C.STATUS].to_pylist(), strict=True):
            c = counts.setdefault(src, [0, 0])
            c[0] += 1
            c[1] += status != C.STATUS_OK
        out[path] = counts
    return out


def write_manifest(root: Root, partition: str, ledger: dict, plan, run_id: str) -> dict:
    inputs = {u: e for u, e in ledger.items() if e["partition"] == partition}
    files = sorted({f for e in inputs.values() for f in e["files"]})
    manifest = {
        "partition": partition,
        "inputs": [{"uri": u, **inputs[u]} for u in sorted(inputs)],
        "files": files,
        "rows": sum(e["rows"] for e in inputs.values()),
        "errors": sum(e["errors"] for e in inputs.values()),
        "model": plan.weights.model if plan else None,
        "weights": plan.weights.tag if plan else None,
        "run_ids": sorted({e["run_id"] for e in inputs.values()}),
        "last_run_id": run_id,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    root.write_json(f"{partition}/{MANIFEST}", manifest)
    return manifest


def check_date(text: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text or ""):
        raise ConfigError(f"--date must be YYYY-MM-DD, got {text!r}")
    try:
        datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise ConfigError(f"--date is not a calendar date: {text!r}") from None
    return text


def run_nightly(config: RunConfig, date: str, max_error_fraction: float = 0.01) -> NightlyResult:
    """Processes what is new under the input into ``<output>/dt=<date>/``; see the module doc."""
    check_date(date)
    if not 0 <= max_error_fraction <= 1:
        raise ConfigError(f"--max-error-fraction must be within 0..1, got {max_error_fraction}")
    so = config.storage_options
    partition = f"dt={date}"
    listing = sources.list_input(config.source.input, config.source.format, so)
    root = Root(config.sink.output, so)
    if recover(root):
        print("recovered an interrupted commit: its inputs are redone", file=sys.stderr)
    ledger = root.read_json(LEDGER, {})
    visible = root.visible_parquet(root.listing())
    # The ledger is keyed by the inputs' URIs as the `source` column holds them: redacted.
    real = {redact(u): u for u in listing.versions}
    versions = {key: listing.versions[u] for key, u in real.items()}
    todo = plan_inputs(versions, ledger, visible)
    if not todo:
        return NightlyResult(
            0, f"nothing new under {config.source.input}; {len(ledger)} inputs done", partition
        )

    plan = runner.prepare(config, listing=listing.only({real[u] for u in todo}), check_output=False)
    run_id = runner.new_run_id()
    staging = sinks.staging_dir(root.uri, run_id)
    ex = runner.execute(plan, staging)

    counts = _per_input(ex.staged, root, so)
    moves = {p: f"{partition}/{posixpath.basename(p)}" for p in ex.staged}
    old_files = sorted({f for u in todo for f in ledger.get(u, {}).get("files", [])})
    root.write_json(f"{PENDING}{run_id}.json", {"new_files": sorted(moves.values()), "old_files": old_files})
    for f in old_files:
        root.remove(f)
    for src, dst in moves.items():
        root.move_in(src, dst)

    new_ledger = {u: e for u, e in ledger.items() if u not in todo and not set(e["files"]) & set(old_files)}
    touched = {partition} | {ledger[u]["partition"] for u in ledger if u not in new_ledger}
    for u in sorted(todo):
        files = sorted(moves[p] for p, c in counts.items() if u in c)
        rows = sum(c[u][0] for c in counts.values() if u in c)
        errors = sum(c[u][1] for c in counts.values() if u in c)
        new_ledger[u] = {
            "version": versions[u],
            "partition": partition,
            "files": files,
            "rows": rows,
            "errors": errors,
            "run_id": run_id,
        }
    root.write_json(LEDGER, new_ledger)
    root.remove(f"{PENDING}{run_id}.json")
    root.remove(f"{sinks.STAGING_PREFIX}{run_id}")

    for p in sorted(touched):
        write_manifest(root, p, new_ledger, plan, run_id)
    rows = sum(c[0] for per in counts.values() for c in per.values())
    errors = sum(c[1] for per in counts.values() for c in per.values())
    base = dict(partition=partition, run_id=run_id, inputs=len(todo), rows=rows, errors=errors)
    if rows and errors / rows > max_error_fraction:
        root.remove(f"{partition}/{SUCCESS}")
        return NightlyResult(
            EXIT_OVER_BUDGET,
            f"{errors} of {rows} images are errors ({errors / rows:.1%}), above --max-error-fraction "
            f"{max_error_fraction:g}: rows written, {partition}/{SUCCESS} not written",
            **base,
        )
    root.touch(f"{partition}/{SUCCESS}")
    return NightlyResult(0, f"{rows} rows ({errors} errors) from {len(todo)} inputs into {partition}", **base)
