"""`make local`: the main job on a laptop, CPU only, on a generated sample folder.

    python jobs/local.py --samples data/samples --output out/local [any pipeline flag]

Makes the sample set if it is absent, and uses the model zoo's pretrained weights:
from the torch hub cache (TORCH_HOME), downloaded into it once when missing. Only when
they cannot be had (no network: known within seconds) does it fall back to seeded random
weights, saying so and how to pre-seed the cache. It ends with a few example rows.

Its fixed cost is most of a small run: Python imports torch and torchvision (about 4 s on
2 cores) and Ray starts (about 3 s). Neither waits on the other, so Ray starts while a
thread imports the rest; the flags are checked first, so a bad one still costs nothing.
"""

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli  # noqa: E402  (no torch, no Ray)
from pipeline.config import ModelConfig  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.samples import make_samples  # noqa: E402

EXAMPLES = 3


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="data/samples", help="sample image folder (made if absent)")
    p.add_argument("--output", default="out/local", help="output table (its rows replaced on each run)")
    p.add_argument("--model", default=ModelConfig.name, help=f"(default: {ModelConfig.name})")
    return p


def pick_weights(model: str) -> str:
    from pipeline import models

    entry = models.torchvision_weights(model, "DEFAULT")
    problem = models.fetch_pretrained(model)
    if problem is None:
        print(f"weights: pretrained {entry} (torch hub cache: {models.hub_cache_file(entry)})")
        return "DEFAULT"
    cache = models.hub_cache_file(entry)
    print(
        f"weights: RANDOM (seeded): could not download {entry.url} ({problem}); the labels are "
        f"meaningless. For real labels offline, put {os.path.basename(cache)} into "
        f"{os.path.dirname(cache)} (TORCH_HOME)"
    )
    return "none"


def show_examples(output: str) -> None:
    """A few rows of what was produced (id, top-1 class, its score), where the table is, and
    one line that reads it."""
    import pyarrow.fs as fs
    from deltalake import DeltaTable

    root = os.path.abspath(output)
    delta = DeltaTable(root)
    data = delta.to_pyarrow_dataset(filesystem=fs.SubTreeFileSystem(root, fs.LocalFileSystem()))
    table = data.to_table(columns=["id", "status", "class_name", "score"])
    rows = sorted((r for r in table.to_pylist() if r["status"] == "ok"), key=lambda r: r["id"])
    for r in rows[:EXAMPLES]:
        print(f"example   {r['id']}: {r['class_name']} ({r['score']:.2f})")
    print(f"table     {output}: a Delta Lake table, version {delta.version()}, {table.num_rows} rows")
    read = f"import polars as pl; print(pl.read_delta('{output}'))"
    print(f'read it   .venv/bin/python -c "{read}"')


def command(args: argparse.Namespace, weights: str, rest: list[str]) -> list[str]:
    return ["run", "--input", args.samples, "--output", args.output, "--overwrite", "--task", "both",
            "--model", args.model, "--weights", weights, *rest]  # fmt: skip


def start_ray_meanwhile() -> bool:
    """Starts a local Ray while a thread imports torch, torchvision and the pipeline; True
    if it started one (the caller shuts it down). With RAY_ADDRESS, the run joins that."""
    importer = threading.Thread(target=lambda: __import__("pipeline.run"), daemon=True)
    importer.start()
    started = False
    if not os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        started = True
    importer.join()
    return started


def run(args: argparse.Namespace, rest: list[str]) -> int:
    try:  # the flags first: a bad one is one line, before anything starts
        cli.config_from_args(cli.parse_args(cli.get_args_parser(), command(args, "none", rest)))
    except PipelineError as e:
        return cli.fail(str(e))
    if not os.path.isdir(args.samples):
        written = make_samples(args.samples)
        print(f"made {len(written)} sample files in {args.samples}")
    started = start_ray_meanwhile()
    try:
        code = cli.main(command(args, pick_weights(args.model), rest))
    finally:
        if started:
            import ray

            ray.shutdown()
    if code == 0:
        show_examples(args.output)
    return code


if __name__ == "__main__":
    known, rest = get_args_parser().parse_known_args()
    cli.exit_process(run(known, rest))
