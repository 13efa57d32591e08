"""Frozen run configuration, validated once, up front, with errors that name the bad value.

The root of the package: it imports nothing heavy (no torch, Ray or pyarrow), and the
stages import it, never the reverse. Each setting is declared once, here, with its default
and its help; the command line and the config file (``pipeline.cli``) are generated from
these dataclasses, so a new setting is one field.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from datetime import date

from pipeline.errors import BadInputError
from pipeline.storage import canonical_uri, check_uri, overlap, storage_options

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


def setting(default, help: str, *, flag: str | None = None, metavar: str | None = None):
    """A dataclass field that is also a command-line flag and a config-file key.

    Args:
        default: the one default of the setting.
        help: the flag's help; "(default: ...)" is added from ``default``.
        flag: the flag's name when it is not the field's (``ModelConfig.name`` is ``--model``).
        metavar: how the help shows the flag's value.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar})


def parse_actors(value) -> tuple[int, int]:
    """``2``, ``"2"`` → (2, 2); ``"1,8"``, ``[1, 8]``, ``(1, 8)`` → (1, 8)."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        try:
            parts = [int(p) for p in str(value).split(",")]
        except ValueError:
            raise ConfigError(f"--actors takes MIN[,MAX] integers, got {value!r}") from None
    if len(parts) not in (1, 2) or not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        raise ConfigError(f"--actors takes MIN[,MAX], got {value!r}")
    return (parts[0], parts[-1])


@dataclass(frozen=True)
class SourceConfig:
    input: str = setting("", "folder, file, glob or brace pattern; a local path or any fsspec URI")
    format: str = setting("auto", "auto | images | webdataset | parquet")
    image_column: str = setting("image", "Parquet input: the image bytes column")
    id_column: str = setting("id", "Parquet input: the id column (absent: <file>#<row>)")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "larger images become error rows (Pillow's limit)")
    verbose: bool = setting(False, "list each file under the input that is not an input, and why")

    def __post_init__(self):
        _require(bool(self.input), "--input is required")
        # Known by the path it is given as: symbolic links are not resolved (see canonical_uri).
        object.__setattr__(
            self, "input", canonical_uri(check_uri(self.input, "--input"), resolve_links=False)
        )
        _require(bool(self.format), "--format must not be empty")
        _require(self.max_pixels > 0, f"--max-pixels must be positive, got {self.max_pixels}")


@dataclass(frozen=True)
class SinkConfig:
    output: str = setting("", "URI of the output Delta table (a folder)")
    rows_per_file: int = setting(100_000, "rows per output file")
    overwrite: bool = setting(False, "replace the rows of an existing output table (run)")

    def __post_init__(self):
        _require(bool(self.output), "--output is required")
        object.__setattr__(self, "output", canonical_uri(check_uri(self.output, "--output")))
        _require(self.rows_per_file >= 1, f"--rows-per-file must be at least 1, got {self.rows_per_file}")


@dataclass(frozen=True)
class StorageConfig:
    """Where object stores are; credentials are never here (see ``pipeline.storage``)."""

    s3_endpoint_url: str | None = setting(
        None, "S3-compatible endpoint (MinIO, Ceph, R2); default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL"
    )
    s3_anonymous: bool = setting(False, "read public buckets without credentials")

    @property
    def options(self) -> dict:
        """fsspec options per protocol, settled on the driver (``storage.storage_options``)."""
        return storage_options(self.s3_endpoint_url, self.s3_anonymous)


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting("resnet50", " | ".join(MODELS), flag="model")
    weights: str = setting(
        "DEFAULT",
        "torchvision weights name (ResNet50_Weights.IMAGENET1K_V2, IMAGENET1K_V1, DEFAULT), "
        "a checkpoint path or URI, or 'none' for seeded random weights",
    )
    task: str = setting("both", " | ".join(TASKS))
    top_k: int = setting(5, "classes per image for classify")
    normalize: bool = setting(False, "L2-normalise the embeddings")
    labels: str | None = setting(None, "class names, one per line (checkpoints with other than 1000 classes)")
    resize_size: int | None = setting(None, "override the resize of the shorter side")
    crop_size: int | None = setting(None, "override the center crop")
    precision: str = setting("auto", "auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, fp16 on GPU)")

    def __post_init__(self):
        _choice("model", self.name, MODELS)
        _choice("task", self.task, TASKS)
        _choice("precision", self.precision, PRECISIONS)
        _require(bool(self.weights), "--weights must not be empty")
        check_uri(self.weights, "--weights")
        if self.labels:
            check_uri(self.labels, "--labels")
        _require(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        for flag, v in (("--resize-size", self.resize_size), ("--crop-size", self.crop_size)):
            _require(v is None or v >= 1, f"{flag} must be positive, got {v}")


@dataclass(frozen=True)
class ComputeConfig:
    batch_size: int = setting(64, "images per model batch")
    # (min, max): Ray Data autoscales the pool between them
    actors: tuple[int, int] = setting((1, 1), "model actors, MIN[,MAX] to autoscale", metavar="MIN[,MAX]")
    num_gpus_per_actor: float = setting(0.0, "0 on CPU; 1 or a fraction on GPU")
    cpus_per_actor: float = setting(1.0, "CPUs Ray reserves per actor")
    threads_per_actor: int | None = setting(None, "torch threads on CPU (default: the node's cores / actors)")
    compile: bool = setting(False, "torch.compile the model in each actor (GPU)")
    decode: str = setting(
        "cpu", "cpu: decode in CPU tasks | gpu: decode JPEGs in the model actor with nvJPEG"
    )
    stall_timeout: float = setting(
        300.0,
        "seconds without a batch read or predicted before the run fails instead of waiting "
        "(a lost node, say)",
    )

    def __post_init__(self):
        object.__setattr__(self, "actors", parse_actors(self.actors))
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
class NightlyConfig:
    """What ``nightly`` adds to a run: the partition and the error budget."""

    date: str | None = setting(None, "partition date YYYY-MM-DD (default: today, UTC)")
    max_error_fraction: float = setting(
        0.01, "above this share of broken images: commit, mark it in the commit, and exit 3"
    )
    backfill: bool = setting(
        False,
        "recompute every input whose rows another model, weights or preprocessing made "
        "(without it, such an output is refused)",
    )
    max_inputs: int = setting(
        0,
        "redo at most this many inputs this night, new and changed ones first (0: all); "
        "later nights do the rest",
    )
    prune_missing: bool = setting(
        False, "drop the rows of inputs no longer listed, in the night's commit (without it they stay)"
    )
    retention_hours: float = setting(
        168.0,
        "upkeep vacuums files that no commit of the last this many hours needs (time travel "
        "that far back keeps working)",
    )


@dataclass(frozen=True)
class RunConfig:
    source: SourceConfig
    sink: SinkConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self):
        # Both are canonical (SourceConfig, SinkConfig): "out/", "./out" and a symlink to it agree.
        how = overlap(self.source.input, self.sink.output)
        _require(how is None, f"--output {self.sink.output} {how}; choose a folder apart from it")

    @property
    def storage_options(self) -> dict:
        return self.storage.options


# The settings of each command, group by group: (title, dataclass, RunConfig attribute).
RUN_GROUPS = (
    ("input and output", SourceConfig, "source"),
    ("input and output", SinkConfig, "sink"),
    ("input and output", StorageConfig, "storage"),
    ("model", ModelConfig, "model"),
    ("compute", ComputeConfig, "compute"),
)
NIGHTLY_GROUPS = (*RUN_GROUPS, ("nightly", NightlyConfig, None))


@dataclass(frozen=True)
class Setting:
    """One field of a config dataclass, as the CLI and the config file see it."""

    dest: str  # the flag without dashes, with _: "model", "batch_size"
    name: str  # the field's name in its dataclass
    type: typing.Any  # the field's type, ``int | None`` read as int
    default: typing.Any
    help: str
    metavar: str | None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def check(self, value) -> str | None:
        """What ``value`` (from a config file) must be to stand for this flag, or None if it is.

        As strict as the flag: ``overwrite = "false"`` is a string, not false.
        """

        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if self.type is bool:
            return None if isinstance(value, bool) else "true or false"
        if self.type is int:
            return None if integer(value) else "an integer"
        if self.type is float:
            return None if integer(value) or isinstance(value, float) else "a number"
        if self.type == tuple[int, int]:
            ok = integer(value) or isinstance(value, str)
            ok = ok or (isinstance(value, list) and 1 <= len(value) <= 2 and all(map(integer, value)))
            return None if ok else "an integer, MIN,MAX text or a list [MIN, MAX]"
        if self.dest == "date" and isinstance(value, date):
            return None  # YAML reads 2026-11-27 as a date
        return None if isinstance(value, str) else "a string"


def settings(cls) -> list[Setting]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
            kind = args[0]  # int | None: an int flag, absent by default
        default = f.default if f.default is not MISSING else None
        dest = f.metadata.get("flag") or f.name
        out.append(
            Setting(dest, f.name, kind, default, f.metadata.get("help", ""), f.metadata.get("metavar"))
        )
    return out
