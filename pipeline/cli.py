"""Argument parsing only; ``python -m pipeline`` lands here.

Bad arguments, inputs, weights or outputs end with one line on stderr and exit code 2,
before Ray starts or any model is built.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import date

from pipeline import __version__
from pipeline.storage import redact, storage_options

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1


def add_run_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``pipeline run``; the jobs in jobs/ take the same ones."""
    io = p.add_argument_group("input and output")
    io.add_argument("--input", help="folder, file, glob or brace pattern; a local path or any fsspec URI")
    io.add_argument("--output", help="folder URI for the Parquet files")
    io.add_argument("--format", default="auto", help="auto | images | webdataset | parquet (default: auto)")
    io.add_argument(
        "--image-column", default="image", help="Parquet input: image bytes column (default: image)"
    )
    io.add_argument(
        "--id-column",
        default="id",
        help="Parquet input: id column (default: id; absent: <file>#<row>)",
    )
    io.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="larger images become error rows (default: Pillow's 89478485)",
    )
    io.add_argument(
        "--rows-per-file", type=int, default=100_000, help="rows per output file (default: 100000)"
    )
    io.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    io.add_argument(
        "--s3-endpoint-url",
        help="S3-compatible endpoint (MinIO, Ceph, R2); default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL",
    )
    io.add_argument("--s3-anonymous", action="store_true", help="read public buckets without credentials")

    m = p.add_argument_group("model")
    m.add_argument("--task", default="both", help="classify | features | both (default: both)")
    m.add_argument(
        "--model", default="resnet50", help="resnet18 | resnet34 | resnet50 | resnet101 | resnet152"
    )
    m.add_argument(
        "--weights",
        default="DEFAULT",
        help="torchvision weights name (ResNet50_Weights.IMAGENET1K_V2, IMAGENET1K_V1, DEFAULT), "
        "a checkpoint path or URI, or 'none' for seeded random weights (default: DEFAULT)",
    )
    m.add_argument("--labels", help="class names, one per line (checkpoints with other than 1000 classes)")
    m.add_argument("--top-k", type=int, default=5, help="classes per image for classify (default: 5)")
    m.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    m.add_argument("--resize-size", type=int, help="override the resize of the shorter side")
    m.add_argument("--crop-size", type=int, help="override the center crop")
    m.add_argument(
        "--precision",
        default="auto",
        help="auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, fp16 on GPU)",
    )

    c = p.add_argument_group("compute")
    c.add_argument("--batch-size", type=int, default=64, help="images per model batch (default: 64)")
    c.add_argument("--actors", default="1", help="model actors, MIN[,MAX] to autoscale (default: 1)")
    c.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="0 on CPU; 1 or a fraction on GPU")
    c.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs Ray reserves per actor (default: 1)"
    )
    c.add_argument("--compile", action="store_true", help="torch.compile the model in each actor (GPU)")
    c.add_argument(
        "--decode",
        default="cpu",
        help="cpu: decode in CPU tasks | gpu: decode JPEGs in the model actor with nvJPEG (default: cpu)",
    )
    c.add_argument(
        "--stall-timeout",
        type=float,
        default=300.0,
        help="seconds without a batch read or predicted before the run fails instead of "
        "waiting (a lost node, say) (default: 300)",
    )
    c.add_argument(
        "--threads-per-actor",
        type=int,
        help="torch threads on CPU (default: the node's cores / actors)",
    )

    p.add_argument("--config", help="YAML or TOML file of these options; flags override it")
    return p


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="ImageNet labels and pooled ResNet features for image shards, written to Parquet.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.run_parser = add_run_arguments(sub.add_parser("run", help="run the pipeline"))
    nightly = add_run_arguments(
        sub.add_parser("nightly", help="incremental run: only new or changed inputs, into ROOT/dt=<date>/")
    )
    nightly.add_argument("--date", help="partition date YYYY-MM-DD (default: today, UTC)")
    nightly.add_argument(
        "--max-error-fraction",
        type=float,
        default=0.01,
        help="above this share of broken images: exit non-zero, no _SUCCESS (default: 0.01)",
    )
    parser.nightly_parser = nightly
    rec = sub.add_parser(
        "recover", help="finish or undo what a killed run left in an output (its next run does this too)"
    )
    rec.add_argument("output", help="the output folder URI")
    rec.add_argument("--s3-endpoint-url", help="S3-compatible endpoint")
    rec.add_argument("--s3-anonymous", action="store_true", help=argparse.SUPPRESS)
    sample = sub.add_parser("sample", help="write a sample image folder (for make local and tests)")
    sample.add_argument("output", help="folder to create")
    sample.add_argument("--count", type=int, default=64, help="images (default: 64), plus one broken file")
    return parser


