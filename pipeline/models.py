"""Stage 3: model name → torchvision builder; weights → (state_dict, preprocessing, categories).

Everything here runs once, on the driver, before any Ray work starts, so a bad model
name, weights name or checkpoint fails with one clear line. The resolved ``state_dict``
is then shipped to the actors through Ray's object store: the workers need no hub cache
and no credentials for the checkpoint's bucket.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
from torchvision import models as tvm
from torchvision.transforms._presets import ImageClassification

from pipeline.config import MODELS
from pipeline.errors import BadInputError
from pipeline.storage import redact

# The seed's family: BasicBlock for 18/34, Bottleneck (expansion 4) for 50/101/152.

# Preprocessing for checkpoints, which carry none: torchvision's ImageNet evaluation
# preset (shorter side to 256, bilinear with antialias, center crop 224, ImageNet mean/std).
CHECKPOINT_RESIZE = 256
CHECKPOINT_CROP = 224

# Random initialisation for tests and benchmarks is seeded, so every actor builds the same model.
RANDOM_SEED = 0


class WeightsError(BadInputError):
    """The weights argument cannot be turned into a state_dict for the model."""


@dataclass
class ResolvedWeights:
    """What the driver knows about the model before any actor starts."""

    model: str
    tag: str  # the `weights` column: a torchvision weights name, "sha256:<hex>", or "none"
    transforms: ImageClassification
    categories: list[str]
    num_classes: int
    embedding_dim: int
    pretrained_source: str  # where the numbers came from, for the run's metadata
    load: Callable[[], dict[str, torch.Tensor]] = field(repr=False, compare=False)

    @functools.cached_property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors, loaded on first use: a model-zoo file is read (or downloaded) only
        when a run has work for it, so a nightly run with nothing new needs no network."""
        return self.load()

    def preprocessing(self) -> dict:
        t = self.transforms
        return {
            "resize_size": list(t.resize_size),
            "crop_size": list(t.crop_size),
            "interpolation": t.interpolation.value,
            "antialias": bool(t.antialias),
            "mean": list(t.mean),
            "std": list(t.std),
        }


def check_model_name(name: str) -> None:
    if name not in MODELS:
        raise BadInputError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def build(name: str, num_classes: int = 1000) -> torch.nn.Module:
    """An untrained torchvision ResNet, seeded so that every process builds the same one."""
    check_model_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return tvm.get_model(name, weights=None, num_classes=num_classes)


