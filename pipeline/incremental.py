"""Nightly incremental runs: only new or changed input files, exactly once, even when killed.

Layout under ROOT (readers skip every path with a part starting with ``_`` or ``.``):

    dt=YYYY-MM-DD/part-*.parquet        the data
    dt=YYYY-MM-DD/_SUCCESS              the partition's last run finished within its error budget
    dt=YYYY-MM-DD/_manifest.json        inputs, row counts, files, model, weights, preprocessing,
                                        model fingerprints, run ids
    _state/ledger.json                  input URI → version (size:ETag|mtime), partition, files,
                                        rows, the model fingerprint (``Plan.fingerprint``)
    _lock.json, _state/commit-*.json,   the lease, and the commit in progress (``pipeline.commit``)
    _staging-<run>/

A night runs under the root's lease: it finishes whatever commit an earlier run left
(``commit.recover``), plans the inputs that are new, changed, or whose files are gone,
runs them into staging, and commits in one journal: the old files of every input it
redid go, its files move into ``dt=<date>/``, and the ledger, the touched partitions'
manifests and ``_SUCCESS`` are written. A run killed anywhere is finished or undone by
the next one, so every input is in the output exactly once.

A root holds the rows of one model: a night whose model, weights, preprocessing or heads
differ from those of the inputs done is refused before any work, unless ``--backfill``
is given, which redoes every such input with the new model in the same one-commit way.

An output file may hold rows of several inputs; when one of them changes, every input in
that file is redone with it, so the file is replaced whole rather than rewritten.
"""

from __future__ import annotations

import posixpath
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from pipeline import run as runner
from pipeline import sinks, sources
from pipeline.commit import Journal, Lease, Root, commit, recover
from pipeline.config import ConfigError, RunConfig
from pipeline.errors import EXIT_OVER_ERROR_BUDGET
from pipeline.storage import redact

LEDGER = "_state/ledger.json"
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


def plan_inputs(
    versions: dict[str, str], ledger: dict, visible: set[str], fingerprint: str | None = None
) -> set[str]:
    """The inputs to (re)do: new, changed, done by another model than ``fingerprint``, or
    whose committed files are gone, plus every input sharing an output file with one of those.

    Entries written before fingerprints were kept have none, and count as this model's.
    """
    todo = {u for u, v in versions.items() if ledger.get(u, {}).get("version") != v}
    if fingerprint:
        todo |= {u for u, e in ledger.items() if u in versions and e.get("model", fingerprint) != fingerprint}
    todo |= {u for u, e in ledger.items() if u in versions and not set(e["files"]) <= visible}
    by_file = defaultdict(set)
    for u, e in ledger.items():
        for f in e["files"]:
            by_file[f].add(u)
    grow, closed = list(todo), set()  # each file is closed over once: linear in the ledger
    while grow:
        u = grow.pop()
        for f in ledger.get(u, {}).get("files", []):
            if f in closed:
                continue
            closed.add(f)
            for v in by_file[f]:
                if v not in todo and v in versions:
                    todo.add(v)
                    grow.append(v)
    return todo


