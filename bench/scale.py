"""`make bench-scale`: what the driver does per input, at 10k, 100k and 1M inputs.

    python bench/scale.py [--sizes 10000,100000,1000000] [--before] [--work /tmp/pipeline-scale]

Synthetic inputs: empty placeholder tar shards (the driver never opens them) named
``shard-000000.tar`` ..., listed through a brace pattern, and an output table whose rows
say every input is done: ``--rows-per-input`` rows each (default 10), 100 inputs per data
file, written by the sink's own ``write_file`` and committed by its own transaction. For
each size it times, with the project's own functions and no Ray cluster:
  1. listing   - ``list_input`` of the brace pattern (one LIST of the folder);
  2. planning  - the shards and the read tasks Ray Data would run (``ShardDatasource``);
  3. table     - load the snapshot (Delta's log), read what each file holds of each input
                 (``Table.inputs``: the planning columns only), and plan a night where
                 nothing changed (``incremental.plan``, Arrow compute);
  4. commit    - the one commit of a night that redoes every input: every old file
                 removed, as many new ones added (checks, the Delta commit, the row check);
  5. no-op     - ``nightly`` on a table where nothing is new: in this process, then as a
                 whole command (``python -m pipeline nightly``: Python, imports and all).
Each line gives seconds (the best of up to 5 runs for a step under a second) and the
driver's resident memory growth (its first run); then the growth
exponent of each step from the smallest to the largest size (1.0 is linear). With
--before it also times what planning used to be (``ray.data.from_items``, one block per
shard, on a local Ray), at up to 10k shards. Writes bench/results/<date>-scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import cli, incremental, sinks, sources  # noqa: E402
from pipeline import columns as C  # noqa: E402
from pipeline import run as runner  # noqa: E402
from pipeline.sources.datasource import ShardDatasource  # noqa: E402
from pipeline.storage import redact  # noqa: E402

INPUTS_PER_FILE = 100
DATE = "2026-11-01"


def measure(fn, budget_s: float = 1.0, repeats: int = 5):
    """(seconds, MiB of resident memory the driver grew by, result). A step under
    ``budget_s`` runs again, up to ``repeats`` times, and its best time counts: at 10k
    inputs most steps take milliseconds, where one run's noise would move the exponent."""
    proc = psutil.Process()
    before = proc.memory_info().rss
    t0 = time.perf_counter()
    out = fn()
    best = spent = time.perf_counter() - t0
    grown = (proc.memory_info().rss - before) / 2**20
    for _ in range(repeats - 1):
        if spent >= budget_s:
            break
        t0 = time.perf_counter()
        fn()
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
    return best, grown, out


def make_shards(folder: str, n: int) -> None:
    """``n`` empty ``shard-NNNNNN.tar`` files (kept between runs)."""
    if os.path.isdir(folder) and len(os.listdir(folder)) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for i in range(n):
        open(os.path.join(folder, f"shard-{i:06d}.tar"), "wb").close()


def nightly_args(pattern: str, out: str) -> list[str]:
    return ["nightly", "--input", pattern, "--output", out, "--format", "webdataset", "--date", DATE,
            "--model", "resnet18", "--weights", "none", "--task", "features"]  # fmt: skip


def data(keys: list[str], versions: dict, fingerprint: str, rows_per_input: int):
    """The rows of ``keys``, ``rows_per_input`` each: the contract's columns, a 4-d embedding."""
    import numpy as np

    n = len(keys) * rows_per_input
    src = np.repeat(np.array(keys, dtype=object), rows_per_input)
    return C.to_table(
        "features", [f"{i}" for i in range(n)], list(src), [None] * n, model="resnet18", weights="none",
        embeddings=np.zeros((n, 4), np.float32), source_versions=[versions[k] for k in src],
        fingerprint=fingerprint, schema=C.output_schema("features", 4),
    ).cast(C.output_schema("features", 4))  # fmt: skip


def write_files(table, keys, versions, fingerprint, rows_per_input, tag: str) -> list:
    """100 inputs per data file, written as the write tasks write them."""
    out = []
    for i in range(0, len(keys), INPUTS_PER_FILE):
        chunk = keys[i : i + INPUTS_PER_FILE]
        rows = data(chunk, versions, fingerprint, rows_per_input)
        name = f"dt={DATE}/part-{tag}-{i // INPUTS_PER_FILE:06d}.parquet"
        out.append(sinks.write_file(rows, table.arrow_fs, table.path, name, {"dt": DATE}))
    return out


def done_table(out: str, listing, fingerprint: str, rows_per_input: int) -> None:
    """A nightly table whose rows say every listed input is done, in one commit."""
    shutil.rmtree(out, ignore_errors=True)
    keys = sorted(redact(u) for u in listing.versions)
    versions = {redact(u): v for u, v in listing.versions.items()}
    table = sinks.Table(out)
    files = write_files(table, keys, versions, fingerprint, rows_per_input, "done")
    table.transaction("bench", C.output_schema("features", 4), partition=DATE).commit(files)


