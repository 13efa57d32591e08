"""`make bench-scale` runs: every step on a few hundred synthetic inputs (no Ray)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_scale_bench_runs_every_step(tmp_path):
    cmd = [sys.executable, "bench/scale.py", "--sizes", "200,400", "--work", str(tmp_path / "w"),
           "--results", str(tmp_path / "r")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "r").iterdir()
    record = json.loads(path.read_text())
    steps = {"listing", "planning", "table load", "table inputs", "table plan", "no-op nightly",
             "no-op command", "commit"}  # fmt: skip
    assert set(record["sizes"]["400"]) == steps and set(record["growth_exponent"]) == steps
