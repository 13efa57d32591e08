"""`make bench`: the pipeline against the plain PyTorch loop, whole command against whole command.

    python bench/bench.py [--images 1024] [--repeats 3] [--model resnet50] [--precisions fp32,bf16]
                          [--pipeline-args "--decode gpu"] [--label decode-gpu]

On the same generated photo-like JPEGs (about 500x375, quality 90, portrait and
landscape) it measures, per precision:
  1. plain   - bench/plain_loop.py, the loop a user would write (whole command);
  2. pipeline - `python -m pipeline run --task features` with default settings (whole command);
  3. model   - the actors' Predictor on ready uint8 arrays: the ceiling;
  4. decode  - decode plus preprocess only, on one core.
and, once, the peak memory (PSS, whole process tree, Ray workers included) of the pipeline
at 1x and 4x the images. Medians over --repeats; only figures from one run are compared.
Prints a table and writes bench/results/<date>-<machine>.json.

On a CPU without native bf16 (no AVX512-BF16 or AMX), bf16 is emulated and about 6x
slower than fp32; the whole-command bf16 runs are then skipped (they would take most of
an hour) unless --force-emulated is given, and only the model-only figure is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.samples import photo_like  # noqa: E402


def make_images(folder: str, count: int) -> str:
    """``count`` JPEGs, q90, 500x375 landscape and 375x500 portrait (every 4th)."""
    if len(glob.glob(os.path.join(folder, "*.jpg"))) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for i in range(count):
        size = (375, 500) if i % 4 == 3 else (500, 375)
        photo_like(10_000 + i, size).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    return folder


class PeakMemory:
    """Samples the summed PSS of a process and all its descendants (shared memory counted once)."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += p.memory_full_info().pss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(cmd: list[str], env: dict | None = None, memory: bool = False) -> tuple[float, int]:
    """Wall seconds of a whole command (and its peak tree PSS when asked)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0
    if memory:
        with PeakMemory(proc.pid) as mem:
            out, _ = proc.communicate()
        peak = mem.peak
    else:
        out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return seconds, peak


def pipeline_cmd(images: str, out: str, model: str, precision: str, extra: str = "") -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "run", "--input", images, "--output", out, "--overwrite",
        "--task", "features", "--model", model, "--weights", "none", "--precision", precision,
        *shlex.split(extra),
    ]  # fmt: skip


def plain_cmd(images: str, out: str, model: str, precision: str) -> list[str]:
    return [sys.executable, "bench/plain_loop.py", "--input", images, "--output", f"{out}.parquet",
            "--model", model, "--precision", precision]  # fmt: skip


def model_only(model: str, precision: str, n: int) -> float:
    """The Predictor the actors hold, on ready uint8 arrays, all cores: images/s."""
    import torch

    from pipeline import models
    from pipeline.predict import Predictor, PredictorSpec, cpu_threads

    w = models.resolve(model, "none")
    spec = PredictorSpec.from_weights(
        w, task="features", precision=precision, device="cpu", threads=cpu_threads()
    )
    pred = Predictor(spec)
    x = np.random.default_rng(0).integers(0, 256, (min(n, 64), 224, 224, 3), dtype=np.uint8)
    pred.forward(x[:8])  # warm-up: oneDNN builds its kernels on the first call
    done, t0 = 0, time.perf_counter()
    while done < n:
        pred.forward(x)
        done += len(x)
    torch.set_num_threads(cpu_threads())
    return done / (time.perf_counter() - t0)


def decode_only(images: str) -> float:
    """Decode plus preprocess on one core: images/s."""
    import torch

    from pipeline.decode import Preprocess, decode

    torch.set_num_threads(1)
    spec = Preprocess(resize_size=256, crop_size=224)
    paths = sorted(glob.glob(os.path.join(images, "*.jpg")))
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            decode(f.read(), spec)
    return len(paths) / (time.perf_counter() - t0)


def machine() -> dict:
    import torch

    from pipeline.predict import cpu_has_native

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native("bf16"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def slug(info: dict) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")[:40] or "cpu"
    return f"{name}-{info['cores']}c"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--memory-model", default="resnet18", help="model for the 1x/4x memory runs (faster)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument(
        "--force-emulated", action="store_true", help="run bf16 whole commands without native bf16"
    )
    p.add_argument("--data", default=os.path.join(ROOT, "bench", "data"))
    p.add_argument("--pipeline-args", default="", help='extra pipeline flags, e.g. "--decode gpu"')
    p.add_argument("--label", default="", help="suffix of the results file name, for a variant run")
    args = p.parse_args()

    info = machine()
    images = make_images(os.path.join(args.data, str(args.images)), args.images)
    scratch = tempfile.mkdtemp(prefix="bench-")
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    results: dict = {"date": date.today().isoformat(), "machine": info, "images": args.images,
                     "model": args.model, "repeats": args.repeats, "pipeline_args": args.pipeline_args,
                     "precisions": {}}  # fmt: skip
    for precision in args.precisions.split(","):
        row: dict = {
            "model_only_ips": round(model_only(args.model, precision, 128 if precision == "fp32" else 32), 2)
        }
        if precision == "fp32":
            row["decode_one_core_ips"] = round(decode_only(images), 1)
        if precision != "fp32" and not info["native_bf16"] and not args.force_emulated:
            row["skipped"] = f"no native {precision} on this CPU; whole-command runs skipped"
        else:
            plain, pipe = [], []
            for r in range(args.repeats):  # interleaved, so drift hits both alike
                plain.append(
                    timed(plain_cmd(images, f"{scratch}/plain-{precision}-{r}", args.model, precision), env)[
                        0
                    ]
                )
                pipe.append(
                    timed(
                        pipeline_cmd(
                            images,
                            f"{scratch}/pipe-{precision}-{r}",
                            args.model,
                            precision,
                            args.pipeline_args,
                        ),
                        env,
                    )[0]
                )
                print(
                    f"{precision} repeat {r}: plain {plain[-1]:.1f} s, pipeline {pipe[-1]:.1f} s", flush=True
                )
            row.update(
                plain_s=[round(s, 1) for s in plain],
                pipeline_s=[round(s, 1) for s in pipe],
                plain_ips=round(args.images / statistics.median(plain), 2),
                pipeline_ips=round(args.images / statistics.median(pipe), 2),
            )
            row["pipeline_over_plain"] = round(row["pipeline_ips"] / row["plain_ips"], 3)
            row["pipeline_over_model_only"] = round(row["pipeline_ips"] / row["model_only_ips"], 3)
        results["precisions"][precision] = row
    if "fp32" in results["precisions"] and "bf16" in results["precisions"]:
        bf16 = results["precisions"]["bf16"]
        if "pipeline_ips" in bf16:
            bf16["over_fp32_plain"] = round(
                bf16["pipeline_ips"] / results["precisions"]["fp32"]["plain_ips"], 3
            )

    if not args.skip_memory:
        big = make_images(os.path.join(args.data, str(4 * args.images)), 4 * args.images)
        peaks = {}
        for label, folder in (("1x", images), ("4x", big)):
            secs, peak = timed(
                pipeline_cmd(folder, f"{scratch}/mem-{label}", args.memory_model, "fp32", args.pipeline_args),
                env,
                memory=True,
            )
            peaks[label] = {"peak_pss_mib": round(peak / 2**20), "seconds": round(secs, 1)}
        peaks["ratio_4x_over_1x"] = round(peaks["4x"]["peak_pss_mib"] / peaks["1x"]["peak_pss_mib"], 3)
        results["memory"] = {"model": args.memory_model, **peaks}
    shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"\n{args.model}, {args.images} images, {info['cpu']} x{info['cores']}",
        f"({info['torch_cpu_capability']})",
    )
    print(
        f"{'precision':<10}{'plain/s':>10}{'pipeline/s':>12}{'model/s':>10}{'pipe/plain':>12}{'pipe/model':>12}"
    )
    for precision, row in results["precisions"].items():
        print(
            f"{precision:<10}{row.get('plain_ips', '-'):>10}{row.get('pipeline_ips', '-'):>12}"
            f"{row['model_only_ips']:>10}{row.get('pipeline_over_plain', '-'):>12}"
            f"{row.get('pipeline_over_model_only', '-'):>12}"
            + (f"   ({row['skipped']})" if "skipped" in row else "")
        )
    if "decode_one_core_ips" in results["precisions"].get("fp32", {}):
        print(
            f"decode + preprocess, one core: {results['precisions']['fp32']['decode_one_core_ips']} images/s"
        )
    if "memory" in results:
        m = results["memory"]
        print(
            f"peak PSS ({m['model']}): {m['1x']['peak_pss_mib']} MiB at 1x, "
            f"{m['4x']['peak_pss_mib']} MiB at 4x "
            f"-> {m['ratio_4x_over_1x']}x"
        )
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(
        ROOT,
        "bench",
        "results",
        f"{results['date']}-{slug(info)}{'-' + args.label if args.label else ''}.json",
    )
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
