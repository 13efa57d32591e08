"""Our datasink (``sinks.TableSink``: write tasks, then one commit from the driver) against
Ray Data's own ``Dataset.write_delta``, on the same rows, on a local Ray.

    python bench/sink.py [--rows 20000] [--repeats 3] [--work /tmp/pipeline-sink]

The rows are the output contract's (``--task features``, 2048-d float32 embeddings, made
once and held in Ray's object store), written in blocks of ``--rows-per-file`` rows. Each
repeat writes a fresh table with each sink in turn, interleaved; it prints the seconds,
the rows and MB per second, the files each wrote and whether the files' min/max
statistics reached the log (readers skip files with them). Writes
bench/results/<date>-sink.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_rows(batch, dim: int):
    import numpy as np

    from pipeline import columns as C

    n = len(batch["id"])
    rng = np.random.default_rng(int(batch["id"][0]))
    ids = [f"img-{i:09d}" for i in batch["id"]]
    sources = [f"s3://bucket/shards/shard-{i // 1000:06d}.tar" for i in batch["id"]]
    return C.to_table(
        "features", ids, sources, [None] * n, model="resnet50", weights="IMAGENET1K_V2",
        embeddings=rng.standard_normal((n, dim), dtype=np.float32), source_versions=["1000:etag"] * n,
        fingerprint="resnet50 IMAGENET1K_V2 0123456789ab", schema=C.output_schema("features", dim),
    )  # fmt: skip


def ours(ds, uri: str, schema) -> None:
    from pipeline import sinks

    tx = sinks.Table(uri).transaction("bench", schema, info={"command": "bench"})
    ds.write_datasink(sinks.TableSink(tx))


def rays(ds, uri: str, schema) -> None:
    ds.write_delta(uri)


def stats_in_log(uri: str) -> bool:
    import pyarrow as pa
    from deltalake import DeltaTable

    actions = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
    return "min.id" in actions.column_names and actions["min.id"].null_count == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--rows-per-file", type=int, default=5_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default="/tmp/pipeline-sink")
    args = p.parse_args()

    import ray

    from pipeline import columns as C

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    schema = C.output_schema("features", args.dim)
    ds = (
        ray.data.range(args.rows, override_num_blocks=max(1, args.rows // args.rows_per_file))
        .map_batches(
            make_rows, batch_size=args.rows_per_file, fn_kwargs={"dim": args.dim}, batch_format="numpy"
        )
        .materialize()
    )
    mb = args.rows * (args.dim * 4 + 120) / 2**20
    results: dict[str, list] = {"ours (TableSink)": [], "ray write_delta": []}
    for r in range(args.repeats):
        for name, fn in (("ours (TableSink)", ours), ("ray write_delta", rays)):
            uri = os.path.join(args.work, f"{r}-{name.split()[0]}")
            shutil.rmtree(uri, ignore_errors=True)
            t0 = time.perf_counter()
            fn(ds, uri, schema)
            s = time.perf_counter() - t0
            files = len([f for f in os.listdir(uri) if f.endswith(".parquet")])
            results[name].append({"seconds": round(s, 3), "files": files, "stats": stats_in_log(uri)})
            print(f"{name:18s} run {r}: {s:6.2f} s  {args.rows / s:8.0f} rows/s  {mb / s:6.1f} MB/s  "
                  f"{files} files  min/max stats in the log: {results[name][-1]['stats']}")  # fmt: skip
    ray.shutdown()
    summary = {
        name: {
            "best_s": min(x["seconds"] for x in v),
            "median_s": sorted(x["seconds"] for x in v)[len(v) // 2],
        }
        for name, v in results.items()
    }
    for name, v in summary.items():
        print(f"{name:18s} best {v['best_s']:.2f} s, median {v['median_s']:.2f} s ({args.rows} rows)")
    out = {
        "date": str(date.today()), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "rows": args.rows, "dim": args.dim, "rows_per_file": args.rows_per_file,
        "runs": results, "summary": summary,
    }  # fmt: skip
    path = os.path.join(ROOT, "bench", "results", f"{date.today()}-sink.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
