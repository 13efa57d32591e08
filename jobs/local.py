"""`make local`: the main job on a laptop, CPU only, on a generated sample folder.

    python jobs/local.py --samples data/samples --output out/local [any pipeline flag]

Makes the sample set if it is absent, uses pretrained weights when the torch hub cache
(TORCH_HOME) has them and seeded random weights otherwise, and says which.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import models  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.samples import make_samples  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="data/samples", help="sample image folder (made if absent)")
    p.add_argument("--output", default="out/local", help="output folder (replaced on each run)")
    p.add_argument("--model", default="resnet50")
    return p


def run(args: argparse.Namespace, rest: list[str]) -> int:
    if not os.path.isdir(args.samples):
        written = make_samples(args.samples)
        print(f"made {len(written)} sample files in {args.samples}")
    if models.is_cached(args.model):
        weights = "DEFAULT"
        print(f"weights: pretrained {models.torchvision_weights(args.model, weights)} from the hub cache")
    else:
        weights = "none"
        print(
            "weights: RANDOM (seeded) - no pretrained file at "
            f"{models.hub_cache_file(models.torchvision_weights(args.model, 'DEFAULT'))}; "
            "labels are meaningless, the run still exercises every stage"
        )
    return main(
        [
            "run",
            "--input",
            args.samples,
            "--output",
            args.output,
            "--overwrite",
            "--task",
            "both",
            "--model",
            args.model,
            "--weights",
            weights,
            *rest,
        ]
    )


if __name__ == "__main__":
    known, rest = get_args_parser().parse_known_args()
    sys.exit(run(known, rest))
