"""The README's reading recipes and first commands, run as written.

The recipes read a real nightly table after three nights: one that committed, one over
its error budget (it commits too), and one that replaced a changed input's rows (the
rows of the input sharing its file written again) and compacted its partition's small
files. Every recipe must return every committed row, with its ``dt``, and its string
filter must work on the files the replacement and the compaction wrote."""

import os
import re

import pytest

from pipeline import cli
from tests.e2e.test_nightly import make_shard

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme_blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks in the README section that starts with ``section``."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index(section)
    end = text.index("\n## ", start + 1)
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.DOTALL)


@pytest.fixture(scope="module")
def table(ray_cluster, tmp_path_factory):
    """features/resnet50 under a folder, after three nights; (base, {id: dt}, ok ids)."""
    base = tmp_path_factory.mktemp("readme")
    one, two = base / "night1", base / "night2"
    one.mkdir()
    two.mkdir()
    make_shard(one, "a", 5, 0)
    make_shard(one, "b", 3, 30)
    make_shard(two, "c", 4, 20, broken=2)
    out = base / "features" / "resnet50"
    common = ["--output", str(out), "--model", "resnet18", "--weights", "none", "--batch-size", "8"]
    assert cli.main(["nightly", "--input", str(one), "--date", "2026-11-25", *common]) == 0
    assert cli.main(["nightly", "--input", str(two), "--date", "2026-11-26", *common]) == 3
    make_shard(one, "a", 6, 100)  # a changes: its rows are replaced, b's written again
    small = ["--rows-per-file", "2"]  # small files, which the night's upkeep compacts
    assert cli.main(["nightly", "--input", str(one), "--date", "2026-11-27", *common, *small]) == 0
    dts = {f"a/{i:03d}": "2026-11-27" for i in range(6)}
    dts |= {f"b/{i:03d}": "2026-11-25" for i in range(3)} | {f"c/{i:03d}": "2026-11-26" for i in range(4)}
    ok = {i for i in dts if i not in ("c/000", "c/001")}
    return base, dts, ok


def test_every_reading_recipe_returns_the_committed_rows(table, monkeypatch):
    import duckdb
    from deltalake import DeltaTable

    base, dts, ok = table
    monkeypatch.chdir(base)
    history = DeltaTable("features/resnet50").history()
    assert [h["operation"] for h in history[:2]] == ["OPTIMIZE", "WRITE"]  # replaced, then compacted
    blocks = readme_blocks("## Reading the table")
    assert [lang for lang, _ in blocks] == ["python", "python", "python", "python", "python"]
    (_, arrow), (_, frames), (_, sql), (_, ray_data), (_, spark) = blocks
    assert 'spark.read.format("delta")' in spark  # the one not run here: no Spark

    ns: dict = {}  # one session, as a reader would run them: the later recipes reuse `dataset`
    exec(arrow, ns)
    table = ns["table"]
    assert {i: str(d) for i, d in zip(table["id"].to_pylist(), table["dt"].to_pylist(), strict=True)} == {
        i: dts[i] for i in ok
    }  # fmt: skip

    exec(frames, ns)
    assert dict(zip(ns["df"]["id"].to_list(), map(str, ns["df"]["dt"].to_list()), strict=True)) == {
        i: dts[i] for i in ok
    }  # fmt: skip
    assert dict(zip(ns["pdf"]["id"], ns["pdf"]["dt"], strict=True)) == dts

    exec(sql, ns)
    assert sorted(r[0] for r in ns["rows"]) == sorted(ok)
    assert {len(r[2]) for r in ns["rows"]} == {512}
    assert {str(r[1]) for r in ns["rows"]} == {dts[i] for i in ok}
    dataset = ns["dataset"]  # noqa: F841  (DuckDB finds it by its name)
    assert duckdb.sql("SELECT count(*) FROM dataset WHERE source LIKE '%/b.tar'").fetchall() == [(3,)]

    exec(ray_data, ns)
    assert sorted(r["id"] for r in ns["ds"].take_all()) == sorted(dts)


def test_time_travel_reads_a_version_as_it_was(table, monkeypatch):
    """The README's one-liner: the embeddings as of version N."""
    import polars as pl

    base, dts, _ = table
    monkeypatch.chdir(base)
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "`pl.read_delta(root, version=N)`" in f.read()
    root = "features/resnet50"
    first = pl.read_delta(root, version=1)
    night_one = [f"a/{i:03d}" for i in range(5)] + [f"b/{i:03d}" for i in range(3)]
    assert sorted(first["id"].to_list()) == night_one
    assert sorted(pl.read_delta(root)["id"].to_list()) == sorted(dts)


def test_the_running_it_commands_run_as_written(ray_cluster, tmp_path, monkeypatch, capsys):
    """The first commands a reader copies: their inputs made, the pretrained file put in the
    hub cache (no download here), each line run through the CLI on the module's Ray."""
    import shlex

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipeline import models
    from pipeline.samples import make_samples
    from tests.conftest import GOOD, write_tar

    [(lang, block)] = readme_blocks("## Running it")[:1]
    assert lang == "bash"
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert all(c[:3] == [".venv/bin/python", "-m", "pipeline"] for c in commands) and len(commands) == 4

    monkeypatch.chdir(tmp_path)
    make_samples("data/samples", count=3)
    os.makedirs("shards")
    for i in range(100):
        write_tar(f"shards/shard-{i:06d}.tar", [(f"s{i}", {"jpg": GOOD["good/cat.jpg"]})])
    pq.write_table(pa.table({"img": pa.array([GOOD["good/cat.jpg"]] * 3, pa.binary())}), "data.parquet")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = models.hub_cache_file(models.torchvision_weights("resnet50", "DEFAULT"))
    os.makedirs(os.path.dirname(cache))
    torch.save(models.build("resnet50").state_dict(), cache)

    for command in commands:
        try:
            code = cli.main(command[3:])
        except SystemExit as e:  # --version
            code = e.code
        assert code == 0, (command, capsys.readouterr().err[-2000:])
    out = capsys.readouterr().out
    assert "rows      4 (3 ok, 1 error)" in out and "rows      100 (100 ok, 0 error)" in out
    assert "rows      3 (3 ok, 0 error)" in out and "python -m pipeline 0.2.0" in out
    for folder in ("out/run1", "out/wds", "out/pq"):
        assert os.path.isdir(f"{folder}/_delta_log")