def load(name: str, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The torchvision architecture holding ``state_dict``, built without a random init.

    Building on the meta device and assigning the tensors skips the initialisation that
    load_state_dict would overwrite anyway (about a second for ResNet-50 on one core).
    """
    check_model_name(name)
    with torch.device("meta"):
        model = tvm.get_model(name, weights=None, num_classes=int(state_dict["fc.weight"].shape[0]))
    model.load_state_dict(state_dict, assign=True)
    return model


class SplitClassifier(torch.nn.Module):
    """A torchvision ResNet split where its pooled features meet its classifier.

    In the spirit of timm's ``forward_features``/``forward_head``, the rest of the pipeline
    sees only this:

    - ``features(x)``: float (N, 3, H, W) → the pooled features (N, ``num_features``);
    - ``head(features)``: → logits (N, ``num_classes``);
    - ``forward(x)``: ``(features, logits)`` from one pass (``--task both`` needs both).

    It holds the ResNet's own modules under their own names, so its ``state_dict`` keys are
    torchvision's (a checkpoint loads into either), and its ``forward`` traces with torch.fx
    (the Predictor folds BatchNorm that way). Another architecture needs its own
    ``features`` and ``head`` here, and nothing elsewhere.
    """

    def __init__(self, model: tvm.ResNet):
        super().__init__()
        if not isinstance(model, tvm.ResNet) or not isinstance(model.fc, torch.nn.Linear):
            raise TypeError(f"SplitClassifier takes a torchvision ResNet, not {type(model).__name__}")
        for name, module in model.named_children():
            self.add_module(name, module)
        self.num_features = int(model.fc.in_features)  # 512 for resnet18/34, 2048 for 50/101/152
        self.num_classes = int(model.fc.out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's ResNet._forward_impl up to its classifier.
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return features, self.head(features)


def load_split(name: str, state_dict: dict[str, torch.Tensor]) -> SplitClassifier:
    """``load``, split into features and head."""
    return SplitClassifier(load(name, state_dict))


def is_checkpoint(spec: str) -> bool:
    """A URI, a path that exists, or a file name with a checkpoint extension."""
    return (
        "://" in spec
        or os.path.sep in spec
        or os.path.exists(spec)
        or spec.endswith((".pth", ".pt", ".bin", ".ckpt"))
    )


def torchvision_weights(model: str, spec: str) -> tvm.WeightsEnum:
    """Looks up ``ResNet50_Weights.IMAGENET1K_V2``, ``IMAGENET1K_V1`` or ``DEFAULT``."""
    enum = tvm.get_model_weights(model)
    try:
        # DEFAULT is an alias member of each weights enum, so enum["DEFAULT"] resolves it.
        weights = tvm.get_weight(spec) if "." in spec else enum[spec]
    except (KeyError, ValueError, AttributeError):
        names = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise WeightsError(f"unknown weights {spec!r} for {model}; choose one of {names}") from None
    if not isinstance(weights, enum):
        raise WeightsError(f"weights {spec} belong to another model, not {model}")
    return weights


def hub_cache_file(weights: tvm.WeightsEnum) -> str:
    """Where torch.hub keeps (or will keep) this weights file, under ``TORCH_HOME``."""
    name = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def is_cached(model: str, spec: str = "DEFAULT") -> bool:
    """True when the pretrained weights are in the torch hub cache (no download needed)."""
    return os.path.exists(hub_cache_file(torchvision_weights(model, spec)))


# How long a first run waits to learn whether the model zoo can be reached at all.
REACH_TIMEOUT_S = 5.0


def fetch_pretrained(model: str, spec: str = "DEFAULT", timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Makes sure the torch hub cache holds the pretrained file, downloading it once.

    Returns None when the file is there, or why it cannot be: without a network that is
    known within ``timeout`` seconds (a HEAD request through the environment's proxies,
    bounded even when name resolution hangs), not after a long wait.
    """
    entry = torchvision_weights(model, spec)
    if os.path.exists(hub_cache_file(entry)):
        return None
    reason = _unreachable(entry.url, timeout)
    if reason:
        return reason
    try:
        entry.get_state_dict(progress=True, check_hash=True)  # torch.hub downloads into the cache
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _unreachable(url: str, timeout: float) -> str | None:
    import threading
    import urllib.request

    result: list[str | None] = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(None)
        except Exception as e:
            result.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no answer from {urlparse(url).netloc} within {timeout:g} s"


def resolve(
    model: str,
    weights: str,
    labels: str | None = None,
    resize_size: int | None = None,
    crop_size: int | None = None,
    storage_options: dict | None = None,
) -> ResolvedWeights:
    """Turns ``--model``/``--weights`` into everything the actors need.

    Raises:
        ValueError: unknown model; WeightsError: unknown name, unreadable or
            mismatched checkpoint, wrong labels file.
    """
    check_model_name(model)
    known_categories = None
    size_overrides = {
        k: v for k, v in (("resize_size", resize_size), ("crop_size", crop_size)) if v is not None
    }
    if weights == "none":
        tag, source = "none", f"random initialisation (torch.manual_seed({RANDOM_SEED}))"
        transforms = _checkpoint_transforms(**size_overrides)
        load, num_classes = functools.partial(_random_state_dict, model), 1000
    elif is_checkpoint(weights):
        data = _read_bytes(weights, storage_options)
        state_dict = _load_state_dict(weights, data)
        tag, source = f"sha256:{hashlib.sha256(data).hexdigest()}", redact(weights)
        transforms = _checkpoint_transforms(**size_overrides)
        load, num_classes = (
            functools.partial(dict, state_dict),
            _check_against_architecture(model, state_dict, weights),
        )
    else:
        # The model zoo's file is read when the tensors are first needed (``state_dict``);
        # what the rows depend on (name, preprocessing, classes) is known from its entry.
        entry = torchvision_weights(model, weights)
        tag, source = str(entry), entry.url
        transforms = entry.transforms(**size_overrides)
        known_categories = list(entry.meta["categories"])
        load, num_classes = functools.partial(_zoo_state_dict, model, entry), len(known_categories)

    with torch.device("meta"):  # the architecture's shapes, without allocating it
        embedding_dim = int(tvm.get_model(model, weights=None, num_classes=num_classes).fc.in_features)
    categories = _categories(num_classes, labels, storage_options, known_categories)
    return ResolvedWeights(
        model=model,
        tag=tag,
        transforms=transforms,
        categories=categories,
        num_classes=num_classes,
        embedding_dim=embedding_dim,
        pretrained_source=source,
        load=load,
    )


def _random_state_dict(model: str) -> dict[str, torch.Tensor]:
    return build(model).state_dict()


def _zoo_state_dict(model: str, entry: tvm.WeightsEnum) -> dict[str, torch.Tensor]:
    try:
        state_dict = entry.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise WeightsError(
            f"cannot load {entry} ({type(e).__name__}: {e}); without network, put "
            f"{os.path.basename(hub_cache_file(entry))} into {os.path.dirname(hub_cache_file(entry))} "
            "(TORCH_HOME) or pass a checkpoint path/URI"
        ) from None
    _check_against_architecture(model, state_dict, str(entry))
    return state_dict


def _checkpoint_transforms(
    resize_size: int = CHECKPOINT_RESIZE, crop_size: int = CHECKPOINT_CROP
) -> ImageClassification:
    # ImageClassification's own defaults are ImageNet's mean/std, bilinear, antialias.
    return ImageClassification(crop_size=crop_size, resize_size=resize_size)


def _read_bytes(uri: str, storage_options: dict | None, what: str = "checkpoint") -> bytes:
    from pipeline.storage import open_file

    try:
        with open_file(uri, "rb", storage_options) as f:
            return f.read()
    except FileNotFoundError:
        raise WeightsError(f"{what} not found: {uri}") from None
    except Exception as e:
        raise WeightsError(f"cannot read {what} {uri}: {type(e).__name__}: {e}") from None


def _load_state_dict(uri: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot load checkpoint {uri}: {first[:200]}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"checkpoint {uri} does not hold a state_dict of tensors")
    # Saved from DataParallel/DistributedDataParallel.
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _check_against_architecture(model: str, state_dict: dict, weights: str) -> int:
    """Compares keys and shapes with the torchvision architecture, without allocating it."""
    fc = state_dict.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise WeightsError(f"{weights} has no fc.weight: not a torchvision ResNet state_dict")
    num_classes = int(fc.shape[0])
    with torch.device("meta"):
        expected = tvm.get_model(model, weights=None, num_classes=num_classes).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        )
        raise WeightsError(f"{weights} does not fit {model} ({detail})")
    return num_classes


def _categories(
    num_classes: int,
    labels: str | None,
    storage_options: dict | None,
    known: list[str] | None,
) -> list[str]:
    if labels:
        text = _read_bytes(labels, storage_options, "labels file").decode("utf-8")
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
        if len(names) != num_classes:
            raise WeightsError(
                f"labels file {labels} has {len(names)} names, the model has {num_classes} classes"
            )
        return names
    if known is not None and len(known) == num_classes:
        return known
    if num_classes == 1000:
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        return list(_IMAGENET_CATEGORIES)
    # No names known: the class index, as text, keeps class_name non-null and honest.
    return [str(i) for i in range(num_classes)]