def manifest(partition: str, ledger: dict, plan, run_id: str) -> dict:
    """A partition's ``_manifest.json``, from the ledger entries that point into it.

    ``ledger`` may hold only those (``manifests`` passes each partition its own).
    """
    inputs = {u: e for u, e in ledger.items() if e["partition"] == partition}
    return {
        "partition": partition,
        "inputs": [{"uri": u, **inputs[u]} for u in sorted(inputs)],
        "files": sorted({f for e in inputs.values() for f in e["files"]}),
        "rows": sum(e["rows"] for e in inputs.values()),
        "errors": sum(e["errors"] for e in inputs.values()),
        "model": plan.weights.model if plan else None,
        "weights": plan.weights.tag if plan else None,
        "preprocessing": plan.weights.preprocessing() if plan else None,
        "fingerprints": sorted({e["model"] for e in inputs.values() if "model" in e}),
        "run_ids": sorted({e["run_id"] for e in inputs.values()}),
        "last_run_id": run_id,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def manifests(partitions, ledger: dict, plan, run_id: str) -> dict[str, dict]:
    """``manifest`` of each of ``partitions``, grouping the ledger by partition in one pass."""
    groups: dict[str, dict] = {p: {} for p in partitions}
    for u, e in ledger.items():
        group = groups.get(e["partition"])
        if group is not None:
            group[u] = e
    return {p: manifest(p, groups[p], plan, run_id) for p in sorted(groups)}


def entries(
    todo, counts: dict, moves: dict[str, str], versions: dict, partition: str, run_id: str, model: str
) -> dict:
    """The ledger entries of the inputs ``todo`` just done into ``partition``, in one pass
    over ``counts`` (staged file → input → [rows, errors]) rather than one per input;
    ``moves``: staged file → where it is committed; ``model``: the plan's fingerprint."""
    per_input = defaultdict(list)  # input → [(committed file, rows, errors)]
    for path, per in counts.items():
        for u, c in per.items():
            per_input[u].append((moves[path], c[0], c[1]))
    done = {}
    for u in sorted(todo):
        mine = per_input.get(u, ())
        done[u] = {
            "version": versions[u],
            "partition": partition,
            "files": sorted(f for f, _, _ in mine),
            "rows": sum(r for _, r, _ in mine),
            "errors": sum(e for _, _, e in mine),
            "run_id": run_id,
            "model": model,
        }
    return done


def bookkeeping(
    ledger: dict, todo: set[str], versions: dict, counts: dict, moves: dict, partition: str, plan, run_id: str
) -> tuple[list[str], dict[str, object]]:
    """What a night that did ``todo`` commits, in passes linear in the ledger: the old files
    it replaces, and the JSON it writes (the new ledger, the touched partitions' manifests).

    ``counts``: staged file → input → [rows, errors]; ``moves``: staged file → committed path.
    """
    old_files = sorted({f for u in todo for f in ledger.get(u, {}).get("files", [])})
    replaced = set(old_files)
    new_ledger = {u: e for u, e in ledger.items() if u not in todo and replaced.isdisjoint(e["files"])}
    touched = {partition} | {e["partition"] for u, e in ledger.items() if u not in new_ledger}
    new_ledger.update(entries(todo, counts, moves, versions, partition, run_id, plan.fingerprint))
    writes: dict[str, object] = {
        f"{p}/{MANIFEST}": m for p, m in manifests(touched, new_ledger, plan, run_id).items()
    }
    writes[LEDGER] = new_ledger
    return old_files, writes


def check_date(text: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text or ""):
        raise ConfigError(f"--date must be YYYY-MM-DD, got {text!r}")
    try:
        datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise ConfigError(f"--date is not a calendar date: {text!r}") from None
    return text


def other_models(ledger: dict, versions: dict[str, str], fingerprint: str) -> list[str]:
    """The fingerprints, other than ``fingerprint``, of the rows of inputs still listed."""
    return sorted(
        {
            e["model"]
            for u, e in ledger.items()
            if u in versions and e.get("model", fingerprint) != fingerprint
        }
    )


def run_nightly(
    config: RunConfig, date: str, max_error_fraction: float = 0.01, backfill: bool = False
) -> NightlyResult:
    """Processes what is new under the input into ``<output>/dt=<date>/``; see the module doc.

    Args:
        backfill: recompute every input whose rows another model (``Plan.fingerprint``)
            made; without it, a root holding such rows is refused before any work.
    """
    check_date(date)
    if not 0 <= max_error_fraction <= 1:
        raise ConfigError(f"--max-error-fraction must be within 0..1, got {max_error_fraction}")
    so = config.storage_options
    partition = f"dt={date}"
    listing = sources.list_input(config.source.input, config.source.format, so)
    root = Root(config.sink.output, so)
    run_id = runner.new_run_id()
    with Lease(root, run_id) as lease:
        if recover(root):
            print("recovered the interrupted commit of an earlier run", file=sys.stderr)
        ledger = root.read_json(LEDGER, {})
        sink = sinks.get()
        visible = set(root.data_files(sink.is_data))
        # The ledger is keyed by the inputs' URIs as the `source` column holds them: redacted.
        real = {redact(u): u for u in listing.versions}
        versions = {key: listing.versions[u] for key, u in real.items()}
        # Weights and preprocessing are settled for the whole listing before anything runs.
        plan = runner.prepare(config, listing=listing, check_output=False)
        others = other_models(ledger, versions, plan.fingerprint)
        if others and not backfill:
            raise ConfigError(
                f"{root.uri} holds rows of {others[0]}"
                f"{f' (and {len(others) - 1} more)' if len(others) > 1 else ''}, not of "
                f"{plan.fingerprint}; pass --backfill to recompute every input with this model"
            )
        todo = plan_inputs(versions, ledger, visible, plan.fingerprint)
        if not todo:
            return NightlyResult(
                0, f"nothing new under {config.source.input}; {len(ledger)} inputs done", partition
            )

        plan = replace(plan, listing=listing.only({real[u] for u in todo}))
        ex = runner.execute(plan, sinks.staging_dir(root.uri, run_id))
        lease.check()

        counts = sink.rows_per_source(ex.staged, root.uri, so)
        moves = {p: f"{partition}/{posixpath.basename(p)}" for p in ex.staged}
        rows = sum(c[0] for per in counts.values() for c in per.values())
        errors = sum(c[1] for per in counts.values() for c in per.values())
        runner.check_rows(ex.rows, rows, "the staged files")
        over = bool(rows) and errors / rows > max_error_fraction
        old_files, writes = bookkeeping(ledger, todo, versions, counts, moves, partition, plan, run_id)
        journal = Journal(
            run_id,
            deletes=old_files,
            moves=[(root.rel(p), dst) for p, dst in moves.items()],
            writes=writes,
            markers={f"{partition}/{SUCCESS}": not over},
        )
        commit(root, journal)

    base = dict(partition=partition, run_id=run_id, inputs=len(todo), rows=rows, errors=errors)
    if over:
        return NightlyResult(
            EXIT_OVER_ERROR_BUDGET,
            f"{errors} of {rows} images are errors ({errors / rows:.1%}), above --max-error-fraction "
            f"{max_error_fraction:g}: rows written, {partition}/{SUCCESS} not written",
            **base,
        )
    return NightlyResult(0, f"{rows} rows ({errors} errors) from {len(todo)} inputs into {partition}", **base)
