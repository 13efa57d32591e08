"""Every fast path against fp32 torchvision, on photo-like images with a calibrated checkpoint.

fp32 (BatchNorm folded, channels_last; the CPU decode stage's PIL, or ``--decode gpu``'s
torchvision decoder and tensor resize): per-image cosine >= 0.999, top-1 agreement >= 97%.
bf16: at least as faithful as torchvision's own autocast of the same model on the same
inputs, within 0.003 cosine and 3 points of top-1. Both depths: bf16 hurts ResNet-50 more.
"""

import pytest

from bench.fidelity import measure
from pipeline.predict import cpu_has_native


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fp32_fast_path(name, decode):
    ours = measure(name, "fp32", count=24, decode=decode)["ours"]
    assert ours["cosine_min"] >= 0.999 and ours["top1_agreement"] >= 0.97, ours


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_bf16_is_as_faithful_as_torchvision_autocast(name):
    # Without native bf16 the CPU emulates it (slowly); few images keep the test short.
    result = measure(name, "bf16", count=24 if cpu_has_native("bf16") else 8)
    ours, theirs = result["ours"], result["torchvision_autocast"]
    assert ours["cosine_min"] >= theirs["cosine_min"] - 0.003, result
    assert ours["top1_agreement"] >= theirs["top1_agreement"] - 0.03, result
