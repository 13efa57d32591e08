"""Weights resolution: torchvision names via the hub cache, checkpoints, 'none'."""

import hashlib
import os

import pytest
import torch
from torchvision import models as tvm

from pipeline import models
from pipeline.models import WeightsError


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_none_is_seeded_and_complete():
    a = models.resolve("resnet18", "none")
    b = models.resolve("resnet18", "none")
    assert a.tag == "none" and a.num_classes == 1000 and a.embedding_dim == 512
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.categories[0] == "tench"  # ImageNet's names for 1000 classes
    assert a.preprocessing()["crop_size"] == [224] and a.preprocessing()["resize_size"] == [256]


@pytest.mark.parametrize("name, dim", [("resnet34", 512), ("resnet101", 2048)])
def test_embedding_dim_follows_the_block(name, dim):
    assert models.resolve(name, "none").embedding_dim == dim


def test_checkpoint_plain_wrapped_and_dataparallel(tmp_path):
    sd = models.build("resnet18", num_classes=10).state_dict()
    plain = tmp_path / "plain.pth"
    torch.save(sd, plain)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        tmp_path / "wrapped.pt",
    )
    for path in (plain, tmp_path / "wrapped.pt"):
        w = models.resolve("resnet18", str(path))
        assert w.num_classes == 10 and w.categories == [str(i) for i in range(10)]
        assert all(torch.equal(w.state_dict[k], sd[k]) for k in sd)
    assert (
        models.resolve("resnet18", str(plain)).tag
        == "sha256:" + hashlib.sha256(plain.read_bytes()).hexdigest()
    )


def test_labels_file_names_the_classes(tmp_path):
    torch.save(models.build("resnet18", num_classes=3).state_dict(), tmp_path / "m.pth")
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    w = models.resolve("resnet18", str(tmp_path / "m.pth"), labels=str(tmp_path / "labels.txt"))
    assert w.categories == ["cat", "dog", "bird"]
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    with pytest.raises(WeightsError, match="has 2 names, the model has 3 classes"):
        models.resolve("resnet18", str(tmp_path / "m.pth"), labels=str(tmp_path / "two.txt"))


