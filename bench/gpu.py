"""GPU figures in one run (about 10 minutes on one H100/H200; no Ray, no network needed).

    python bench/gpu.py [--device cuda] [--out DIR]      # on the GPU machine
    python bench/gpu.py --smoke --device cpu             # the CPU smoke test of its code paths

It drives the same Predictor class the actors hold, in a plain loop, and reports:
  - model only (ready uint8 batches on the device): resnet18/50/152 at bf16 and fp32;
  - from JPEG bytes: CPU decode (a process pool over the cores) and batched GPU decode
    (nvJPEG, then resize and crop on the device), into the Predictor;
  - fidelity: our path vs fp32 torchvision, and torchvision's autocast for reference.
Writes <out>/gpu-<date>.json (default bench/results) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import fidelity, models  # noqa: E402
from pipeline.decode import Preprocess, decode  # noqa: E402
from pipeline.predict import Predictor, PredictorSpec  # noqa: E402

SPEC = Preprocess(resize_size=256, crop_size=224)


def predictor(name: str, precision: str, device: str, batch_size: int, decode: str = "cpu") -> Predictor:
    w = models.resolve(name, "none")
    return Predictor(
        PredictorSpec.from_weights(
            w, task="features", precision=precision, device=device, batch_size=batch_size, decode=decode
        )
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_only(pred: Predictor, device: str, batch: int, seconds: float) -> float:
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=device)
    for _ in range(3):  # warm-up: cuDNN autotuning, oneDNN kernel creation
        pred.forward(x)
    sync(device)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pred.forward(x)
        done += batch
    sync(device)
    return done / (time.perf_counter() - t0)


def _decode_one(data: bytes) -> np.ndarray:
    return decode(data, SPEC)


def from_jpeg(pred: Predictor, jpegs: list[bytes], device: str, batch: int, workers: int) -> float:
    """Whole images/s from JPEG bytes to features, decode included.

    ``pred.spec.decode == "gpu"``: the predictor's own decoder (``--decode gpu``). Otherwise
    a process pool over the cores decodes with PIL, as the CPU decode tasks do.
    """
    gpu_decode = pred.spec.decode == "gpu"
    pool = None if gpu_decode else ProcessPoolExecutor(workers)
    try:
        if pool:  # start the workers before the clock
            list(pool.map(_decode_one, jpegs[:workers]))
        t0 = time.perf_counter()
        for i in range(0, len(jpegs), batch):
            chunk = jpegs[i : i + batch]
            if gpu_decode:
                x, _ = pred.inputs(fidelity.byte_batch(chunk))
            else:
                x = np.stack(list(pool.map(_decode_one, chunk, chunksize=max(1, len(chunk) // workers))))
            pred.forward(x)
        sync(device)
        return len(jpegs) / (time.perf_counter() - t0)
    finally:
        if pool:
            pool.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the code paths on a CPU")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    args = p.parse_args()

    dev = args.device
    smoke = args.smoke
    names = ["resnet18"] if smoke else ["resnet18", "resnet50", "resnet152"]
    precisions = ["fp32"] if smoke else ["bf16", "fp32"]
    batch = 4 if smoke else 256
    seconds = 0.5 if smoke else 8.0
    workers = os.cpu_count() or 1
    info = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "cpu_cores": workers,
        "smoke": smoke,
    }
    results: dict = {**info, "model_only": {}, "from_jpeg": {}, "fidelity": []}
    torch.backends.cudnn.benchmark = True

    for name in names:
        for precision in precisions:
            ips = model_only(predictor(name, precision, dev, batch), dev, batch, seconds)
            results["model_only"][f"{name}/{precision}"] = round(ips, 1)
            print(f"model only   {name:<10}{precision:<6}{ips:>10.1f} images/s", flush=True)

    jpegs = fidelity.jpeg_images(2 * batch if smoke else 4096)
    name = "resnet18" if smoke else "resnet50"
    for decoder in ("cpu", "gpu"):
        ips = from_jpeg(predictor(name, precisions[0], dev, batch, decoder), jpegs, dev, batch, workers)
        results["from_jpeg"][f"{name}/{precisions[0]}/{decoder}-decode"] = round(ips, 1)
        print(f"from JPEG    {name:<10}{precisions[0]:<6}{decoder}-decode{ips:>10.1f} images/s", flush=True)

    # Fidelity against fp32 torchvision on PIL-decoded images: both decoders at fp32, and
    # every reduced precision beside torchvision's own autocast.
    for name in ["resnet18"] if smoke else ["resnet18", "resnet50"]:
        for precision, decoder in [("fp32", "cpu"), ("fp32", "gpu")] + (
            [] if smoke else [("bf16", "cpu"), ("fp16", "cpu"), ("bf16", "gpu")]
        ):
            m = fidelity.measure(name, precision, dev, count=4 if smoke else 64, decode=decoder)
            results["fidelity"].append(m)
            print(
                f"fidelity     {name:<10}{precision:<6}{decoder}-decode {json.dumps(m['ours'])}", flush=True
            )

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu-{info['date']}{'-smoke' if smoke else ''}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
