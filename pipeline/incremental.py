"""Nightly incremental runs: only new or changed input files, exactly once, even when killed.

Layout under ROOT (readers skip every path with a part starting with ``_`` or ``.``):

    dt=YYYY-MM-DD/part-*.parquet        the data
    dt=YYYY-MM-DD/_SUCCESS              the partition's last run finished within its error budget
    dt=YYYY-MM-DD/_manifest.json        inputs, row counts, files, model, weights, preprocessing,
                                        model fingerprints, run ids
    _state/ledger/dt=…/<run>.parquet    per partition, its inputs: URI → version (size:ETag|mtime),
                                        files, rows, the model fingerprint (``pipeline.ledger``)
    _lock.json, _state/commit-*.json,   the lease, and the commit in progress (``pipeline.commit``)
    _staging-<run>/

A night runs under the root's lease: it finishes whatever commit an earlier run left
(``commit.recover``), plans the inputs that are new, changed, or whose files are gone,
runs them into staging, and commits in one journal: the old files of every input it
redid go, its files move into ``dt=<date>/``, and the touched partitions' ledger files and
manifests and ``_SUCCESS`` are written. A run killed anywhere is finished or undone by
the next one, so every input is in the output exactly once.

A root holds the rows of one model: a night whose model, weights, preprocessing or heads
differ from those of the inputs done is refused before any work, unless ``--backfill``
is given, which redoes every such input with the new model in the same one-commit way;
with ``--max-inputs`` a night redoes at most that many, and the next nights the rest.

Replacement is in proportion to the change. An output file holds the rows of many inputs
(``--rows-per-file``); when one of them is redone, the file is carried over without that
input's rows (the sink's ``carry``: a copy, no model) and replaced in the same journal, so
the other inputs keep their rows, their partition and their run id.
"""

from __future__ import annotations

import posixpath
import re
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import ledger, sinks, sources
from pipeline import run as runner
from pipeline.bulk import bulk
from pipeline.commit import Journal, Lease, Root, commit, recover, staging_rel
from pipeline.config import ConfigError, RunConfig
from pipeline.errors import EXIT_OVER_ERROR_BUDGET
from pipeline.sources import InputError
from pipeline.storage import redact

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"


@dataclass(frozen=True)
class NightlyResult:
    exit_code: int
    message: str
    partition: str
    run_id: str = ""
    inputs: int = 0
    rows: int = 0
    errors: int = 0


