"""GPU figures in one call (about 7 minutes on one H100; no Ray, no network needed).

    python bench/gpu.py [--device cuda] [--out DIR] [--budget SECONDS]   # on the GPU machine
    python bench/gpu.py --smoke --device cpu                             # the CPU smoke test

It drives the Predictor class the actors hold, in plain loops and threads, and reports:
  - model only: ResNet-50 at batch 64/128/256, bf16 and fp16, each way of running a reduced
    precision (``predict.MODEL_MODES``), from uint8 batches on the device, in pinned host
    memory and in ordinary numpy arrays; ResNet-18/101/152; ``torch.compile`` last;
  - JPEG decoding on the device: torchvision's and TorchCodec's batched nvJPEG (when
    TorchCodec is importable), alone and with resize and crop (``decode_jpeg_batch``), for
    500x375, 1.2 MP and 12 MP photos; Pillow in a process pool for comparison;
  - end to end through ``Predictor.__call__`` (the actor's call, Arrow output included):
    ``--decode gpu`` from JPEG bytes and ``--decode cpu`` from decoded crops, with 1 and 2
    concurrent calls (Ray Data's ``max_concurrent_calls_per_actor``);
  - fidelity against fp32 torchvision on the CPU, on photo-like JPEGs of every kind
    (baseline, EXIF-rotated, progressive, 4:4:4, greyscale, CMYK): decoded pixels per kind,
    and features (cosine, top-1) for each precision, mode and decoder;
  - CUDA out-of-memory: a batch far too large, halved until it fits.
Each section is timed against ``--budget``; a failing section is recorded and the rest run.
Writes <out>/gpu-<date>.json after every section and prints a table at the end.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import date
from functools import partial

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The repository root for ``pipeline``; this folder for ``fidelity`` (runpy.run_path, as the
# smoke test runs this script, does not put it on sys.path as ``python bench/gpu.py`` does).
sys.path[:0] = [ROOT, HERE]

import fidelity  # noqa: E402

from pipeline import columns as C  # noqa: E402
from pipeline import decode as decode_module  # noqa: E402
from pipeline import models  # noqa: E402
from pipeline.decode import Preprocess, decode, decode_jpeg_batch  # noqa: E402
from pipeline.predict import Predictor, PredictorSpec  # noqa: E402
from pipeline.samples import photo_like  # noqa: E402

SPEC = Preprocess(resize_size=256, crop_size=224)


# ---------------------------------------------------------------- helpers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


_WEIGHTS: dict[str, models.ResolvedWeights] = {}


def predictor(name: str, precision: str, device: str, batch: int, **kw) -> Predictor:
    """A Predictor of seeded random weights; ``model_mode`` goes to the constructor."""
    if name not in _WEIGHTS:
        _WEIGHTS[name] = models.resolve(name, "none")
    ctor = {k: kw.pop(k) for k in ("model_mode",) if k in kw}
    spec = PredictorSpec.from_weights(
        _WEIGHTS[name], task="features", precision=precision, device=device, batch_size=batch, **kw
    )
    return Predictor(spec, **ctor)


def rate(step, items: int, device: str, seconds: float, warmup: int = 2) -> float:
    """Items per second of ``step`` (called repeatedly), after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync(device)
    return n * items / (time.perf_counter() - t0)


def cycling(fn, inputs: list):
    """A step for ``rate``: ``fn`` on each of ``inputs`` in turn (so no run sees one buffer only)."""
    it = itertools.cycle(inputs)
    return lambda: fn(next(it))


def threaded_rate(call, batches: list, threads: int, items: int, seconds: float) -> float:
    """Items per second of ``call`` over ``batches``, ``threads`` calls at a time (each call syncs)."""
    with ThreadPoolExecutor(threads) as ex:
        t0 = time.perf_counter()
        list(ex.map(call, [batches[i % len(batches)] for i in range(2 * threads)]))  # warm-up, timed
        per_batch = (time.perf_counter() - t0) / (2 * threads)  # wall time per batch, threads overlapping
        count = max(2 * threads, int(seconds / max(per_batch, 1e-4)))
        work = [batches[i % len(batches)] for i in range(count)]
        t0 = time.perf_counter()
        list(ex.map(call, work))
        return count * items / (time.perf_counter() - t0)


