"""The GPU bench's code paths, on the CPU: a smoke test, no figures asserted."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The GPU machine has torch and torchvision but no Ray, pyarrow or fsspec: run the script
# with those imports refused, so a new import of one of them fails here first.
WITHOUT_RAY_OR_PYARROW = """
import importlib.abc, runpy, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "pyarrow", "fsspec", "s3fs"):
            raise ImportError(f"{name} is not on the GPU machine")
sys.meta_path.insert(0, Refuse())
sys.argv = ["bench/gpu.py", *sys.argv[1:]]
runpy.run_path("bench/gpu.py", run_name="__main__")
"""


def test_gpu_bench_smoke_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY_OR_PYARROW, "--smoke", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [name] = os.listdir(tmp_path)
    result = json.loads((tmp_path / name).read_text())
    assert set(result["model_only"]) == {"resnet18/fp32"}
    assert set(result["from_jpeg"]) == {"resnet18/fp32/cpu-decode", "resnet18/fp32/gpu-decode"}
    assert [(m["decode"], m["precision"]) for m in result["fidelity"]] == [("cpu", "fp32"), ("gpu", "fp32")]
    # On the CPU the "gpu" decoder is torchvision's decode_jpeg plus tensor resize: nearly PIL's pixels.
    assert all(m["ours"]["cosine_min"] >= 0.999 for m in result["fidelity"]), result["fidelity"]
