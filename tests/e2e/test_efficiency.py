"""The efficiency report names the bottleneck from what the stages and actors measured:
a decode-bound run (huge JPEGs, a small model) and a model-bound one (tiny images, a deep
model), on the module's local Ray."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import config_from_args, get_args_parser, parse_args
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


def summary_of(tmp_path, folder, model):
    argv = ["run", "--input", folder, "--output", str(tmp_path / "out"), "--model", model,
            "--weights", "none", "--batch-size", "8", "--task", "features"]  # fmt: skip
    return run(config_from_args(parse_args(get_args_parser(), argv)))


def test_a_decode_bound_run_is_named_so(tmp_path, ray_cluster):
    folder = images(tmp_path / "big", 64, (6000, 4500))  # 27 MP each, decoded and resized
    s = summary_of(tmp_path, folder, "resnet18")
    e = s.efficiency
    assert e["bottleneck"] == "decoding", "\n".join(s.lines())
    assert (
        e["stages"]["decode"]["rows"] == 64
        and e["stages"]["decode"]["busy_s"] > e["stages"]["model"]["busy_s"]
    )
    [actor] = e["actors"].values()
    assert actor["images"] == 64 and actor["waiting_for_input_s"] > actor["forward_s"]
    assert "--decode gpu" in e["bottleneck_line"]
    report = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert report["efficiency"]["bottleneck"] == "decoding"


def test_a_model_bound_run_is_named_so(tmp_path, ray_cluster):
    folder = images(tmp_path / "small", 96, (96, 72))
    s = summary_of(tmp_path, folder, "resnet152")
    e = s.efficiency
    assert e["bottleneck"] == "the model", "\n".join(s.lines())
    assert e["model_busy_fraction"] >= 0.5 and e["stages"]["model"]["rows"] == 96
    assert e["fixed_cost_s"] >= e["start_up_s"] > 0 and e["steady_images_per_s"] > 0
    assert set(e["stages"]) == {"read", "decode", "model", "write"}
    assert any(line.startswith("bottleneck: the model") for line in s.lines())