def _jpeg(args) -> bytes:
    seed, size, kind = args
    img = photo_like(seed, size)
    buf = io.BytesIO()
    if kind == "baseline":
        img.save(buf, "JPEG", quality=90)
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = (3, 6, 8, 2, 4, 5, 7)[seed % 7]
        img.save(buf, "JPEG", quality=90, exif=exif)
    elif kind == "progressive":
        img.save(buf, "JPEG", quality=90, progressive=True)
    elif kind == "422":
        img.save(buf, "JPEG", quality=90, subsampling=1)
    elif kind == "444":
        img.save(buf, "JPEG", quality=95, subsampling=0)
    elif kind == "grey":
        img.convert("L").save(buf, "JPEG", quality=90)
    elif kind == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_jpegs(pool, count: int, size: tuple[int, int], kind: str = "baseline", seed: int = 0) -> list[bytes]:
    return list(pool.map(_jpeg, [(seed + i, size, kind) for i in range(count)]))


def _decode_crop(data: bytes) -> np.ndarray:
    return decode(data, SPEC)


def byte_batches(jpegs: list[bytes], batch: int) -> list[dict]:
    return [fidelity.byte_batch(jpegs[i : i + batch]) for i in range(0, len(jpegs) - batch + 1, batch)]


# ---------------------------------------------------------------- the run


