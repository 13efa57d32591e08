"""Argument parsing only; ``python -m pipeline`` lands here.

The flags and the config file's keys are generated from the dataclasses of
``pipeline.config``, which hold each setting's one default. Bad arguments, inputs, weights
or outputs end with one line on stderr and exit code 2, before Ray starts or any model is
built; the exit code comes from the error's type (``pipeline.errors``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import date

from pipeline import __version__
from pipeline.config import NIGHTLY_GROUPS, RUN_GROUPS, StorageConfig, settings
from pipeline.errors import EXIT_BAD_INPUT, EXIT_RUN_FAILED, PipelineError
from pipeline.storage import redact


def add_arguments(p: argparse.ArgumentParser, groups=RUN_GROUPS) -> argparse.ArgumentParser:
    """One flag per field of the config dataclasses in ``groups``; the jobs take the same ones.

    Flags default to absent (``argparse.SUPPRESS``): the dataclass's default applies, so
    it is written in one place, and ``parse_args`` can tell a given flag from a default.
    """
    titled: dict[str, argparse._ArgumentGroup] = {}
    for title, cls, _ in groups:
        group = titled.setdefault(title, p.add_argument_group(title))
        for s in settings(cls):
            shown = f"{s.default:g}" if isinstance(s.default, float) else s.default
            if isinstance(s.default, tuple):
                shown = ",".join(map(str, s.default))
            help = s.help if s.default in (None, False, "") else f"{s.help} (default: {shown})"
            if s.type is bool:
                group.add_argument(s.flag, action="store_true", default=argparse.SUPPRESS, help=help)
            else:
                kind = s.type if s.type in (int, float) else str
                group.add_argument(s.flag, type=kind, default=argparse.SUPPRESS, help=help, metavar=s.metavar)
    p.add_argument(
        "--config", default=argparse.SUPPRESS, help="YAML or TOML file of these options; flags override it"
    )
    return p


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="ImageNet labels and pooled ResNet features for image shards, written to Parquet.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("run", help="run the pipeline"), RUN_GROUPS)
    add_arguments(
        sub.add_parser("nightly", help="incremental run: only new or changed inputs, into ROOT/dt=<date>/"),
        NIGHTLY_GROUPS,
    )
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


def _groups(command: str):
    return NIGHTLY_GROUPS if command == "nightly" else RUN_GROUPS


def load_config_file(path: str, command: str, storage_options: dict) -> dict:
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
    known = {s.dest: s for _, cls, _ in _groups(command) for s in settings(cls)}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise ConfigError(f"unknown option {key!r} in config file {path}")
        want = known[dest].check(value)
        if want:
            raise ConfigError(f"option {key!r} in config file {path} must be {want}, got {value!r}")
        out[dest] = value.isoformat() if isinstance(value, date) else value
    return out


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str], defaults: dict | None = None
) -> argparse.Namespace:
    """Every setting of the command, from (weakest first) the dataclasses' defaults, the
    job's ``defaults``, the ``--config`` file, then the flags given."""
    given = parser.parse_args(argv)
    if given.command not in ("run", "nightly"):
        return given
    values = {s.dest: s.default for _, cls, _ in _groups(given.command) for s in settings(cls)}
    values.update(defaults or {})
    if getattr(given, "config", None):
        options = StorageConfig(
            getattr(given, "s3_endpoint_url", None), getattr(given, "s3_anonymous", False)
        ).options
        values.update(load_config_file(given.config, given.command, options))
    values.update(vars(given))
    return argparse.Namespace(**values)


def config_from_args(args: argparse.Namespace):
    """The ``RunConfig`` of parsed arguments: each dataclass takes its own fields."""
    from pipeline.config import RunConfig

    parts = {
        attr: cls(**{s.name: getattr(args, s.dest) for s in settings(cls)}) for _, cls, attr in RUN_GROUPS
    }
    return RunConfig(**parts)


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
    """Runs ``work``: our bad-input errors → one line, exit 2; a failed run → one line, exit 1.

    The exit code is the error's (``pipeline.errors``). Anything else, and our own errors
    raised inside a Ray task (which Ray wraps), is a failed run.
    """
    try:
        return work()
    except Exception as e:
        from_ray = type(e).__module__.startswith("ray") or "RayTaskError" in type(e).__name__
        if isinstance(e, PipelineError) and not from_ray and e.exit_code == EXIT_BAD_INPUT:
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
        result = run_nightly(config, date, args.max_error_fraction, args.backfill, args.max_inputs)
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
    try:
        args = parse_args(parser, argv, defaults)
    except PipelineError as e:
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
            canonical_uri(args.output), StorageConfig(args.s3_endpoint_url, args.s3_anonymous).options
        )
        with commit.Lease(root, f"recover-{new_run_id()}"):
            finished = commit.recover(root)
        print(redact(f"{root.uri}: finished {finished} interrupted commit(s); no staging left"))
        return 0

    return guarded(go)
