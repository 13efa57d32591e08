"""Stage 4: the callable class the actor pool holds. Load once in ``__init__``, batch → batch.

It also runs without Ray (a plain loop, the GPU bench): pass the state_dict itself
instead of an object reference.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.fx.experimental.optimization import fuse
from torchvision.transforms import functional as TF

from pipeline import columns as C
from pipeline import efficiency, models
from pipeline.config import DEFAULT_MAX_PIXELS, PRECISIONS, ComputeConfig
from pipeline.decode import Preprocess, decode_jpeg_batch, text_or_none
from pipeline.errors import BadInputError

if TYPE_CHECKING:  # pyarrow is imported by C.to_table: the GPU bench drives forward() without it
    import pyarrow as pa

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# How the model meets bf16/fp16 (fp32 always folds BatchNorm, see Predictor):
#   "autocast": fp32 weights under torch.autocast, as torchvision users write it;
#   "cast": weights, BatchNorm included, converted to the type; the input too;
#   "fold-cast": BatchNorm folded into the convolutions, then converted.
MODEL_MODES = ("autocast", "cast", "fold-cast")


def default_model_mode(device: torch.device, precision: str, compiled: bool = False) -> str:
    """The mode each device runs a reduced precision in (bench/gpu.py compares them).

    On an H100 (bench/README.md), eager: autocast, as fast as the others (ResNet-50 fp16 at
    batch 256: 11.8k images/s; folding made it no faster). Under torch.compile: folded and
    cast, 23.6k against autocast's 21.0k, with the same fidelity.
    """
    return "fold-cast" if compiled and device.type == "cuda" else "autocast"


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA out-of-memory, from the caching allocator or from a library that reports it as text."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


@dataclass
class PredictorSpec:
    """Everything an actor needs to build its model; small except for ``state_dict``."""

    model: str
    weights_tag: str
    num_classes: int
    embedding_dim: int
    state_dict: Any = field(repr=False)  # dict of tensors, or a Ray ObjectRef to one
    mean: tuple[float, ...]
    std: tuple[float, ...]
    categories: tuple[str, ...] = field(repr=False)
    task: str = "both"
    top_k: int = 5
    normalize: bool = False
    precision: str = "auto"
    batch_size: int = ComputeConfig.batch_size
    preprocess: Preprocess = Preprocess(resize_size=256, crop_size=224)
    decode: str = "cpu"  # "gpu": batches hold bytes, decoded here on the model's device
    max_pixels: int = DEFAULT_MAX_PIXELS
    compile: bool = False  # torch.compile the model (warm-up in __init__)
    device: str = "auto"  # "auto": CUDA when this process was given a GPU, else CPU
    threads: int | None = None  # torch intra-op threads on CPU; None: see cpu_threads()
    schema_metadata: dict[str, str] | None = field(default=None, repr=False)
    fingerprint: str | None = None  # run.Plan.fingerprint: the rows' ``fingerprint`` column

    @classmethod
    def from_weights(
        cls, weights: models.ResolvedWeights, state_dict: Any = None, **options
    ) -> PredictorSpec:
        """The spec for resolved weights; ``state_dict`` may be a Ray ObjectRef to them."""
        return cls(
            model=weights.model,
            weights_tag=weights.tag,
            num_classes=weights.num_classes,
            embedding_dim=weights.embedding_dim,
            state_dict=weights.state_dict if state_dict is None else state_dict,
            mean=tuple(weights.transforms.mean),
            std=tuple(weights.transforms.std),
            categories=tuple(weights.categories),
            preprocess=Preprocess.from_transforms(weights.transforms),
            **options,
        )


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise BadInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        # fp32 keeps CPU results equal to torchvision's. On GPUs fp16, torch.autocast's own
        # default there: on an H100 it ran ResNet-50 as fast as bf16 (11.8k against 12.2k
        # images/s) with features far closer to fp32 (cosine 0.9998 against 0.9945).
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def cpu_has_native(precision: str) -> bool:
    """Whether this CPU runs ``precision`` in hardware (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16).

    Without it, oneDNN emulates the type: measured on 2 AVX2 cores, ResNet-50 in bf16 ran
    at 1.5 images/s against 9.4 in fp32.
    """
    if precision == "fp32":
        return True
    cpu = torch.cpu
    if precision == "bf16":
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return bool(cpu._is_amx_fp16_supported())


def cpu_threads() -> int:
    """The cores this process may run on.

    Ray sets OMP_NUM_THREADS (and so torch's thread count) to the actor's CPU
    *reservation*, which is kept below the node's cores so that decode tasks can be
    scheduled beside the model. The model should still use the cores it can see:
    measured on 2 cores, one thread ran ResNet-50 at about half the speed of two.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Predictor:
    """Holds one ResNet; turns decoded uint8 batches into output-contract rows."""

    def __init__(self, spec: PredictorSpec, *, stats=None, model_mode: str | None = None):
        """``stats``: the run's ``efficiency.start_stats`` actor, told of every batch and where
        its time went. ``model_mode`` (one of ``MODEL_MODES``, for bf16/fp16) is there to
        compare them (bench/gpu.py); the actors take ``default_model_mode``."""
        self.spec = spec
        self.stats = stats
        self.actor_key = f"{socket.gethostname()}:{os.getpid()}"
        # Time with no call in progress (calls may overlap: GPU actors take two at once).
        self._lock = threading.Lock()
        self._active = 0
        self._idle_since: float | None = None
        self.device = pick_device(spec.device)
        self.precision = resolve_precision(spec.precision, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(spec.threads or cpu_threads())
        else:
            # Fixed batch and crop sizes: cuDNN times its algorithms once per shape and keeps the fastest.
            torch.backends.cudnn.benchmark = True
        state_dict = spec.state_dict
        if not isinstance(state_dict, dict):  # an ObjectRef from the driver
            import ray

            state_dict = ray.get(state_dict)
        # One forward pass gives both heads: the pooled features, then the classifier on them.
        model = models.load_split(spec.model, state_dict)
        # Folding each BatchNorm into its conv (torch.fx) and channels_last memory: on 2
        # AVX2 cores ResNet-50 fp32 went from 5.9 to 9.4 images/s, with features within
        # 1e-6 (relative) of the unfolded model. See bench/README.md. Under bf16/fp16 the
        # mode decides (MODEL_MODES): folded weights rounded to 16 bits drift further from
        # torchvision's autocast (on the CPU, ResNet-50 top-1 agreement fell from 12/12 to
        # 11/12 in the fidelity test).
        dtype = _DTYPES.get(self.precision)
        if dtype is None:
            self.model_mode = "fold"
        else:
            self.model_mode = model_mode or default_model_mode(self.device, self.precision, spec.compile)
            if self.model_mode not in MODEL_MODES:
                raise BadInputError(f"unknown model mode {self.model_mode!r}; choose one of {MODEL_MODES}")
        model = model.eval()
        if self.model_mode in ("fold", "fold-cast"):
            model = fuse(model)
        cast = self.model_mode in ("cast", "fold-cast")
        if cast:
            model = model.to(dtype)
        self.input_dtype = dtype if cast else torch.float32
        self.autocast_dtype = dtype if self.model_mode == "autocast" else None
        self.model = model.to(self.device, memory_format=torch.channels_last)
        # Largest batch that has fit so far; halved on CUDA out-of-memory.
        self.max_batch = spec.batch_size
        self.mean = list(spec.mean)
        self.std = list(spec.std)
        self.categories = np.asarray(spec.categories, dtype=object)
        if spec.compile:
            self.model = torch.compile(self.model)
            # Compile now, on a full batch, so its warm-up stays out of the steady state.
            crop = spec.preprocess.crop_size
            self.forward(np.zeros((spec.batch_size, crop, crop, 3), np.uint8))
        # Ready: from here, time without a call is time spent waiting for input.
        self._idle_since = time.perf_counter()
        now = time.time()
        efficiency.tell(self.stats, "ready", 0, now, self._idle_since, None, self.actor_key)

    def forward(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, H, W, 3) → (features float32 (N, D), logits float32 (N, classes)).

        ``images`` is a numpy array (from the decode stage) or a tensor already on the
        device (from a GPU decoder).

        On CUDA out-of-memory the batch is split in halves, down to one image, and the
        smaller size is kept for the batches that follow.
        """
        while True:
            try:
                parts = [
                    self._forward(images[i : i + self.max_batch])
                    for i in range(0, len(images), self.max_batch)
                ]
                break
            except RuntimeError as e:
                if not is_out_of_memory(e) or self.max_batch == 1:
                    raise
                self.max_batch = max(1, min(self.max_batch, len(images)) // 2)
                torch.cuda.empty_cache()
        return torch.cat([f for f, _ in parts]), torch.cat([g for _, g in parts])

    @torch.inference_mode()
    def _forward(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, torch.Tensor):  # on the device already, or pinned: no wait either way
            x = images.to(self.device, non_blocking=True)
        else:
            x = torch.from_numpy(np.require(images, requirements=["C", "W"]))
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
        # NHWC memory permuted to NCHW is already channels_last: no copy.
        x = x.permute(0, 3, 1, 2)
        # What torchvision's ImageClassification does after its crop: /255, then normalize.
        x = TF.normalize(TF.convert_image_dtype(x, torch.float32), self.mean, self.std).to(self.input_dtype)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            feats, logits = self.model(x)
        return feats.float(), logits.float()

    def inputs(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray | torch.Tensor, list[str | None]]:
        """A batch's model inputs, for its good rows only, and every row's error (None: good).

        With ``decode="cpu"`` the decode stage has already made the uint8 crops
        (``image``). With ``decode="gpu"`` the batch holds the bytes, decoded here on
        the model's device; rows that fail get their reason.
        """
        errors = text_or_none(batch[C.ERROR])
        if self.spec.decode == "cpu":
            ok = np.array([e is None for e in errors], dtype=bool)
            # Indexing with a mask copies the whole batch; most batches have no error rows.
            return (batch[C.IMAGE] if ok.all() else batch[C.IMAGE][ok]), errors
        todo = [i for i, e in enumerate(errors) if e is None]
        images, reasons = decode_jpeg_batch(
            [batch[C.BYTES][i] for i in todo],
            self.spec.preprocess,
            self.device,
            self.spec.max_pixels,
            compile=self.spec.compile,
        )
        for i, reason in zip(todo, reasons, strict=True):
            errors[i] = reason
        return images[[j for j, r in enumerate(reasons) if r is None]], errors

    @functools.cached_property
    def schema(self) -> pa.Schema:
        """The output schema, built on the first batch (``forward`` alone needs no pyarrow)."""
        return C.output_schema(self.spec.task, self.spec.embedding_dim, self.spec.schema_metadata)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch[C.ID])
        start, t0 = time.time(), time.perf_counter()
        with self._lock:
            waited = t0 - self._idle_since if self._active == 0 and self._idle_since is not None else 0.0
            self._active += 1
        try:
            table, t1, t2 = self._call(batch)
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._idle_since = time.perf_counter()
        t3 = time.perf_counter()
        parts = {"inputs": t1 - t0, "forward": t2 - t1, "output": t3 - t2, "wait": waited}
        efficiency.tell(self.stats, "model", n, start, t0, parts, self.actor_key)
        return table

    def _call(self, batch: dict[str, np.ndarray]) -> tuple[pa.Table, float, float]:
        """The batch's table, and when its inputs were ready and its forward pass done."""
        images, errors = self.inputs(batch)
        t1 = time.perf_counter()
        ok = np.array([e is None for e in errors], dtype=bool)
        feats = logits = None
        if ok.any():
            feats, logits = self.forward(images)
            # A checkpoint whose activations overflow (fp16 above 65504) gives inf or NaN:
            # such rows become error rows, never numbers that poison a search index.
            finite = (torch.isfinite(feats).all(1) & torch.isfinite(logits).all(1)).cpu().numpy()
            if not finite.all():
                bad = np.flatnonzero(ok)[~finite]
                for i in bad:
                    errors[i] = f"non-finite model output at {self.precision}; try --precision fp32"
                ok[bad] = False
                feats, logits = feats[finite], logits[finite]
        t2 = time.perf_counter()  # the forward pass has finished: its results are on the host
        topk_index = topk_score = embeddings = None
        if C.wants_classes(self.spec.task):
            k = min(self.spec.top_k, self.spec.num_classes)
            topk_index, topk_score = np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
            if logits is not None:
                top = logits.softmax(dim=1).topk(k, dim=1)
                topk_index, topk_score = top.indices.cpu().numpy(), top.values.cpu().numpy()
        if C.wants_features(self.spec.task):
            embeddings = np.zeros((0, self.spec.embedding_dim), np.float32)
            if feats is not None:
                if self.spec.normalize:
                    feats = torch.nn.functional.normalize(feats, dim=1)
                embeddings = feats.cpu().numpy()
        table = C.to_table(
            self.spec.task,
            batch[C.ID],
            batch[C.SOURCE],
            errors,
            model=self.spec.model,
            weights=self.spec.weights_tag,
            topk_index=topk_index,
            topk_score=topk_score,
            categories=self.categories,
            embeddings=embeddings,
            source_versions=batch.get(C.SOURCE_VERSION),
            fingerprint=self.spec.fingerprint,
            schema=self.schema,
        )
        return table, t1, t2
