"""Nightly incremental runs: only new or changed input files, exactly once, into ``dt=<date>``.

The output is a Delta table partitioned by ``dt`` (``pipeline.sinks.delta``), and the table
is its own ledger: every row carries its input's URI (``source``, credentials removed), the
input's version when it was read (``source_version``: size plus ETag or mtime) and the
fingerprint of what made it (``fingerprint``). A night reads those columns of the current
snapshot (``Table.inputs``), plans with Arrow compute, runs what it must, and makes one
commit: the new rows added, and the files holding the old rows of every input it redid
removed. Rows of other inputs in those files are written again (``KeptRows``: they keep
their ``dt``), so replacement is in proportion to the change and nothing is copied by hand.

A root holds the rows of one model: a night whose model, weights, preprocessing or heads
differ from those of any row in the table is refused before any work, unless
``--backfill`` is given, which redoes every listed input made by another model in the
same one-commit way; ``--max-inputs`` bounds a night, the next nights do the rest.
Inputs no longer listed keep their rows, unless ``--prune-missing`` drops them.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, replace
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import columns as C
from pipeline import run as runner
from pipeline import sinks, sources
from pipeline.bulk import bulk
from pipeline.config import ConfigError, RunConfig
from pipeline.errors import EXIT_OVER_ERROR_BUDGET
from pipeline.sources import InputError
from pipeline.storage import redact


@dataclass(frozen=True)
class NightlyResult:
    exit_code: int
    message: str
    partition: str
    run_id: str = ""
    inputs: int = 0
    rows: int = 0
    errors: int = 0
    version: int | None = None


@dataclass(frozen=True)
class Night:
    """What a night has to do, from the listing and the table."""

    todo: list[str]  # inputs to run tonight: new and changed ones first, then backfills
    left: int  # inputs planned but left for later nights (--max-inputs)
    others: list[str]  # fingerprints of other models that made rows anywhere in the table
    prune: list[str]  # inputs no longer listed whose rows go (--prune-missing)
    removes: list  # sinks.LiveFile: the files holding rows of ``todo`` or ``prune``
    kept: sinks.KeptRows | None  # rows of ``removes`` of other inputs, written again
    done: int  # inputs in the table
    unlisted_others: int = 0  # inputs not listed tonight whose rows another model made


def check_date(text: str | None) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text or ""):
        raise ConfigError(f"--date must be YYYY-MM-DD, got {text!r}")
    try:
        datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise ConfigError(f"--date is not a calendar date: {text!r}") from None
    return text


@bulk
def plan(
    inputs: pa.Table,
    versions: dict[str, str],
    fingerprint: str,
    files: list,
    backfill: bool = False,
    max_inputs: int = 0,
    prune_missing: bool = False,
) -> Night:
    """Which listed inputs (``versions``: URI as stored → version) to do tonight.

    ``inputs``: ``Table.inputs()`` of the snapshot; ``files``: its ``LiveFile``s. An input is
    redone when it is new, its version changed, or the table holds it at more than one
    version; backfilled when a model other than ``fingerprint`` made its rows (rows without
    a fingerprint count as this model's). ``others`` names every other fingerprint in the
    table, listed tonight or not: a night without ``backfill`` is refused on it.
    """
    keys = pa.array(sorted(versions), pa.string())
    wanted = pa.array([versions[k] for k in keys.to_pylist()], pa.string())
    trip = (
        inputs.select([C.SOURCE, C.SOURCE_VERSION, C.FINGERPRINT])
        .group_by([C.SOURCE, C.SOURCE_VERSION, C.FINGERPRINT], use_threads=False)
        .aggregate([])
    )
    src = trip[C.SOURCE].combine_chunks()
    uniq = pc.unique(src)
    counts = pc.value_counts(src)
    mixed = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    first = pc.index_in(uniq, value_set=src)
    version = trip[C.SOURCE_VERSION].combine_chunks().take(first)
    made_by = trip[C.FINGERPRINT].combine_chunks().take(first)
    at = pc.index_in(keys, value_set=uniq)
    changed = pc.fill_null(pc.not_equal(version.take(at), wanted), True)
    redo = pc.or_(changed, pc.is_in(keys, value_set=mixed))
    other = pc.fill_null(pc.not_equal(made_by.take(at), fingerprint), False)
    todo_redo = keys.filter(redo).to_pylist()
    todo_backfill = keys.filter(pc.and_(pc.invert(redo), other)).to_pylist()
    planned = todo_redo + todo_backfill if backfill else todo_redo
    todo = planned[:max_inputs] if max_inputs else planned
    others = sorted({f for f in pc.unique(trip[C.FINGERPRINT]).to_pylist() if f and f != fingerprint})
    unlisted = pc.invert(pc.is_in(uniq, value_set=keys))
    unlisted_others = pc.sum(pc.and_(unlisted, pc.fill_null(pc.not_equal(made_by, fingerprint), False)))
    prune = uniq.filter(unlisted).to_pylist() if prune_missing else []

    drop = pa.array(sorted({*todo, *prune}), pa.string())
    going = pc.is_in(inputs[C.SOURCE], value_set=drop)
    touched = set(pc.unique(inputs["file"].filter(going)).to_pylist())
    staying = inputs.filter(
        pc.and_(pc.invert(going), pc.is_in(inputs["file"], value_set=pa.array(sorted(touched), pa.string())))
    )
    carry = set(staying["file"].to_pylist())
    removes = [f for f in files if f.path in touched]
    kept = None
    if carry:
        in_carry = inputs.filter(
            pc.and_(going, pc.is_in(inputs["file"], value_set=pa.array(sorted(carry), pa.string())))
        )
        kept = sinks.KeptRows(
            files=[f for f in removes if f.path in carry],
            drop=set(in_carry[C.SOURCE].to_pylist()),
            rows=pc.sum(staying["rows"]).as_py() or 0,
        )
    return Night(
        todo=todo,
        left=len(planned) - len(todo),
        others=others,
        prune=prune,
        removes=removes,
        kept=kept,
        done=len(uniq),
        unlisted_others=(unlisted_others.as_py() or 0) if not prune_missing else 0,
    )


def ledger_keys(uris) -> dict[str, str]:
    """Each input's key in the table (its URI as the ``source`` column holds it: redacted)
    → the input. Two inputs whose URIs differ only in what redaction removes (HTTP URLs
    differing in their query) would be one key, and one of them never done: refused."""
    real: dict[str, str] = {}
    for u in uris:
        key = redact(u)
        if real.setdefault(key, u) != u:
            raise InputError(
                f"two inputs are both {key} once credentials are removed; the nightly table "
                "cannot tell them apart: give them names that differ outside the query string"
            )
    return real


def run_nightly(
    config: RunConfig,
    date: str,
    max_error_fraction: float = 0.01,
    backfill: bool = False,
    max_inputs: int = 0,
    prune_missing: bool = False,
    retention_hours: float = sinks.RETENTION_HOURS,
) -> NightlyResult:
    """Processes what is new under the input into the table's ``dt=<date>``; see the module doc.

    Args:
        backfill: recompute every listed input whose rows another model (``Plan.fingerprint``)
            made; without it, a table holding such rows is refused before any work.
        max_inputs: redo at most this many inputs (0: all), new and changed ones first; the
            rest are planned again by the next night.
        prune_missing: drop the rows of inputs no longer listed, in the same commit.
        retention_hours: upkeep's vacuum keeps what the last this many hours need.
    """
    check_date(date)
    if not 0 <= max_error_fraction <= 1:
        raise ConfigError(f"--max-error-fraction must be within 0..1, got {max_error_fraction}")
    if max_inputs < 0:
        raise ConfigError(f"--max-inputs must be 0 (no limit) or more, got {max_inputs}")
    if retention_hours < 0:
        raise ConfigError(f"--retention-hours must be 0 or more, got {retention_hours:g}")
    if config.sink.overwrite:
        raise ConfigError("nightly takes no --overwrite: it replaces changed inputs' rows by itself")
    so = config.storage_options
    listing = sources.list_input(config.source.input, config.source.format, so)
    if config.source.verbose:
        for uri, why in listing.skips:
            print(redact(f"skipped   {uri}: {why}"), file=sys.stderr)
    real = ledger_keys(listing.versions)
    versions = {key: listing.versions[u] for key, u in real.items()}
    # Weights and preprocessing are settled for the whole listing before anything runs.
    plan = runner.prepare(config, listing=listing, check_output=False, load_weights=False)
    table = plan.table
    table.check_writable(plan.schema, partitioned=True, replace=False)
    night = _plan(table, versions, plan.fingerprint, backfill, max_inputs, prune_missing)
    uri = redact(table.uri)
    if night.others and not backfill:
        raise ConfigError(
            f"{uri} holds rows of {night.others[0]}"
            f"{f' (and {len(night.others) - 1} more)' if len(night.others) > 1 else ''}, not of "
            f"{plan.fingerprint}; pass --backfill to recompute every input with this model"
        )
    partition = f"{C.PARTITION}={date}"
    if not night.todo and not night.prune:
        return NightlyResult(
            0, f"nothing new under {config.source.input}; {night.done} inputs done", partition
        )
    if night.todo:
        plan.weights.state_dict  # noqa: B018  (loaded now that there is work: one line if missing)
    if night.unlisted_others and backfill:
        print(
            f"warning: {night.unlisted_others} inputs no longer listed keep rows of another model; "
            "--prune-missing drops them",
            file=sys.stderr,
        )
    run_id = runner.new_run_id()
    kept = night.kept
    replaced = sum(f.rows for f in night.removes) - (kept.rows if kept else 0)
    info = {
        **plan.facts(),
        "command": "nightly",
        "partition": partition,
        "inputs": len(night.todo),
        "inputs_pruned": len(night.prune),
        "max_error_fraction": max_error_fraction,
    }
    tx = table.transaction(
        run_id,
        plan.schema,
        partition=date,
        removes=night.removes,
        carried_rows=kept.rows if kept else 0,
        info=info,
    )
    verdict: dict = {}

    def facts(files) -> dict:
        new = [f for f in files if not f.carried]
        rows, errors = sum(f.rows for f in new), sum(f.errors for f in new)
        held = not (rows and errors / rows > max_error_fraction)
        verdict.update(rows=rows, errors=errors, held=held)
        return {"rows": rows, "errors": errors, "rows_replaced": replaced,
                "rows_carried": kept.rows if kept else 0, "error_budget_held": held}  # fmt: skip

    plan = replace(plan, listing=listing.only({real[k] for k in night.todo}))
    ex = runner.execute(plan, tx, kept=kept, facts=facts)
    touched = {date, *(f.partition for f in (kept.files if kept else []))}
    for line in sinks.maintain(table, sorted(p for p in touched if p), retention_hours):
        print(f"upkeep    {line}", file=sys.stderr)

    rows, errors = verdict["rows"], verdict["errors"]
    base = dict(partition=partition, run_id=run_id, inputs=len(night.todo), rows=rows, errors=errors,
                version=ex.committed.version)  # fmt: skip
    later = f"; {night.left} inputs left for later nights (--max-inputs {max_inputs})" if night.left else ""
    pruned = f"; dropped the rows of {len(night.prune)} inputs no longer listed" if night.prune else ""
    if not verdict["held"]:
        return NightlyResult(
            EXIT_OVER_ERROR_BUDGET,
            f"{errors} of {rows} images are errors ({errors / rows:.1%}), above --max-error-fraction "
            f"{max_error_fraction:g}: rows committed in version {ex.committed.version} of {uri}, "
            f"marked over the error budget{later}{pruned}",
            **base,
        )
    return NightlyResult(
        0,
        f"{rows} rows ({errors} errors) from {len(night.todo)} inputs into {partition}, "
        f"version {ex.committed.version} of {uri}{later}{pruned}",
        **base,
    )


def _plan(table, versions, fingerprint, backfill, max_inputs, prune_missing) -> Night:
    files = table.files()
    return plan(table.inputs(files), versions, fingerprint, files, backfill, max_inputs, prune_missing)