def load_config_file(path: str, parser: argparse.ArgumentParser, storage_options: dict) -> dict:
    """Reads a YAML or TOML options file (any fsspec URI); keys are flag names, with - or _."""
    from pipeline.config import ConfigError
    from pipeline.storage import open_file

    try:
        with open_file(path, "rb", storage_options) as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        if path.endswith(".toml"):
            import tomllib

            data = tomllib.loads(raw.decode())
        else:
            import yaml

            data = yaml.safe_load(raw) or {}
    except Exception as e:
        raise ConfigError(f"cannot parse config file {path}: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options")
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest in ("config", "help"):
            raise ConfigError(f"unknown option {key!r} in config file {path}")
        want = _config_type_error(actions[dest], value)
        if want:
            raise ConfigError(f"option {key!r} in config file {path} must be {want}, got {value!r}")
        if dest == "actors" and isinstance(value, list):
            value = ",".join(map(str, value))
        elif dest == "date" and isinstance(value, date):
            value = value.isoformat()
        out[dest] = value
    return out


def _config_type_error(action: argparse.Action, value) -> str | None:
    """What a config file's value must be to stand for ``action``'s flag, or None if it is.

    As strict as the flag: ``overwrite = "false"`` is a string, not false.
    """

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(action, argparse._StoreTrueAction):
        return None if isinstance(value, bool) else "true or false"
    if action.type is int:
        return None if integer(value) else "an integer"
    if action.type is float:
        return None if integer(value) or isinstance(value, float) else "a number"
    if action.dest == "actors":
        ok = integer(value) or isinstance(value, str)
        ok = ok or (isinstance(value, list) and 1 <= len(value) <= 2 and all(map(integer, value)))
        return None if ok else "an integer, MIN,MAX text or a list [MIN, MAX]"
    if action.dest == "date" and isinstance(value, date):
        return None  # YAML reads 2026-11-27 as a date
    return None if isinstance(value, str) else "a string"


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parses twice when --config is given: the file's values become defaults, flags win."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        options = storage_options(args.s3_endpoint_url, args.s3_anonymous)
        sub = parser.nightly_parser if args.command == "nightly" else parser.run_parser
        sub.set_defaults(**load_config_file(args.config, sub, options))
        args = parser.parse_args(argv)
    return args


def config_from_args(args: argparse.Namespace):
    from pipeline.config import (
        DEFAULT_MAX_PIXELS,
        ComputeConfig,
        ModelConfig,
        RunConfig,
        SinkConfig,
        SourceConfig,
        parse_actors,
    )

    return RunConfig(
        source=SourceConfig(
            input=args.input or "",
            format=args.format,
            image_column=args.image_column,
            id_column=args.id_column,
            max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        ),
        sink=SinkConfig(output=args.output or "", rows_per_file=args.rows_per_file, overwrite=args.overwrite),
        model=ModelConfig(
            name=args.model,
            weights=str(args.weights),
            task=args.task,
            top_k=args.top_k,
            normalize=args.normalize,
            labels=args.labels,
            resize_size=args.resize_size,
            crop_size=args.crop_size,
            precision=args.precision,
        ),
        storage_options=storage_options(args.s3_endpoint_url, args.s3_anonymous),
        compute=ComputeConfig(
            batch_size=args.batch_size,
            actors=parse_actors(args.actors),
            num_gpus_per_actor=args.num_gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
            threads_per_actor=args.threads_per_actor,
            compile=args.compile,
            decode=args.decode,
            stall_timeout=args.stall_timeout,
        ),
    )