def manifest(partition: str, inputs: pa.Table, plan, run_id: str) -> dict:
    """A partition's ``_manifest.json``, from its ledger (``ledger.update``'s table of it).

    ``model``, ``weights`` and ``preprocessing`` are the night's when every row of the
    partition is of its model, and None when some are another's (a backfill under way, in
    a partition whose files were carried over); ``fingerprints`` names them all.
    """
    t = inputs.sort_by("uri")
    prints = sorted(f for f in pc.unique(t["model"]).to_pylist() if f)
    ours = plan is not None and all(f == plan.fingerprint for f in prints)
    return {
        "partition": partition,
        "inputs": t.drop_columns(["partition"]).to_pylist(),
        "files": sorted(pc.unique(pc.list_flatten(t["files"])).to_pylist()),
        "rows": pc.sum(t["rows"]).as_py() or 0,
        "errors": pc.sum(t["errors"]).as_py() or 0,
        "model": plan.weights.model if ours else None,
        "weights": plan.weights.tag if ours else None,
        "preprocessing": plan.weights.preprocessing() if ours else None,
        "fingerprints": prints,
        "run_ids": sorted(pc.unique(t["run_id"]).to_pylist()),
        "last_run_id": run_id,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@bulk
def bookkeeping(
    book: ledger.Ledger,
    todo,
    versions: dict,
    counts: pa.Table,
    partition: str,
    plan,
    run_id: str,
    renamed: dict[str, str] | None = None,
) -> tuple[dict, dict[str, object]]:
    """What a night that did ``todo`` commits, in passes linear in what it touched: the new
    ledger of each touched partition, and those partitions' manifests.

    ``counts``: rows and errors per committed file and input (``ledger.entries``);
    ``renamed``: each carried file → its new name.
    """
    done = ledger.entries(todo, counts, versions, partition, run_id, plan.fingerprint)
    tables = ledger.update(book, todo, done, renamed or {}, partition)
    writes: dict[str, object] = {f"{p}/{MANIFEST}": manifest(p, t, plan, run_id) for p, t in tables.items()}
    return tables, writes


def check_date(text: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text or ""):
        raise ConfigError(f"--date must be YYYY-MM-DD, got {text!r}")
    try:
        datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise ConfigError(f"--date is not a calendar date: {text!r}") from None
    return text


def run_nightly(
    config: RunConfig,
    date: str,
    max_error_fraction: float = 0.01,
    backfill: bool = False,
    max_inputs: int = 0,
) -> NightlyResult:
    """Processes what is new under the input into ``<output>/dt=<date>/``; see the module doc.

    Args:
        backfill: recompute every input whose rows another model (``Plan.fingerprint``)
            made; without it, a root holding such rows is refused before any work.
        max_inputs: redo at most this many inputs (0: all), new and changed ones first; the
            rest are planned again by the next night.
    """
    check_date(date)
    if not 0 <= max_error_fraction <= 1:
        raise ConfigError(f"--max-error-fraction must be within 0..1, got {max_error_fraction}")
    if max_inputs < 0:
        raise ConfigError(f"--max-inputs must be 0 (no limit) or more, got {max_inputs}")
    so = config.storage_options
    partition = f"dt={date}"
    listing = sources.list_input(config.source.input, config.source.format, so)
    real = ledger_keys(listing.versions)
    versions = {key: listing.versions[u] for key, u in real.items()}
    root = Root(config.sink.output, so)
    run_id = runner.new_run_id()
    with Lease(root, run_id) as lease:
        if recover(root):
            print("recovered the interrupted commit of an earlier run", file=sys.stderr)
        names = root.listing()
        book = ledger.load(root, names)
        sink = sinks.get()
        visible = [n for n in names if sink.is_data(n)]
        # Weights and preprocessing are settled for the whole listing before anything runs.
        plan = runner.prepare(config, listing=listing, check_output=False, load_weights=False)
        planned = ledger.plan(book, versions, visible, plan.fingerprint)
        if planned.others and not backfill:
            others = planned.others
            raise ConfigError(
                f"{root.uri} holds rows of {others[0]}"
                f"{f' (and {len(others) - 1} more)' if len(others) > 1 else ''}, not of "
                f"{plan.fingerprint}; pass --backfill to recompute every input with this model"
            )
        todo = planned.todo[:max_inputs] if max_inputs else planned.todo
        left = len(planned.todo) - len(todo)
        if not todo:
            return NightlyResult(
                0, f"nothing new under {config.source.input}; {len(book)} inputs done", partition
            )

        plan.weights.state_dict  # noqa: B018  (loaded now that there is work: one line if missing)
        plan = replace(plan, listing=listing.only({real[u] for u in todo}))
        ex = runner.execute(plan, sinks.staging_dir(root.uri, run_id))

        counts = sink.rows_per_source(ex.staged, root.uri, so)
        moves = {root.rel(p): f"{partition}/{posixpath.basename(p)}" for p in ex.staged}
        rows, errors = (pc.sum(counts[c]).as_py() or 0 for c in ("rows", "errors"))
        committed = [moves[root.rel(p)] for p in counts["file"].to_pylist()]
        counts = counts.set_column(0, "file", pa.array(committed, pa.string()))
        runner.check_rows(ex.rows, rows, "the staged files")
        over = bool(rows) and errors / rows > max_error_fraction
        gone, shared = ledger.shared_files(book, todo, visible)
        renamed = carry(root, sink, shared, set(todo), run_id, so, moves)
        tables, writes = bookkeeping(book, todo, versions, counts, partition, plan, run_id, renamed)
        ledger_deletes, ledger_moves = ledger.stage(root, run_id, tables, book)
        journal = Journal(
            run_id,
            deletes=[*gone, *shared, *ledger_deletes],
            moves=[*moves.items(), *ledger_moves],
            writes=writes,
            markers={f"{partition}/{SUCCESS}": not over},
        )
        lease.check()  # right before the commit point: a run taken over never commits
        commit(root, journal)

    base = dict(partition=partition, run_id=run_id, inputs=len(todo), rows=rows, errors=errors)
    later = f"; {left} inputs left for later nights (--max-inputs {max_inputs})" if left else ""
    if over:
        return NightlyResult(
            EXIT_OVER_ERROR_BUDGET,
            f"{errors} of {rows} images are errors ({errors / rows:.1%}), above --max-error-fraction "
            f"{max_error_fraction:g}: rows written, {partition}/{SUCCESS} not written{later}",
            **base,
        )
    return NightlyResult(
        0, f"{rows} rows ({errors} errors) from {len(todo)} inputs into {partition}{later}", **base
    )


def ledger_keys(uris) -> dict[str, str]:
    """The ledger's key of each input (its URI as the ``source`` column holds it: redacted)
    → the input. Two inputs whose URIs differ only in what redaction removes (HTTP URLs
    differing in their query) would be one key, and one of them never done: refused."""
    real: dict[str, str] = {}
    for u in uris:
        key = redact(u)
        if real.setdefault(key, u) != u:
            raise InputError(
                f"two inputs are both {key} once credentials are removed; the nightly ledger "
                "cannot tell them apart: give them names that differ outside the query string"
            )
    return real


def carry(root: Root, sink, files: list[str], drop: set[str], run_id: str, so, moves: dict) -> dict[str, str]:
    """Stages each of ``files`` (committed, shared with inputs that keep their rows) without
    the rows of ``drop``, under a new name in its own partition; adds the moves to ``moves``.
    Returns each file's new name."""
    renamed = {}
    for i, rel in enumerate(files):
        folder = posixpath.dirname(rel)
        staged = f"{staging_rel(run_id)}/_carry/{folder}/{i:06d}{sink.extension}"
        root.fs.makedirs(posixpath.dirname(root.abs(staged)), exist_ok=True)
        sink.carry(root.abs(rel), root.abs(staged), drop, root.uri, so)
        renamed[rel] = moves[staged] = f"{folder}/part-carried-{i:06d}-{run_id}{sink.extension}"
    return renamed