class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.out = os.path.join(
            args.out, f"gpu-{date.today().isoformat()}{'-smoke' if args.smoke else ''}.json"
        )
        self.results: dict = {"sections": {}, "errors": {}, "skipped": []}
        self.lines: list[str] = []

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def section(self, name: str, fn, need: float = 0.0) -> None:
        if self.left() < need:
            self.results["skipped"].append(name)
            print(f"--- {name}: skipped ({self.left():.0f} s left, needs {need:.0f})", flush=True)
            return
        print(f"--- {name} ({self.left():.0f} s left)", flush=True)
        t = time.perf_counter()
        try:
            fn(self.results["sections"].setdefault(name, {}))
        except Exception as e:
            self.results["errors"][name] = traceback.format_exc()[-3000:]
            print(f"!!! {name} failed: {type(e).__name__}: {e}", flush=True)
            if self.args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        self.results["sections"].setdefault(name, {})["seconds"] = round(time.perf_counter() - t, 1)
        self.save()

    def log(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def save(self) -> None:
        os.makedirs(self.args.out, exist_ok=True)
        with open(self.out, "w") as f:
            json.dump(self.results, f, indent=1)


SECTIONS = (
    "model_only",
    "jpeg_sets",
    "end_to_end",
    "fidelity",
    "out_of_memory",
    "compile",
    "depths",
    "decoding",
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the code paths on a CPU")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all sections")
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections: {','.join(SECTIONS)}"
    )
    args = p.parse_args()
    only = set(args.only.split(","))
    if not only <= set(SECTIONS):
        p.error(f"unknown sections {sorted(only - set(SECTIONS))}")
    run = Run(args)
    dev, smoke = args.device, args.smoke
    cuda = dev.startswith("cuda")
    secs = 0.3 if smoke else 1.5
    big = 4 if smoke else 256  # the batch the targets are for
    r50 = "resnet18" if smoke else "resnet50"
    # The GPU default (fp16); a CPU smoke run takes bf16, which more CPUs run natively.
    half = "fp16" if cuda else "bf16"
    try:
        import pyarrow

        has_arrow = pyarrow.__version__
    except ImportError:
        has_arrow = False
    import torchvision

    run.results["env"] = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu_cores": os.cpu_count(),
        "pyarrow": has_arrow,
        "smoke": smoke,
        "argv": sys.argv[1:],
    }
    print(json.dumps(run.results["env"]), flush=True)
    # Started before CUDA is: its workers are forked and must not inherit a CUDA context.
    workers = min(16, os.cpu_count() or 1)
    pool = ProcessPoolExecutor(workers)
    list(pool.map(abs, range(4 * workers)))
    compiled: dict[tuple[str, str], Predictor] = {}  # (precision, mode) → compiled, decode="gpu"

    def model_line(r, key, ips, note=""):
        r[key] = round(ips, 1)
        run.log(f"model only  {key:<44}{ips:>10.1f} img/s{note}")

    # -- model only: ResNet-50, the target's figure and what moves it
    def model_only(r):
        grid = [("fp32", None, big)]
        for prec in [half] if smoke else ["fp16", "bf16"]:
            for mode in ["autocast", "cast", "fold-cast"]:
                for b in [big] if smoke else [64, 128, 256]:
                    grid.append((prec, mode, b))
        for prec, mode, b in grid:
            pred = predictor(r50, prec, dev, b, model_mode=mode)
            xs = [torch.randint(0, 256, (b, 224, 224, 3), dtype=torch.uint8, device=dev) for _ in range(2)]
            model_line(
                r,
                f"{r50}/{prec}/{pred.model_mode}/b{b}/device",
                rate(cycling(pred.forward, xs), b, dev, secs),
            )
            del pred, xs
        # Host memory as the actors get it: pinned tensors, and numpy arrays (--decode cpu).
        pred = predictor(r50, half, dev, big)
        host = [torch.randint(0, 256, (big, 224, 224, 3), dtype=torch.uint8) for _ in range(2)]
        for source in ["pinned", "numpy"]:
            xs = [h.pin_memory() for h in host] if source == "pinned" and cuda else [h.numpy() for h in host]
            key = f"{r50}/{half}/{pred.model_mode}/b{big}/{source}"
            model_line(r, key, rate(cycling(pred.forward, xs), big, dev, secs))
        if cuda:  # cuDNN's autotuning, which the Predictor turns on
            torch.backends.cudnn.benchmark = False
            x = torch.randint(0, 256, (big, 224, 224, 3), dtype=torch.uint8, device=dev)
            key = f"{r50}/{half}/{pred.model_mode}/b{big}/device/no-cudnn-benchmark"
            model_line(r, key, rate(cycling(pred.forward, [x]), big, dev, secs))
            torch.backends.cudnn.benchmark = True

    # -- torch.compile: its compile time is the largest single cost of this script
    def compile_section(r):
        for prec, mode in [("fp16", "fold-cast"), ("fp16", "autocast")]:
            if run.left() < 60 and not smoke:
                run.results["skipped"].append(f"compile {prec}/{mode}")
                continue
            t = time.perf_counter()
            pred = predictor(r50, prec, dev, big, model_mode=mode, compile=True, decode="gpu")
            seconds = round(time.perf_counter() - t, 1)
            r[f"{r50}/{prec}/{mode}/compile_seconds"] = seconds
            compiled[(prec, mode)] = pred
            x = torch.randint(0, 256, (big, 224, 224, 3), dtype=torch.uint8, device=dev)
            ips = rate(cycling(pred.forward, [x]), big, dev, secs)
            model_line(r, f"{r50}/{prec}/{mode}/b{big}/device/compiled", ips, f" (compile {seconds} s)")

    # -- JPEG sets
    sets: dict[str, list[bytes]] = {}

    def make_sets(r):
        sets["500x375"] = make_jpegs(pool, 8 if smoke else 512, (500, 375), seed=5000)
        if not smoke:
            sets["1.2MP"] = make_jpegs(pool, 128, (1280, 960), seed=6000)
            sets["12MP"] = make_jpegs(pool, 32, (4000, 3000), seed=7000)
        r.update(
            {k: {"images": len(v), "mean_bytes": int(np.mean([len(d) for d in v]))} for k, v in sets.items()}
        )

    # -- end to end through the actor's call: the target's figure
    def end_to_end(r):
        jpegs = sets["500x375"]
        raw = byte_batches(jpegs, big)
        crops = np.stack(list(pool.map(_decode_crop, jpegs, chunksize=8)))
        decoded = []
        for b in raw:
            n = len(b[C.ID])
            decoded.append({**{k: b[k] for k in (C.ID, C.SOURCE, C.ERROR)}, C.IMAGE: crops[:n]})

        def call_of(pred, batch):
            if has_arrow:
                try:
                    pred(batch)
                    return pred
                except Exception as e:  # an older pyarrow than the contract's code needs
                    r["arrow_error"] = f"{type(e).__name__}: {e}"
            # Without pyarrow: the same work up to the Arrow encoding.
            return lambda b: pred.forward(pred.inputs(b)[0])[0].cpu()

        # (decoder, precision, mode, compiled): eager first, then the compiled predictors.
        configs = [("gpu", half, "autocast", False), ("cpu", half, "autocast", False)]
        configs += [("gpu", prec, mode, True) for prec, mode in compiled]
        for decoder, prec, mode, is_compiled in configs:
            if is_compiled:
                pred = compiled[(prec, mode)]
            else:
                pred = predictor(r50, prec, dev, big, decode=decoder, model_mode=mode)
            batches = raw if decoder == "gpu" else decoded
            call = call_of(pred, batches[0])
            for threads in [1, 2, 3]:
                key = f"{r50}/{prec}/{pred.model_mode}{'/compiled' if is_compiled else ''}"
                key += f"/decode-{decoder}/threads{threads}"
                try:
                    ips = threaded_rate(call, batches, threads, big, secs * 1.5)
                except Exception as e:  # one setting failing must not hide the others
                    r[key] = f"{type(e).__name__}: {e}"[:500]
                    run.log(f"end to end  {key:<60} failed: {r[key][:200]}")
                    continue
                r[key] = round(ips, 1)
                run.log(f"end to end  {key:<60}{ips:>9.1f} img/s")
        # Pillow's capacity on this machine's cores, for --decode cpu: crops per second.
        t0 = time.perf_counter()
        list(pool.map(_decode_crop, jpegs, chunksize=8))
        ips = len(jpegs) / (time.perf_counter() - t0)
        r[f"pillow/{workers}-processes"] = round(ips, 1)
        run.log(f"decode      pillow, {workers} processes, 500x375{ips:>22.1f} img/s")

    # -- fidelity against fp32 torchvision on the CPU, per kind of JPEG
    def fidelity_section(r):
        kinds = ["baseline", "422", "exif", "progressive", "444", "grey", "cmyk"]
        per = 2 if smoke else 16
        images, kind_of = [], []
        for k, kind in enumerate(kinds):
            count = per * 3 if kind == "baseline" and not smoke else per
            images += make_jpegs(pool, count, (500, 375), kind, 9000 + 100 * k)
            kind_of += [kind] * (len(images) - len(kind_of))
        kind_of = np.array(kind_of)
        # Pixels: the device decoder against the CPU path.
        ref_px = np.stack([decode(d, SPEC) for d in images]).astype(np.int16)
        got, errors = decode_jpeg_batch(images, SPEC, dev)
        diff = np.abs(got.cpu().numpy().astype(np.int16) - ref_px)
        for kind in kinds:
            d = diff[kind_of == kind]
            r[f"pixels/{kind}"] = {
                "max": int(d.max()),
                "mean": round(float(d.mean()), 4),
                "share_over_1": round(float((d > 1).mean()), 5),
                "errors": sum(e is not None for e, k in zip(errors, kind_of, strict=True) if k == kind),
            }
            run.log(f"pixels      {kind:<12}{json.dumps(r[f'pixels/{kind}'])}")
        # Features: calibrated checkpoints, our path at each setting, against fp32 torchvision on the CPU.
        for name in ["resnet18"] if smoke else ["resnet50", "resnet18"]:
            sd, ref = fidelity._reference(name, "cpu", tuple(images))
            settings = [("fp32", "cpu", None), ("fp32", "gpu", None)]
            if not smoke:
                settings += [("fp16", d, "autocast") for d in ("cpu", "gpu")] + [("fp16", "gpu", "fold-cast")]
                settings += [("bf16", d, "autocast") for d in ("cpu", "gpu")] + [("bf16", "gpu", "fold-cast")]
            for prec, decoder, mode in settings:
                if run.left() < 15:
                    break
                spec = fidelity.calibrated_spec(name, sd, precision=prec, device=dev, decode=decoder)
                pred = Predictor(spec, model_mode=mode)
                feats, probs = fidelity.predictor_outputs(pred, images)
                key = f"{name}/{prec}/{pred.model_mode}/decode-{decoder}"
                r[key] = _agreement_by_kind(feats, probs, ref, kind_of, kinds)
                run.log(f"fidelity    {key:<44}{json.dumps(r[key]['all'])}")
            for prec in ["fp32"] if smoke else ["fp32", "fp16", "bf16"]:
                f, pr = fidelity.torchvision_reference(name, sd, images, prec, dev)
                key = f"{name}/{prec}/torchvision-{'autocast' if prec != 'fp32' else 'plain'}-on-{dev}"
                r[key] = _agreement_by_kind(f, pr, ref, kind_of, kinds)
                run.log(f"fidelity    {key:<44}{json.dumps(r[key]['all'])}")

    # -- out-of-memory: halve and keep the smaller batch
    def oom(r):
        if not cuda:
            r["note"] = "CUDA only"
            return
        n = 32768
        pred = predictor(r50, "fp16", dev, n)
        x = torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8, device=dev)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        feats, _ = pred.forward(x)
        sync(dev)
        r.update(
            asked=n, rows=int(feats.shape[0]), kept_batch=pred.max_batch,
            seconds=round(time.perf_counter() - t, 1),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
            total_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )  # fmt: skip
        again, _ = pred.forward(x[:1024])
        r["next_batch_rows"] = int(again.shape[0])
        run.log(f"oom         {json.dumps(r)}")
        del x, feats, again, pred
        torch.cuda.empty_cache()

    # -- the other depths, for the README table
    def depths(r):
        for name in ["resnet18"] if smoke else ["resnet18", "resnet101", "resnet152"]:
            for prec in [half] if smoke else ["fp16", "bf16"]:
                pred = predictor(name, prec, dev, big)
                x = torch.randint(0, 256, (big, 224, 224, 3), dtype=torch.uint8, device=dev)
                key = f"{name}/{prec}/{pred.model_mode}/b{big}/device"
                model_line(r, key, rate(cycling(pred.forward, [x]), big, dev, secs))

    # -- decoding alone, per size: where the end-to-end time goes
    def decoding(r):
        for label, jpegs in sets.items():
            b = min(len(jpegs), {"500x375": big, "1.2MP": 64, "12MP": 16}[label])
            chunks = [jpegs[i : i + b] for i in range(0, len(jpegs) - b + 1, b)]
            steps = _decode_steps(chunks[0], dev)
            r[f"{label}/steps_ms_per_batch{b}"] = steps
            run.log(f"decode      {label:<8}steps, ms per batch of {b}: {json.dumps(steps)}")
            raws = [[torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in c] for c in chunks]
            ips = rate(cycling(partial(_decode_only, device=dev), raws), b, dev, secs)
            r[f"{label}/decode"] = round(ips, 1)
            run.log(f"decode      {label:<8}decode only                {ips:>10.1f} img/s")
            if cuda:  # the compiled refine_chroma gives the same pixels
                eager = decode_jpeg_batch(chunks[0], SPEC, dev)[0]
                fused = decode_jpeg_batch(chunks[0], SPEC, dev, compile=True)[0]
                r[f"{label}/compiled_max_pixel_difference"] = int((eager.int() - fused.int()).abs().max())
            for comp in [False, True] if cuda else [False]:
                step = partial(decode_jpeg_batch, spec=SPEC, device=dev, compile=comp)
                ips = rate(cycling(step, chunks), b, dev, secs)
                key = f"decode_jpeg_batch{'/compiled' if comp else ''}"
                r[f"{label}/{key}"] = round(ips, 1)
                run.log(f"decode      {label:<8}{key:<27}{ips:>10.1f} img/s")

    sections = {
        "model_only": (model_only, 0),
        "compile": (compile_section, 60),
        "jpeg_sets": (make_sets, 0),
        "end_to_end": (end_to_end, 20),
        "fidelity": (fidelity_section, 30),
        "out_of_memory": (oom, 20),
        "depths": (depths, 20),
        "decoding": (decoding, 20),
    }
    # Most important first: a section that does not fit the budget is skipped.
    for name, (fn, need) in sections.items():
        if name in only and not (smoke and name == "compile"):
            run.section(name, fn, need)

    pool.shutdown()
    run.results["seconds"] = round(time.perf_counter() - run.t0, 1)
    run.save()
    print("\n=== summary", run.results["env"]["device"], flush=True)
    for line in run.lines:
        print(line)
    for name, tb in run.results["errors"].items():
        print(f"\n=== {name} failed\n{tb}")
    print(f"skipped: {run.results['skipped']}\nwrote {run.out}")
    return 1 if run.results["errors"] else 0


