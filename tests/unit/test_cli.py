"""Bad arguments and inputs: one line on stderr, exit 2, before Ray or any model starts."""

import os
import subprocess
import sys

import pytest

from pipeline import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == "python -m pipeline 0.2.0"


@pytest.fixture
def out_dir(tmp_path):
    return str(tmp_path / "out")


CASES = {
    "missing input": (
        ["--input", "/nonexistent/shards"],
        "error: input not found: /nonexistent/shards",
    ),
    "unknown model": (["--model", "resnet42"], "error: unknown model 'resnet42'"),
    "unknown task": (["--task", "segment"], "error: unknown task 'segment'"),
    "unknown format": (["--format", "zip"], "error: unknown format 'zip'"),
    "unknown decoder": (["--decode", "fpga"], "error: unknown decode 'fpga'; choose one of cpu, gpu"),
    "bad actors": (["--actors", "3,1"], "error: --actors needs 1 <= MIN <= MAX, got 3,1"),
    "unknown protocol": (["--input", "s4://b/x"], "error: cannot open s4://b/x: Protocol not known: s4"),
    "bad checkpoint": (["--weights", "{tmp}/nope.pth"], "error: checkpoint not found"),
    "unknown weights": (
        ["--weights", "IMAGENET9K"],
        "error: unknown weights 'IMAGENET9K' for resnet50",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_arguments_give_one_line(case, images_dir, tmp_path, capsys):
    extra, expected = CASES[case]
    args = ["run", "--input", images_dir, "--output", str(tmp_path / "out"), "--weights", "none"]
    code = cli.main([*args, *[a.replace("{tmp}", str(tmp_path)) for a in extra]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(expected), err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_a_real_process_prints_no_traceback(tmp_path):
    out = run_cli("run", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: input not found: {tmp_path / 'nothing'}"


def test_empty_input_and_existing_output(tmp_path, images_dir, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["run", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: input is empty")

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.parquet").write_bytes(b"x")
    args = ["run", "--input", images_dir, "--output", str(tmp_path / "o"), "--weights", "none"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    o = tmp_path / "o"
    assert err == f"error: output {o} exists, is not empty and is not a Delta table; choose another --output"
    assert cli.main([*args, "--overwrite"]) == 2  # --overwrite replaces a table's rows, never other files
    assert (tmp_path / "o" / "old.parquet").exists()


def parse(argv):
    return cli.parse_args(cli.get_args_parser(), argv)


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".yaml", "model: resnet18\nbatch-size: 8\nactors: [1, 2]\ntop_k: 3\n"),
        (".toml", 'model = "resnet18"\nbatch-size = 8\nactors = "1,2"\ntop_k = 3\n'),
    ],
)
def test_config_file_then_flags_override(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    args = parse(["run", "--config", str(path), "--input", "x", "--output", "y", "--batch-size", "16"])
    cfg = cli.config_from_args(args)
    assert cfg.model.name == "resnet18" and cfg.model.top_k == 3
    assert cfg.compute.actors == (1, 2)
    assert cfg.compute.batch_size == 16  # the flag wins over the file


def test_config_file_unknown_key(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("modle: resnet18\n")
    assert cli.main(["run", "--config", str(tmp_path / "c.yaml"), "--input", "x", "--output", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: unknown option 'modle' in config file {tmp_path / 'c.yaml'}"


@pytest.mark.parametrize("job", ["jobs/classify.py", "jobs/extract_features.py"])
def test_jobs_take_the_same_flags(job, tmp_path):
    """Run as a script from a bare folder, as `ray job submit` does: no install needed."""
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, job),
            "--input",
            str(tmp_path / "none"),
            "--output",
            "o",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: input not found: {tmp_path / 'none'}"


@pytest.mark.parametrize(
    "suffix, text, message",
    [
        (".toml", 'overwrite = "false"\n', "'overwrite' in config file PATH must be true or false"),
        (".yaml", 'batch-size: "64"\n', "'batch-size' in config file PATH must be an integer, got '64'"),
        (".yaml", "top-k: true\n", "'top-k' in config file PATH must be an integer, got True"),
        (".yaml", "num-gpus-per-actor: one\n", "'num-gpus-per-actor' in config file PATH must be a number"),
        (".yaml", "model: 50\n", "'model' in config file PATH must be a string, got 50"),
        (".yaml", "actors: [1, 2, 3]\n", "'actors' in config file PATH must be an integer, MIN,MAX"),
    ],
)  # fmt: skip
def test_config_file_values_are_typed_as_strictly_as_flags(tmp_path, capsys, suffix, text, message):
    """A string "false" once turned --overwrite on."""
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.parquet").write_bytes(b"x")
    argv = ["run", "--config", str(path), "--input", str(tmp_path / "i"), "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    expected = "error: option " + message.replace("PATH", str(path))
    assert capsys.readouterr().err.strip().startswith(expected)
    assert (tmp_path / "o" / "old.parquet").exists()


def test_config_file_takes_yaml_dates_and_numbers_where_flags_do(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text("date: 2026-11-27\nmax-error-fraction: 0\nactors: 2\noverwrite: false\n")
    args = parse(["nightly", "--config", str(path), "--input", "x", "--output", "y"])
    assert args.date == "2026-11-27" and args.max_error_fraction == 0 and args.actors == 2
    assert args.overwrite is False and cli.config_from_args(args).compute.actors == (2, 2)


@pytest.mark.parametrize("command", ["run", "nightly"])
@pytest.mark.parametrize(
    "input_rel, output_rel, how",
    [
        ("data/in", "data", "contains the input"),  # --overwrite once deleted the input images
        ("data", "data/out", "is inside the input"),
        ("data", "data/.", "is the input"),
        ("data/", "./data", "is the input"),
        ("data", "link", "is the input"),  # a symlink to it
        ("data/shard-{000..001}.tar", "data", "is the input"),
        ("data/*.jpg", "data/sub/out", "is inside the input"),
        ("s3a://bkt/images", "s3://bkt/images/", "is the input"),  # one store, two spellings
        ("gcs://bkt/in", "gs://bkt/in/out", "is inside the input"),
    ],
)
def test_output_overlapping_the_input_is_refused_however_it_is_spelled(
    tmp_path, monkeypatch, capsys, command, input_rel, output_rel, how
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "in").mkdir(parents=True)
    (tmp_path / "data" / "in" / "cat.jpg").write_bytes(b"an image")
    os.symlink(tmp_path / "data", tmp_path / "link")
    argv = [command, "--input", input_rel, "--output", output_rel, "--overwrite"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output ") and how in err and len(err.splitlines()) == 1
    assert (tmp_path / "data" / "in" / "cat.jpg").read_bytes() == b"an image"


def test_paths_are_canonical_and_absolute_before_anything_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    cfg = cli.config_from_args(parse(["run", "--input", "alias/./x/../imgs", "--output", "out/"]))
    # The input is known by the path it is given as (a `current` link re-pointed names the
    # same inputs); the overlap check resolves the links of both.
    assert cfg.source.input == str(tmp_path / "alias" / "imgs")
    assert cfg.sink.output == str(tmp_path / "out") + "/"
    cfg = cli.config_from_args(
        parse(["run", "--input", "s3://b/a//b/./c/../in/", "--output", "s3://b/a/out"])
    )
    assert (cfg.source.input, cfg.sink.output) == ("s3://b/a/b/in/", "s3://b/a/out")


def test_max_pixels_zero_is_refused_not_replaced_by_the_default(images_dir, tmp_path, capsys):
    """``--max-pixels 0`` once became Pillow's default in silence."""
    args = ["run", "--input", images_dir, "--output", str(tmp_path / "o"), "--max-pixels", "0"]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip() == "error: --max-pixels must be positive, got 0"


def test_the_exit_code_comes_from_the_error_type_not_its_module(capsys):
    """A pyarrow ArrowInvalid (a ValueError) in the read-back is a failed run, not bad input."""
    import pyarrow as pa

    from pipeline.errors import BadInputError, RunFailedError

    def raising(e):
        def go():
            raise e

        return go

    assert cli.guarded(raising(pa.ArrowInvalid("Parquet magic bytes not found"))) == 1
    assert capsys.readouterr().err.strip() == "error: run failed: Parquet magic bytes not found"
    assert cli.guarded(raising(BadInputError("bad"))) == 2
    assert cli.guarded(raising(RunFailedError("stalled"))) == 1
    assert cli.guarded(raising(ValueError("a library's own"))) == 1


def test_importing_the_configuration_imports_nothing_heavy():
    code = "import sys, pipeline.config; print(sorted({'torch', 'ray', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_each_setting_has_one_default_shared_by_flags_and_config_file(tmp_path):
    """The flags and the config file's keys are the dataclasses' fields, with their defaults."""
    from pipeline.config import ComputeConfig, ModelConfig, SinkConfig, StorageConfig

    cfg = cli.config_from_args(parse(["run", "--input", "x", "--output", "y"]))
    assert (cfg.model, cfg.compute, cfg.storage) == (ModelConfig(), ComputeConfig(), StorageConfig())
    assert cfg.sink.rows_per_file == SinkConfig(output="y").rows_per_file
    (tmp_path / "c.yaml").write_text("stall-timeout: 7\ns3-anonymous: true\n")
    argv = ["run", "--config", str(tmp_path / "c.yaml"), "--input", "x", "--output", "y"]
    cfg = cli.config_from_args(parse(argv))
    assert cfg.compute.stall_timeout == 7 and cfg.storage.s3_anonymous and cfg.storage_options["s3"]["anon"]


def test_the_readme_options_table_names_every_flag():
    """The flags come from the config's dataclasses; the README's table is written by hand."""
    import re

    from pipeline.config import NIGHTLY_GROUPS, RUN_GROUPS, settings

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("### Options") : readme.index("## Speed")]
    documented = set(re.findall(r"`(--[a-z0-9-]+)", table))
    run_flags = {s.flag for _, cls, _ in RUN_GROUPS for s in settings(cls)} | {"--config"}
    assert run_flags - documented == set() and documented - run_flags == set()
    nightly_only = {s.flag for _, cls, _ in NIGHTLY_GROUPS for s in settings(cls)} - run_flags
    nightly = readme[readme.index("## Nightly incremental runs") :]
    assert all(flag in nightly for flag in nightly_only), nightly_only


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--input", "s3://AKIAEXAMPLE:S3CRET@bucket/in/", "--output", "OUT"],
        ["run", "--input", "IN", "--output", "s3://AKIAEXAMPLE:S3CRET@bucket/out"],
        ["run", "--input", "IN", "--output", "OUT", "--weights", "s3://AKIAEXAMPLE:S3CRET@bucket/w.pth"],
        ["run", "--input", "IN", "--output", "OUT", "--labels", "gs://AKIAEXAMPLE:S3CRET@bucket/l.txt"],
        ["run", "--input", "IN", "--output", "OUT", "--config", "s3://AKIAEXAMPLE:S3CRET@bucket/c.yaml"],
        ["nightly", "--input", "s3a://AKIAEXAMPLE:S3CRET@bucket/in/", "--output", "OUT"],
        ["history", "s3://AKIAEXAMPLE:S3CRET@bucket/out"],
        ["vacuum", "s3://AKIAEXAMPLE:S3CRET@bucket/out"],
        ["migrate", "s3://AKIAEXAMPLE:S3CRET@bucket/out"],
    ],
)
def test_credentials_in_any_uri_are_refused_in_one_line_that_shows_no_secret(tmp_path, capsys, argv):
    """s3fs took ``KEY:SECRET@bucket`` for a bucket's name and printed it back, secret and all
    (for --weights and --labels on a second line that escaped redaction)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    argv = [a.replace("IN", str(tmp_path / "in")).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "carries no credentials" in err[0] and "<redacted>@bucket" in err[0], err
    assert "S3CRET" not in out.out + out.err and "AKIAEXAMPLE" not in out.out + out.err
    assert not (tmp_path / "out").exists()


def test_redaction_finds_user_info_without_its_scheme():
    from pipeline.storage import redact

    text = (
        'Invalid bucket name "AKIA:S3CRET@bucket": see s3://u:p@b/k and https://h/x?sig=1 or bob@example.com'
    )
    assert redact(text) == (
        'Invalid bucket name "<redacted>@bucket": see s3://<redacted>@b/k and https://h/x?<redacted> '
        "or bob@example.com"
    )


def test_a_local_path_with_double_colons_is_taken_literally(tmp_path, capsys):
    """fsspec reads ``::`` as a chain of file systems: ``/x/o::1`` was checked, leased and
    recovered as ``/x/o``. A local path is now taken literally by every step; a URI with a
    scheme that chains is refused."""
    from pipeline import sinks
    from tests.tables import commit, rows

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("someone else's")
    literal = str(tmp_path / "o::1")
    commit(literal, [("a.parquet", rows("s3://in/a.tar", 2))])
    assert sinks.Table(literal).rows() == 2 and os.path.isdir(tmp_path / "o::1" / "_delta_log")
    assert os.listdir(tmp_path / "o") == ["keep.txt"]
    assert cli.main(["history", literal]) == 0 and "version 1: 1 files, 2 rows" in capsys.readouterr().out
    assert cli.main(["run", "--input", str(tmp_path / "o"), "--output", "s3://b/o::memory://x"]) == 2
    assert "'::' (fsspec's chaining of file systems) is not supported" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--overwrite"], "error: nightly takes no --overwrite: it replaces changed inputs' rows by itself"),
        (["--date", ""], "error: --date must be YYYY-MM-DD, got ''"),
        (["--output", "FILE"], "error: output FILE exists and is a file; pass a folder URI"),
    ],
)
def test_nightly_misuse_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    """--overwrite was accepted and ignored, --date '' meant today, and an --output that is a
    file ended in "[Errno 17]" with exit 1."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    (tmp_path / "file").write_text("x")
    argv = [
        "nightly",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--weights",
        "none",
    ]
    argv += [a.replace("FILE", str(tmp_path / "file")) for a in extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == message.replace("FILE", str(tmp_path / "file")) and len(err) <= 2, err
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "out").exists()


def test_exit_codes_survive_a_native_library_aborting_at_teardown(tmp_path):
    """Processes that read a table through deltalake's own file-system handler were seen to
    abort at exit ("terminate called without an active exception", 134) after their work;
    the commands end their process without that teardown, with the code they mean. In a
    loop: the abort comes in some runs only."""
    from tests.tables import commit, rows

    uri = str(tmp_path / "t")
    commit(uri, [("a.parquet", rows("s3://in/a.tar", 2))])
    read = f"from deltalake import DeltaTable; DeltaTable({uri!r}).to_pyarrow_dataset().to_table()"
    ended = [
        subprocess.run(
            [sys.executable, "-c", f"{read}\nfrom pipeline.cli import exit_process; exit_process(3)"],
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        ).returncode  # fmt: skip
        for _ in range(6)
    ]
    assert ended == [3] * 6
    assert [run_cli("history", uri).returncode for _ in range(4)] == [0] * 4
    assert [run_cli("history", str(tmp_path / "none")).returncode for _ in range(2)] == [2] * 2
