"""How faithful a fast path is: the actors' Predictor against torchvision run directly.

A test and benchmark helper, not part of the ``pipeline`` package: the tests import it as
``bench.fidelity`` (the repository root on sys.path), bench/gpu.py as ``fidelity`` (its own
folder on sys.path). Random weights alone make agreement figures meaningless (every image
lands on the same few classes), so ``calibrated_state_dict`` sets BatchNorm statistics from
photo-like images and spreads the logits, as a trained model's are.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import torch
from torchvision import models as tvm
from torchvision.transforms._presets import ImageClassification

from pipeline.decode import decode_batch, open_rgb
from pipeline.models import SplitClassifier
from pipeline.samples import photo_like

PRESET = ImageClassification(crop_size=224, resize_size=256)


def calibrated_state_dict(name: str, seed: int = 0, images: int = 16) -> dict[str, torch.Tensor]:
    """Seeded random weights with BatchNorm statistics measured on photo-like images."""
    torch.manual_seed(seed)
    model = tvm.get_model(name, weights=None)
    with torch.no_grad():
        model.fc.weight.mul_(20)  # logits spread like a trained model's, so top-1 is well defined
    batch = torch.stack([PRESET(photo_like(100 + i)) for i in range(images)])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration pass
    model.train()
    with torch.no_grad():
        model(batch)
    return model.eval().state_dict()


def jpeg_images(count: int, seed: int = 5000) -> list[bytes]:
    """Photo-like JPEGs (quality 90, portrait and landscape), as bytes."""
    out = []
    for i in range(count):
        buf = io.BytesIO()
        photo_like(seed + i, (375, 500) if i % 4 == 3 else (500, 375)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@torch.inference_mode()
def torchvision_reference(
    name: str, state_dict: dict, images: list[bytes], precision: str = "fp32", device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's model and preset on PIL images, with torch.autocast at ``precision``.

    Returns:
        (features (N, D), softmax probabilities (N, classes)), float32.
    """
    model = tvm.get_model(name, weights=None, num_classes=int(state_dict["fc.weight"].shape[0]))
    model.load_state_dict(state_dict)
    model = SplitClassifier(model).eval().to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    feats, probs = [], []
    for data in images:
        x = PRESET(open_rgb(data)).unsqueeze(0).to(device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            f, logits = model(x)
            p = logits.float().softmax(1)
        feats.append(f.float().cpu().numpy()[0])
        probs.append(p.cpu().numpy()[0])
    return np.stack(feats), np.stack(probs)


def byte_batch(images: list[bytes]) -> dict[str, np.ndarray]:
    """A batch as the read stage hands it on: id, source, bytes, error."""
    from pipeline import columns as C

    n = len(images)
    ids = np.array([f"img{i}" for i in range(n)], dtype=object)
    return {
        C.ID: ids,
        C.SOURCE: ids,
        C.BYTES: np.array(images, dtype=object),
        C.ERROR: np.array([None] * n, dtype=object),
    }


def predictor_outputs(predictor, images: list[bytes], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's own path from bytes: the CPU decode stage, or with ``decode="gpu"``
    the predictor's own decoder, then ``Predictor.forward``."""
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        batch = byte_batch(images[i : i + batch_size])
        if predictor.spec.decode == "cpu":
            batch = decode_batch(batch, predictor.spec.preprocess)
        x, errors = predictor.inputs(batch)
        if any(errors):
            raise ValueError(f"fidelity images failed to decode: {[e for e in errors if e]}")
        f, logits = predictor.forward(x)
        feats.append(f.cpu().numpy())
        probs.append(logits.softmax(1).cpu().numpy())
    return np.concatenate(feats), np.concatenate(probs)


def agreement(feats: np.ndarray, probs: np.ndarray, ref_feats: np.ndarray, ref_probs: np.ndarray) -> dict:
    """Per-image cosine of the features and top-1 agreement with a reference."""
    cos = (feats * ref_feats).sum(1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(ref_feats, axis=1))
    return {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "top1_agreement": float((probs.argmax(1) == ref_probs.argmax(1)).mean()),
    }


@functools.lru_cache(maxsize=8)
def _reference(
    name: str, device: str, images: tuple[bytes, ...]
) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """The calibrated checkpoint and the fp32 torchvision outputs (cached per model and images)."""
    sd = calibrated_state_dict(name)
    return sd, torchvision_reference(name, sd, list(images), "fp32", device)


def calibrated_spec(name: str, state_dict: dict, **options):
    """The actors' PredictorSpec for a calibrated checkpoint (1000 classes, ImageNet preset)."""
    from pipeline.predict import PredictorSpec

    return PredictorSpec(
        model=name,
        weights_tag="calibrated",
        num_classes=int(state_dict["fc.weight"].shape[0]),
        embedding_dim=int(state_dict["fc.weight"].shape[1]),
        state_dict=state_dict,
        mean=tuple(PRESET.mean),
        std=tuple(PRESET.std),
        categories=tuple(str(i) for i in range(int(state_dict["fc.weight"].shape[0]))),
        **options,
    )


def measure(
    name: str,
    precision: str,
    device: str = "cpu",
    count: int = 24,
    decode: str = "cpu",
    *,
    images: list[bytes] | None = None,
    ref_device: str = "cpu",
    model_mode: str | None = None,
) -> dict:
    """Our path and torchvision's autocast (both on ``device``, at ``precision``) against
    fp32 torchvision on ``ref_device``.

    ``decode``: "cpu" (the decode stage: PIL) or "gpu" (the actor's decoder on ``device``).
    ``images``: JPEG bytes; ``count`` photo-like ones by default.
    """
    from pipeline.predict import Predictor

    images = tuple(images) if images is not None else tuple(jpeg_images(count))
    sd, ref = _reference(name, ref_device, images)
    spec = calibrated_spec(name, sd, precision=precision, device=device, decode=decode)
    predictor = Predictor(spec, model_mode=model_mode)
    ours = agreement(*predictor_outputs(predictor, list(images)), *ref)
    result = {"model": name, "precision": precision, "device": device, "decode": decode}
    result.update(model_mode=predictor.model_mode, images=len(images), ours=ours)
    if precision != "fp32":
        result["torchvision_autocast"] = agreement(
            *torchvision_reference(name, sd, list(images), precision, device), *ref
        )
    return result