def run_command(args: argparse.Namespace) -> int:
    """Validates, runs and prints the summary; the exit code says how it went."""
    from pipeline import run

    def go() -> int:
        config = config_from_args(args)
        plan = run.prepare(config)
        announce(plan)
        for line in run.run(config, plan).lines():
            print(redact(line))
        return 0

    return guarded(go)


def print_origin() -> None:
    """Which copy of the code runs: on a cluster, Ray's copy of the uploaded working dir."""
    print(f"pipeline {__version__} from {os.path.dirname(os.path.abspath(__file__))}", file=sys.stderr)


def announce(plan) -> None:
    """The first log lines: which code runs, and on what."""
    print_origin()
    print(
        redact(
            f"pipeline: {plan.listing.format} input, {len(plan.listing.files)} files; "
            f"{plan.weights.model} weights {plan.weights.tag} ({plan.weights.pretrained_source}); "
            f"task {plan.config.model.task}, precision {plan.precision}, decode {plan.config.compute.decode}"
        ),
        file=sys.stderr,
    )
    on_cpu = plan.config.compute.num_gpus_per_actor == 0
    if plan.config.compute.decode == "gpu" and on_cpu:
        print(
            "warning: --decode gpu without --num-gpus-per-actor: the model actors decode on their "
            "CPU, serially with the model; --decode cpu is faster there",
            file=sys.stderr,
        )
    if plan.precision != "fp32" and on_cpu:
        from pipeline.predict import cpu_has_native

        if not cpu_has_native(plan.precision):
            print(
                f"warning: this CPU has no native {plan.precision} units (AVX512-BF16/AMX): "
                "it is emulated and slower than fp32",
                file=sys.stderr,
            )


def guarded(work) -> int:
    """Runs ``work``: our ValueErrors (bad input) → one line, exit 2; a failed run → exit 1."""
    try:
        return work()
    except Exception as e:
        from_ray = type(e).__module__.startswith("ray") or "RayTaskError" in type(e).__name__
        if isinstance(e, ValueError) and not from_ray:
            return fail(str(e))
        # A Ray task error's text is a traceback; its last line names the cause.
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        print(redact(f"error: run failed: {last[:300]}"), file=sys.stderr)
        return EXIT_RUN_FAILED


def nightly_command(args: argparse.Namespace) -> int:
    """The incremental job: exit 0 when done (or nothing new), 3 over the error budget."""
    from datetime import datetime, timezone

    from pipeline.incremental import check_date, run_nightly

    def go() -> int:
        config = config_from_args(args)
        date = check_date(args.date or datetime.now(timezone.utc).strftime("%Y-%m-%d"))
        print_origin()
        result = run_nightly(config, date, args.max_error_fraction)
        print(redact(result.message), file=sys.stderr if result.exit_code else sys.stdout)
        return result.exit_code

    return guarded(go)


def fail(message: str) -> int:
    print(redact(f"error: {message}"), file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None, defaults: dict | None = None) -> int:
    """Entry point for ``python -m pipeline`` and the jobs (which pass their own defaults)."""
    parser = get_args_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if defaults:
        parser.run_parser.set_defaults(**defaults)
        parser.nightly_parser.set_defaults(**defaults)
    try:
        args = parse_args(parser, argv)
    except ValueError as e:
        return fail(str(e))
    if args.command == "sample":
        from pipeline.samples import make_samples

        written = make_samples(args.output, count=args.count)
        print(f"wrote {len(written)} files to {args.output}")
        return 0
    if args.command == "nightly":
        return nightly_command(args)
    if args.command == "recover":
        return recover_command(args)
    return run_command(args)


def recover_command(args: argparse.Namespace) -> int:
    """Takes the output's lease, finishes a journaled commit, drops stale staging."""
    from pipeline import commit
    from pipeline.run import new_run_id
    from pipeline.storage import canonical_uri

    def go() -> int:
        root = commit.Root(
            canonical_uri(args.output), storage_options(args.s3_endpoint_url, args.s3_anonymous)
        )
        with commit.Lease(root, f"recover-{new_run_id()}"):
            finished = commit.recover(root)
        print(redact(f"{root.uri}: finished {finished} interrupted commit(s); no staging left"))
        return 0

    return guarded(go)
