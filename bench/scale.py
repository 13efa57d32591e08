"""`make bench-scale`: what the driver does per input, at 10k, 100k and 1M inputs.

    python bench/scale.py [--sizes 10000,100000,1000000] [--before] [--work /tmp/pipeline-scale]

Synthetic inputs: empty placeholder tar shards (the driver never opens them) named
``shard-000000.tar`` ..., listed through a brace pattern, and an output root whose ledger
says every input is done, 100 inputs per (placeholder) output file. For each size it
times, with the project's own functions and no Ray cluster:
  1. listing   - ``list_input`` of the brace pattern (one LIST of the folder);
  2. planning  - the shards and the read tasks Ray Data would run (``ShardDatasource``);
  3. ledger    - save, load, and plan a night where nothing changed (``pipeline.ledger``:
                 one Parquet file per partition, planned with Arrow compute);
  4. commit    - the nightly bookkeeping of a night that redoes every input (ledger
                 entries and manifests from the staged files' counts) and the journal's
                 apply for the output files (moves on a local disk);
  5. no-op     - ``nightly`` on a root where nothing is new: in this process, then as a
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

from pipeline import cli, incremental, ledger, sinks, sources  # noqa: E402
from pipeline import run as runner  # noqa: E402
from pipeline.commit import Journal, Root, _apply  # noqa: E402
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


def counts_of(keys: list[str], partition: str):
    """``Sink.rows_per_source``'s table for ``keys``: 10 rows each, 100 inputs per file."""
    import pyarrow as pa

    files = [f"{partition}/part-{i // INPUTS_PER_FILE:06d}.parquet" for i in range(len(keys))]
    n = len(keys)
    return pa.table({"file": files, "source": keys, "rows": pa.array([10] * n, pa.int64()),
                     "errors": pa.array([0] * n, pa.int64())}, schema=sinks.counts_schema())  # fmt: skip


def done_root(out: str, listing, fingerprint: str):
    """An output root whose ledger says every input is done; returns the ledger's table."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(f"{out}/dt={DATE}")
    keys = sorted(redact(u) for u in listing.versions)
    counts = counts_of(keys, f"dt={DATE}")
    table = ledger.entries(keys, counts, listing.versions, f"dt={DATE}", "bench", fingerprint)
    for name in sorted(set(counts["file"].to_pylist())):
        open(f"{out}/{name}", "wb").close()
    save_ledger(Root(out), table)
    return table


def save_ledger(root: Root, table) -> None:
    """What a commit writes of the ledger of a partition (one partition here)."""
    import pyarrow.parquet as pq

    path = root.abs(f"{ledger.FOLDER}/dt={DATE}/bench.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def bookkeeping(book, versions: dict, plan, run_id: str):
    """A night that redoes every input: the staged files' counts → ledger and manifests."""
    counts = counts_of(sorted(versions), "dt=2026-11-02")
    return incremental.bookkeeping(book, sorted(versions), versions, counts, "dt=2026-11-02", plan, run_id)


def apply_moves(work: str, n_files: int) -> None:
    """The journal's apply on a local root: ``n_files`` staged files moved into place."""
    out = f"{work}/commit"
    shutil.rmtree(out, ignore_errors=True)
    staged = f"{out}/_staging-bench"
    os.makedirs(staged)
    for i in range(n_files):
        open(f"{staged}/part-{i:06d}.parquet", "wb").close()
    moves = [
        (f"_staging-bench/part-{i:06d}.parquet", f"dt={DATE}/part-{i:06d}.parquet") for i in range(n_files)
    ]
    _apply(Root(out), Journal("bench", moves=moves))


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


def run_size(n: int, work: str, with_before: bool) -> dict:
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
    table = done_root(out, listing, plan.fingerprint)
    root = Root(out)
    step("ledger save", lambda: save_ledger(root, table))
    loaded = step("ledger load", lambda: ledger.load(root))
    versions = {redact(u): v for u, v in listing.versions.items()}
    visible = root.data_files(sinks.get().is_data)
    todo = step("ledger plan", lambda: ledger.plan(loaded, versions, visible, plan.fingerprint).todo)
    assert not todo, f"{len(todo)} inputs planned on a root where every input is done"
    step("commit books", lambda: bookkeeping(loaded, versions, plan, "bench"))
    step("commit moves", lambda: apply_moves(work, -(-n // INPUTS_PER_FILE)))
    code = step("no-op nightly", lambda: cli.main(nightly_args(pattern, out)))
    assert code == 0, f"the no-op nightly exited {code}"
    command = [sys.executable, "-m", "pipeline", *nightly_args(pattern, out)]
    proc = step("no-op command", lambda: subprocess.run(command, cwd=ROOT, capture_output=True, text=True))
    assert proc.returncode == 0 and "nothing new" in proc.stdout, proc.stderr[-2000:]
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
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"), help="folder for the JSON")
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {n: run_size(n, args.work, args.before) for n in sizes}
    growth = exponents(results) if len(sizes) > 1 else {}
    if growth:
        print(f"growth exponent {min(sizes)} → {max(sizes)} (1.0 is linear):")
        for name, e in growth.items():
            print(f"  {name:<16} {e:5.2f}")
    record = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
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
