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
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [name] = os.listdir(tmp_path)
    result = json.loads((tmp_path / name).read_text())
    assert result["errors"] == {} and result["skipped"] == []
    sections = result["sections"]
    assert {"resnet18/fp32/fold/b4/device", "resnet18/bf16/fold-cast/b4/device"} <= set(
        sections["model_only"]
    )
    assert "resnet18/bf16/autocast/b4/numpy" in sections["model_only"]
    e2e = sections["end_to_end"]
    assert {
        "resnet18/bf16/autocast/decode-gpu/threads2",
        "resnet18/bf16/autocast/decode-cpu/threads1",
    } <= set(e2e)
    fid = sections["fidelity"]
    # On the CPU the "gpu" decoder is torchvision's decode_jpeg plus the Pillow-like tensor resize.
    for kind in ("baseline", "422", "exif", "progressive", "444", "grey", "cmyk"):
        assert fid[f"pixels/{kind}"]["max"] <= 1 and fid[f"pixels/{kind}"]["errors"] == 0, fid
    for key in ("resnet18/fp32/fold/decode-cpu", "resnet18/fp32/fold/decode-gpu"):
        assert fid[key]["all"]["cosine_min"] >= 0.999, fid[key]
    assert "500x375/decode_jpeg_batch" in sections["decoding"]
