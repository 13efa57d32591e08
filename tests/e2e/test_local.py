"""`make local`'s job as a newcomer runs it: real labels when the model zoo's file is there
(or can be downloaded), a clear line and seeded random weights when it cannot, and a few
example rows either way.

The download itself is not tested: torchvision's weights live at an https:// address of
download.pytorch.org, which a local server cannot answer without a certificate for that
name (and patching torchvision's or torch.hub's internals would test the patch)."""

import os
import re
import subprocess
import sys

import pytest
import torch
from torchvision import models as tvm

from pipeline import models
from pipeline.samples import make_samples

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def local_job(tmp_path, env) -> subprocess.CompletedProcess:
    samples = tmp_path / "samples"
    make_samples(str(samples), count=5)
    env = {**os.environ, **env}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs/local.py"), "--samples", str(samples),
         "--output", str(tmp_path / "out"), "--model", "resnet18"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip


def test_pretrained_weights_from_the_hub_cache_give_named_classes(tmp_path):
    home = tmp_path / "torch"
    entry = tvm.ResNet18_Weights.IMAGENET1K_V1
    cache = os.path.join(str(home), "hub", "checkpoints", os.path.basename(entry.url))
    os.makedirs(os.path.dirname(cache))
    torch.save(models.build("resnet18").state_dict(), cache)
    proc = local_job(tmp_path, {"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"weights: pretrained {entry} (torch hub cache: {cache})" in proc.stdout
    examples = re.findall(r"^example   (\S+): (.+) \((\d\.\d\d)\)$", proc.stdout, flags=re.MULTILINE)
    assert len(examples) == 3 and [e[0] for e in examples] == sorted(e[0] for e in examples)
    assert all(name in entry.meta["categories"] for _, name, _ in examples)
    out = str(tmp_path / "out")
    assert f"table     {out}: a Delta Lake table, version 1, 6 rows" in proc.stdout
    read = next(li for li in proc.stdout.splitlines() if li.startswith("read it   ")).removeprefix(
        "read it   "
    )
    shown = subprocess.run(read.replace(".venv/bin/python", sys.executable), shell=True, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0 and "shape: (6, 15)" in shown.stdout, shown.stdout + shown.stderr


def test_without_a_network_it_falls_back_to_random_weights_and_says_how_to_fix_it(tmp_path):
    import socket

    with socket.socket() as s:  # a closed port: the proxy, and so the network, refuses at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"TORCH_HOME": str(tmp_path / "empty"), "https_proxy": closed, "HTTPS_PROXY": closed}
    proc = local_job(tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(li for li in proc.stdout.splitlines() if li.startswith("weights:"))
    assert line.startswith("weights: RANDOM (seeded): could not download https://download.pytorch.org/")
    assert f"put resnet18-f37072fd.pth into {tmp_path / 'empty' / 'hub' / 'checkpoints'} (TORCH_HOME)" in line
    assert len(re.findall(r"^example   ", proc.stdout, flags=re.MULTILINE)) == 3
    assert "rows      6 (5 ok, 1 error)" in proc.stdout


def test_a_bad_flag_is_one_line_before_ray_or_torch(tmp_path):
    """The job starts Ray while torch is imported; a bad flag is refused before either."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(ROOT, "jobs/local.py"), "--samples",
         str(tmp_path / "samples"), "--output", str(tmp_path / "out"), "--batch-size", "0"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and lines == ["error: --batch-size must be at least 1, got 0"], proc.stderr[
        -2000:
    ]
    imported = {
        line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
    }
    assert "torch" not in imported and "ray" not in imported
    assert not (tmp_path / "samples").exists()