def redo_everything(out: str, listing, fingerprint: str, rows_per_input: int):
    """The one commit of a night that redoes every input (its files written beforehand)."""
    keys = sorted(redact(u) for u in listing.versions)
    versions = {redact(u): v for u, v in listing.versions.items()}
    table = sinks.Table(out)
    files = write_files(table, keys, versions, fingerprint, rows_per_input, "redo")
    removes = table.files()

    def commit():
        tx = table.transaction("redo", C.output_schema("features", 4), partition=DATE, removes=removes)
        return tx.commit(files)

    return commit


def before_planning(listing) -> float:
    """What planning was: one ``from_items`` block per shard (local Ray)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address="local")
    try:
        items = [{"format": s.format, "root": s.root, "uris": list(s.uris), "size": s.size}
                 for s in sources.shards(listing)]  # fmt: skip
        t0 = time.perf_counter()
        ray.data.from_items(items, override_num_blocks=len(items))
        return time.perf_counter() - t0
    finally:
        ray.shutdown()


def run_size(n: int, work: str, with_before: bool, rows_per_input: int) -> dict:
    folder = f"{work}/in-{n}"
    t0 = time.perf_counter()
    make_shards(folder, n)
    print(f"# {n} inputs (made in {time.perf_counter() - t0:.1f} s)", flush=True)
    pattern = f"{folder}/shard-{{000000..{n - 1:06d}}}.tar"
    out = f"{work}/out-{n}"
    config = cli.config_from_args(cli.parse_args(cli.get_args_parser(), nightly_args(pattern, out)))
    r: dict = {}

    def step(name, fn):
        secs, mib, value = measure(fn)
        r[name] = {"s": round(secs, 4), "rss_mib": round(mib, 1)}
        print(f"  {name:<16} {secs:8.3f} s  {mib:+8.1f} MiB", flush=True)
        return value

    listing = step("listing", lambda: sources.list_input(pattern, "webdataset"))
    step("planning", lambda: ShardDatasource(sources.shards(listing)).get_read_tasks(200))
    if with_before and n <= 10_000:
        secs = before_planning(listing)
        r["planning_before"] = {"s": round(secs, 3)}
        print(f"  {'planning before':<16} {secs:8.2f} s  (from_items, one block per shard)", flush=True)
    plan = runner.prepare(config, listing=listing, check_output=False)
    t0 = time.perf_counter()
    done_table(out, listing, plan.fingerprint, rows_per_input)
    print(f"  (table of {n * rows_per_input} rows made in {time.perf_counter() - t0:.1f} s)", flush=True)
    table = step("table load", lambda: sinks.Table(out))
    files = table.files()
    inputs = step("table inputs", lambda: table.inputs(files))
    versions = {redact(u): v for u, v in listing.versions.items()}
    night = step("table plan", lambda: incremental.plan(inputs, versions, plan.fingerprint, files))
    assert not night.todo, f"{len(night.todo)} inputs planned on a table where every input is done"
    code = step("no-op nightly", lambda: cli.main(nightly_args(pattern, out)))
    assert code == 0, f"the no-op nightly exited {code}"
    command = [sys.executable, "-m", "pipeline", *nightly_args(pattern, out)]
    proc = step("no-op command", lambda: subprocess.run(command, cwd=ROOT, capture_output=True, text=True))
    assert proc.returncode == 0 and "nothing new" in proc.stdout, proc.stderr[-2000:]
    commit = redo_everything(out, listing, plan.fingerprint, rows_per_input)
    secs, mib, committed = measure(commit, repeats=1)
    r["commit"] = {"s": round(secs, 4), "rss_mib": round(mib, 1)}
    print(f"  {'commit':<16} {secs:8.3f} s  {mib:+8.1f} MiB", flush=True)
    assert committed.rows == n * rows_per_input
    return r


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()


def exponents(results: dict[int, dict]) -> dict[str, float]:
    lo, hi = min(results), max(results)
    out = {}
    for name in results[hi]:
        a, b = results[lo].get(name, {}).get("s"), results[hi][name]["s"]
        if a is not None and b is not None and name != "planning_before":
            out[name] = round(math.log(max(b, 1e-4) / max(a, 1e-4)) / math.log(hi / lo), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--before", action="store_true", help="also time from_items planning (up to 10k)")
    p.add_argument("--work", default="/tmp/pipeline-scale")
    p.add_argument("--rows-per-input", type=int, default=10, help="rows (images) of each input in the table")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"), help="folder for the JSON")
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {n: run_size(n, args.work, args.before, args.rows_per_input) for n in sizes}
    growth = exponents(results) if len(sizes) > 1 else {}
    if growth:
        print(f"growth exponent {min(sizes)} → {max(sizes)} (1.0 is linear):")
        for name, e in growth.items():
            print(f"  {name:<16} {e:5.2f}")
    record = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "rows_per_input": args.rows_per_input,
        "sizes": {str(n): r for n, r in results.items()},
        "growth_exponent": growth,
    }
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"{record['date']}-scale.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
