"""Frozen run configuration, validated once, up front, with errors that name the bad value."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import BadInputError
from pipeline.storage import canonical_uri, overlap

# The allowed values, defined here once; the stages import them. (Input formats are the
# sources' registry's names: a new format is a new module there, not a line here.)
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TASKS = ("classify", "features", "both")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Where images are decoded: "cpu", in the CPU decode tasks before the actors; "gpu", in the
# model actor on its device (nvJPEG on CUDA; torchvision's CPU decoder on a CPU actor).
DECODERS = ("cpu", "gpu")
# Pillow's own default decompression-bomb limit (Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 89_478_485


class ConfigError(BadInputError):
    """A bad argument: reported as one line, before any work starts."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class SourceConfig:
    input: str
    format: str = "auto"
    image_column: str = "image"
    id_column: str = "id"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        _require(bool(self.input), "--input is required")
        object.__setattr__(self, "input", canonical_uri(self.input))
        _require(bool(self.format), "--format must not be empty")
        _require(self.max_pixels > 0, f"--max-pixels must be positive, got {self.max_pixels}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet50"
    weights: str = "DEFAULT"
    task: str = "both"
    top_k: int = 5
    normalize: bool = False
    labels: str | None = None
    resize_size: int | None = None
    crop_size: int | None = None
    precision: str = "auto"

    def __post_init__(self):
        _choice("model", self.name, MODELS)
        _choice("task", self.task, TASKS)
        _choice("precision", self.precision, PRECISIONS)
        _require(bool(self.weights), "--weights must not be empty")
        _require(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        for flag, v in (("--resize-size", self.resize_size), ("--crop-size", self.crop_size)):
            _require(v is None or v >= 1, f"{flag} must be positive, got {v}")


@dataclass(frozen=True)
class ComputeConfig:
    batch_size: int = 64
    actors: tuple[int, int] = (1, 1)  # (min, max): Ray Data autoscales the pool between them
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    threads_per_actor: int | None = None
    compile: bool = False
    decode: str = "cpu"  # "gpu": JPEGs are decoded in the model actor, on its device
    stall_timeout: float = 300.0  # seconds without a batch read or predicted: the run fails

    def __post_init__(self):
        _choice("decode", self.decode, DECODERS)
        lo, hi = self.actors
        _require(1 <= lo <= hi, f"--actors needs 1 <= MIN <= MAX, got {lo},{hi}")
        _require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _require(
            self.num_gpus_per_actor >= 0,
            f"--num-gpus-per-actor must be >= 0, got {self.num_gpus_per_actor}",
        )
        _require(self.cpus_per_actor >= 0, f"--cpus-per-actor must be >= 0, got {self.cpus_per_actor}")
        _require(self.stall_timeout > 0, f"--stall-timeout must be positive, got {self.stall_timeout}")
        _require(
            self.threads_per_actor is None or self.threads_per_actor >= 1,
            f"--threads-per-actor must be at least 1, got {self.threads_per_actor}",
        )


@dataclass(frozen=True)
class SinkConfig:
    output: str
    rows_per_file: int = 100_000
    overwrite: bool = False

    def __post_init__(self):
        _require(bool(self.output), "--output is required")
        object.__setattr__(self, "output", canonical_uri(self.output))
        _require(self.rows_per_file >= 1, f"--rows-per-file must be at least 1, got {self.rows_per_file}")


@dataclass(frozen=True)
class RunConfig:
    source: SourceConfig
    sink: SinkConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    storage_options: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        # Both are canonical (SourceConfig, SinkConfig): "out/", "./out" and a symlink to it agree.
        how = overlap(self.source.input, self.sink.output)
        _require(how is None, f"--output {self.sink.output} {how}; choose a folder apart from it")


def parse_actors(text: str) -> tuple[int, int]:
    """``"2"`` → (2, 2); ``"1,8"`` → (1, 8)."""
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--actors takes MIN[,MAX] integers, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise ConfigError(f"--actors takes MIN[,MAX], got {text!r}")
    return (parts[0], parts[-1])