def test_size_overrides(tmp_path):
    w = models.resolve("resnet18", "none", resize_size=160, crop_size=128)
    assert w.preprocessing()["resize_size"] == [160] and w.preprocessing()["crop_size"] == [128]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint", "cannot load checkpoint"),
        (None, "checkpoint not found"),
    ],
)
def test_unreadable_checkpoints(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        models.resolve("resnet18", str(path))


def test_checkpoint_of_another_architecture(tmp_path):
    torch.save(models.build("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="does not fit resnet50"):
        models.resolve("resnet50", str(tmp_path / "r18.pth"))


def test_torchvision_names():
    assert models.torchvision_weights("resnet50", "IMAGENET1K_V1") is tvm.ResNet50_Weights.IMAGENET1K_V1
    assert models.torchvision_weights("resnet50", "DEFAULT") is tvm.ResNet50_Weights.IMAGENET1K_V2
    full = models.torchvision_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2")
    assert full is tvm.ResNet50_Weights.IMAGENET1K_V2
    with pytest.raises(WeightsError, match="belong to another model"):
        models.torchvision_weights("resnet50", "ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(WeightsError, match="unknown weights 'IMAGENET9K'"):
        models.torchvision_weights("resnet50", "IMAGENET9K")


def test_torchvision_name_loads_from_the_hub_cache(torch_home):
    """Pre-seeded TORCH_HOME, as on an air-gapped cluster: no download is attempted."""
    entry = tvm.ResNet18_Weights.IMAGENET1K_V1
    cache = models.hub_cache_file(entry)
    assert cache.startswith(str(torch_home))
    assert not models.is_cached("resnet18", "IMAGENET1K_V1")
    sd = models.build("resnet18").state_dict()
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(sd, cache)
    assert models.is_cached("resnet18", "IMAGENET1K_V1")
    w = models.resolve("resnet18", "IMAGENET1K_V1")
    assert w.tag == "ResNet18_Weights.IMAGENET1K_V1"
    assert w.categories == list(entry.meta["categories"])
    assert w.preprocessing()["resize_size"] == [256]
    assert torch.equal(w.state_dict["conv1.weight"], sd["conv1.weight"])


def test_uncached_name_without_network_says_where_to_put_the_file(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # the internet, not our code
    # What the rows depend on is known without the file (a nightly run with nothing new
    # stops there); the tensors are loaded on first use, and without network that fails.
    w = models.resolve("resnet50", "DEFAULT")
    assert (w.tag, w.num_classes, w.embedding_dim) == ("ResNet50_Weights.IMAGENET1K_V2", 1000, 2048)
    with pytest.raises(WeightsError, match="resnet50-11ad3fa6.pth into .*hub/checkpoints"):
        w.state_dict  # noqa: B018


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet42'"):
        models.resolve("resnet42", "none")


@pytest.fixture
def black_hole():
    """A TCP server that accepts connections and never answers: a network that hangs."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        for c in held:
            c.close()
        server.close()


def test_fetch_pretrained_uses_the_cache_and_gives_up_fast_without_a_network(
    torch_home, monkeypatch, black_hole
):
    import time

    cache = models.hub_cache_file(tvm.ResNet18_Weights.IMAGENET1K_V1)
    os.makedirs(os.path.dirname(cache))
    torch.save(models.build("resnet18").state_dict(), cache)
    assert models.fetch_pretrained("resnet18") is None  # cached: nothing is asked of the network

    # The model zoo behind a proxy that never answers: the answer comes within the timeout.
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, black_hole)
    t0 = time.monotonic()
    reason = models.fetch_pretrained("resnet50", timeout=1.0)
    assert time.monotonic() - t0 < 10  # a bounded wait, not a hang (the timeout is 1 s)
    assert reason and ("timed out" in reason or "within 1 s" in reason), reason
    assert not models.is_cached("resnet50")


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048)])
def test_split_classifier_is_the_torchvision_model_in_two_parts(name, dim):
    """features + head: torchvision's forward in one pass, torchvision's state_dict keys."""
    from torch.fx.experimental.optimization import fuse

    resnet = models.build(name, num_classes=10).eval()
    split = models.SplitClassifier(resnet)
    assert split.num_features == dim and split.num_classes == 10
    assert list(split.state_dict()) == list(resnet.state_dict())
    assert list(models.load_split(name, resnet.state_dict()).state_dict()) == list(resnet.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        feats, logits = split(x)
        assert feats.shape == (2, dim) and logits.shape == (2, 10)
        torch.testing.assert_close(logits, resnet(x), rtol=0, atol=0)
        torch.testing.assert_close(split.head(split.features(x)), logits, rtol=0, atol=0)
        folded, folded_logits = fuse(split)(x)  # traces with torch.fx (the Predictor folds BatchNorm)
    torch.testing.assert_close(folded, feats, rtol=1e-4, atol=1e-4 * float(feats.abs().max()))
    torch.testing.assert_close(folded_logits, logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max()))


def test_split_classifier_takes_resnets_only():
    with pytest.raises(TypeError, match="not Sequential"):
        models.SplitClassifier(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_resolved_weights_pickle_before_and_after_loading(tmp_path):
    """The tensors load lazily from a picklable loader (no lambda), so a plan can be shipped."""
    import pickle

    sd = models.build("resnet18", num_classes=7).state_dict()
    torch.save(sd, tmp_path / "c.pt")
    for spec in ("none", str(tmp_path / "c.pt")):
        w = pickle.loads(pickle.dumps(models.resolve("resnet18", spec)))
        assert w.state_dict["fc.weight"].shape[0] == (1000 if spec == "none" else 7)
        again = pickle.loads(pickle.dumps(w))
        assert torch.equal(again.state_dict["conv1.weight"], w.state_dict["conv1.weight"])
