"""`make local`: the main job on a laptop, CPU only, on a generated sample folder.

    python jobs/local.py --samples data/samples --output out/local [any pipeline flag]

Makes the sample set if it is absent, and uses the model zoo's pretrained weights:
from the torch hub cache (TORCH_HOME), downloaded into it once when missing. Only when
they cannot be had (no network: known within seconds) does it fall back to seeded random
weights, saying so and how to pre-seed the cache. It ends with a few example rows.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import models  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.config import ModelConfig  # noqa: E402
from pipeline.samples import make_samples  # noqa: E402

EXAMPLES = 3


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="data/samples", help="sample image folder (made if absent)")
    p.add_argument("--output", default="out/local", help="output folder (replaced on each run)")
    p.add_argument("--model", default=ModelConfig.name, help=f"(default: {ModelConfig.name})")
    return p


def pick_weights(model: str) -> str:
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
    """A few rows of what was produced: id, top-1 class, its score."""
    import pyarrow.dataset as ds

    table = ds.dataset(output, format="parquet").to_table(columns=["id", "status", "class_name", "score"])
    rows = sorted((r for r in table.to_pylist() if r["status"] == "ok"), key=lambda r: r["id"])
    for r in rows[:EXAMPLES]:
        print(f"example   {r['id']}: {r['class_name']} ({r['score']:.2f})")


def run(args: argparse.Namespace, rest: list[str]) -> int:
    if not os.path.isdir(args.samples):
        written = make_samples(args.samples)
        print(f"made {len(written)} sample files in {args.samples}")
    weights = pick_weights(args.model)
    argv = ["run", "--input", args.samples, "--output", args.output, "--overwrite", "--task", "both",
            "--model", args.model, "--weights", weights, *rest]  # fmt: skip
    code = main(argv)
    if code == 0:
        show_examples(args.output)
    return code


if __name__ == "__main__":
    known, rest = get_args_parser().parse_known_args()
    sys.exit(run(known, rest))
