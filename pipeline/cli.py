"""Argument parsing only; ``python -m pipeline`` lands here.

The flags and the config file's keys are generated from the dataclasses of
``pipeline.config``, which hold each setting's one default. Bad arguments, inputs, weights
or outputs end with one line on stderr and exit code 2, before Ray starts or any model is
built; the exit code comes from the error's type (``pipeline.errors``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Sequence
from datetime import date

from pipeline import __version__
from pipeline.config import NIGHTLY_GROUPS, RUN_GROUPS, StorageConfig, settings
from pipeline.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_RUN_FAILED, PipelineError
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
        description="ImageNet labels and pooled ResNet features for image shards, written to a Delta table.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("run", help="run the pipeline"), RUN_GROUPS)
    add_arguments(
        sub.add_parser("nightly", help="incremental run: only new or changed inputs, into ROOT/dt=<date>/"),
        NIGHTLY_GROUPS,
    )

    def table_command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("output", help="the output table's URI (its root folder)")
        c.add_argument("--s3-endpoint-url", help="S3-compatible endpoint")
        c.add_argument("--s3-anonymous", action="store_true", help=argparse.SUPPRESS)
        return c

    table_command("history", "the table's commits, one line each, and what its files take up").add_argument(
        "--limit", type=int, default=None, help="the newest N commits only"
    )
    vac = table_command("vacuum", "delete files that no commit within the retention needs")
    vac.add_argument(
        "--retention-hours", type=float, default=168.0,
        help="keep what the commits of the last this many hours need (default: 168); below it, "
        "only while no run writes the table",
    )  # fmt: skip
    vac.add_argument("--dry-run", action="store_true", help="list the files, delete nothing")
    table_command("migrate", "convert an output of the previous Parquet layout into a Delta table, once")
    table_command("recover", argparse.SUPPRESS)  # gone: a commit is all or nothing now
    sample = sub.add_parser("sample", help="write a sample image folder (for make local and tests)")
    sample.add_argument("output", help="folder to create")
    sample.add_argument("--count", type=int, default=64, help="images (default: 64), plus one broken file")
    return parser


def _groups(command: str):
    return NIGHTLY_GROUPS if command == "nightly" else RUN_GROUPS


def load_config_file(path: str, command: str, storage_options: dict) -> dict:
    """Reads a YAML or TOML options file (any fsspec URI); keys are flag names, with - or _."""
    from pipeline.config import ConfigError
    from pipeline.storage import check_uri, open_file

    check_uri(path, "--config")
    try:
        with open_file(path, "rb", storage_options) as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as e:  # a store's refusal too (botocore's ParamValidationError is no OSError)
        raise ConfigError(f"cannot read config file {path}: {type(e).__name__}: {e}") from None
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
    show_skipped(plan.listing, plan.config.source.verbose)
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


def show_skipped(listing, verbose: bool) -> None:
    """With --verbose, each file under the input that is not an input, and why."""
    if verbose:
        for uri, why in listing.skips:
            print(redact(f"skipped   {uri}: {why}"), file=sys.stderr)


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
        print(redact(f"error: run failed: {one_line(e, from_ray)}"), file=sys.stderr)
        return EXIT_RUN_FAILED


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(e: BaseException, traceback: bool = False, limit: int = 300) -> str:
    """An error as one line of at most ``limit`` characters. A Ray task error's text is a
    traceback, whose last line names the cause; a store's error (delta-rs's) is a chain of
    causes, one per line: its first and last say what failed and why."""
    lines = [" ".join(_ANSI.sub("", ln).replace("↳", "").split()) for ln in str(e).strip().splitlines()]
    lines = [ln for ln in lines if ln] or [type(e).__name__]
    text = lines[-1] if traceback or len(lines) == 1 else f"{lines[0]}: {lines[-1]}"
    return text[:limit]


def nightly_command(args: argparse.Namespace) -> int:
    """The incremental job: exit 0 when done (or nothing new), 3 over the error budget."""
    from datetime import datetime, timezone

    from pipeline.incremental import check_date, run_nightly

    def go() -> int:
        config = config_from_args(args)
        given = getattr(args, "date", None)
        date = check_date(given if given is not None else datetime.now(timezone.utc).strftime("%Y-%m-%d"))
        print_origin()
        result = run_nightly(
            config, date, args.max_error_fraction, args.backfill, args.max_inputs,
            args.prune_missing, args.retention_hours,
        )  # fmt: skip
        print(redact(result.message), file=sys.stderr if result.exit_code else sys.stdout)
        return result.exit_code

    return guarded(go)


def fail(message: str) -> int:
    """One line on stderr, credentials removed, and the bad-input exit code. A message that
    quotes a client's error of several lines keeps its first and last."""
    print(redact(f"error: {one_line(Exception(message), limit=1000)}"), file=sys.stderr)
    return EXIT_BAD_INPUT


def exit_process(code: int) -> None:
    """Ends the process with ``code`` once its output is flushed, skipping the interpreter's
    teardown: native libraries that read Delta tables were seen to abort there ("terminate
    called without an active exception", exit 134) after all the work was done, which would
    turn a good run's 0 into a failure. What must happen at the end already has (Ray is shut
    down by the run that started it; the commit is in the table)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def entry_point() -> None:
    """The ``resnet-pipeline`` command."""
    exit_process(main())


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
    try:
        if args.command == "nightly":
            return nightly_command(args)
        if args.command in TABLE_COMMANDS:
            return table_command(args)
        return run_command(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


TABLE_COMMANDS = ("history", "vacuum", "migrate", "recover")


def table_command(args: argparse.Namespace) -> int:
    """``history``, ``vacuum`` and ``migrate`` of an output table. A path that is not a
    table root (an empty string, a typo, a bare ``s3://``) is refused in one line, and
    nothing is created or deleted."""
    from pipeline import sinks
    from pipeline.storage import canonical_uri, check_uri

    def go() -> int:
        if args.command == "recover":
            return fail(
                "recover is gone: a run's Delta commit is all or nothing, so a killed run left "
                "nothing half done; `python -m pipeline vacuum OUTPUT` removes the files it wrote"
            )
        so = StorageConfig(args.s3_endpoint_url, args.s3_anonymous).options
        uri = canonical_uri(check_uri(args.output, "OUTPUT")) if args.output.strip() else args.output
        if args.command == "migrate":
            from pipeline.sinks.migrate import migrate

            for line in migrate(uri, so):
                print(redact(line))
            return 0
        table = sinks.open_existing(uri, so)
        if args.command == "history":
            for line in sinks.history_lines(table, args.limit):
                print(line)
            return 0
        if args.retention_hours < 0:
            return fail(f"--retention-hours must be 0 or more, got {args.retention_hours:g}")
        files = sinks.vacuum(table, args.retention_hours, dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        print(
            redact(f"{table.uri}: {verb} {len(files)} files unreferenced for over {args.retention_hours:g} h")
        )
        for f in files if args.dry_run else []:
            print(f"  {f}")
        return 0

    return guarded(go)