def _decode_only(raw: list, device: str) -> list:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)


def _decode_steps(datas: list[bytes], device: str) -> dict:
    """Milliseconds of each step of ``decode_jpeg_batch`` on one batch (synchronised after each)."""
    times: dict[str, float] = {}

    def step(name, fn):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times[name] = round((time.perf_counter() - t) * 1000, 2)
        return out

    headers = step("header (Pillow)", lambda: [decode_module._device_jpeg_header(d, 10**10) for d in datas])
    raw = step("bytes to tensors", lambda: [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas])
    imgs = step("nvJPEG decode", lambda: _decode_only(raw, device))
    shape = imgs[0].shape
    same = [im for im in imgs if im.shape == shape]
    x = step("stack one shape", lambda: torch.stack(same))
    if headers[0].sampling != (1, 1):
        refine = decode_module.refine_chroma
        step("refine_chroma", lambda: refine(x, headers[0].sampling))
        if device.startswith("cuda"):
            compiled = decode_module._compiled_refine_chroma()
            step("refine_chroma compiled, first call", lambda: compiled(x, headers[0].sampling))
            x = step("refine_chroma compiled", lambda: compiled(x, headers[0].sampling))
    step("resize+crop", lambda: decode_module.resize_crop(x, SPEC))
    times["images"] = len(same)
    return times


def _agreement_by_kind(feats, probs, ref, kind_of, kinds) -> dict:
    ref_f, ref_p = ref
    out = {"all": fidelity.agreement(feats, probs, ref_f, ref_p)}
    for kind in kinds:
        m = kind_of == kind
        out[kind] = fidelity.agreement(feats[m], probs[m], ref_f[m], ref_p[m])
    return {k: {kk: round(vv, 6) for kk, vv in v.items()} for k, v in out.items()}


if __name__ == "__main__":
    sys.exit(main())
