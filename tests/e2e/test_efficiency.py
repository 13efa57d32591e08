"""The run's efficiency report end to end, on the module's local Ray: every stage and the
model actor measured, a bottleneck named, its headline in the commit. Which stage is named
for which measurements is tests/unit/test_efficiency.py's (no timing compared here)."""

import os

import numpy as np
import pytest
from deltalake import DeltaTable
from PIL import Image

from pipeline.cli import config_from_args, get_args_parser, parse_args
from pipeline.efficiency import STAGES
from pipeline.run import run

pytestmark = pytest.mark.e2e


def images(folder, count: int, size: tuple[int, int]) -> str:
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)
    for i in range(count):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize(size, Image.Resampling.NEAREST)
        img.save(os.path.join(folder, f"{i:03d}.jpg"), quality=85)
    return str(folder)


def test_a_run_reports_every_stage_and_actor_and_commits_the_headline(tmp_path, ray_cluster):
    folder = images(tmp_path / "in", 24, (320, 240))
    argv = ["run", "--input", folder, "--output", str(tmp_path / "out"), "--model", "resnet18",
            "--weights", "none", "--batch-size", "8", "--task", "features"]  # fmt: skip
    s = run(config_from_args(parse_args(get_args_parser(), argv)))
    e = s.efficiency
    assert set(e["stages"]) == set(STAGES) and all(st["rows"] == 24 for st in e["stages"].values())
    [actor] = e["actors"].values()
    assert actor["images"] == 24 and actor["forward_s"] > 0 and 0 < actor["busy_fraction"] <= 1
    assert e["fixed_cost_s"] >= e["start_up_s"] > 0 and e["steady_images_per_s"] > 0
    assert e["bottleneck"] in ("start-up", "reading", "decoding", "the model", "writing")
    assert any(line.startswith(f"bottleneck: {e['bottleneck']}") for line in s.lines())
    committed = DeltaTable(str(tmp_path / "out")).history(1)[0]["pipeline"]["efficiency"]
    assert committed["bottleneck"] == e["bottleneck"] and committed["start_up_s"] > 0
