"""The README's reading recipes, run as written against a real nightly output.

Two nights: the first commits its partition (_SUCCESS), the second is over its error
budget (no _SUCCESS). Every recipe must return the first night's rows, with its date."""

import os
import re

import pytest

from pipeline import cli
from tests.e2e.test_nightly import make_shard

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme_blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks in the README paragraph that starts with ``section``."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index(section)
    end = text.index("\n## ", start)
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.DOTALL)


@pytest.fixture(scope="module")
def committed(ray_cluster, tmp_path_factory):
    """features/resnet50 under a folder: night one committed (5 rows), night two over budget."""
    base = tmp_path_factory.mktemp("readme")
    one, two = base / "night1", base / "night2"
    one.mkdir()
    two.mkdir()
    ids = make_shard(one, "a", 5, 0)
    make_shard(two, "b", 4, 20, broken=2)
    out = base / "features" / "resnet50"
    common = ["--output", str(out), "--model", "resnet18", "--weights", "none", "--batch-size", "8"]
    assert cli.main(["nightly", "--input", str(one), "--date", "2026-11-25", *common]) == 0
    assert cli.main(["nightly", "--input", str(two), "--date", "2026-11-26", *common]) == 3
    assert (out / "dt=2026-11-25" / "_SUCCESS").exists() and not (out / "dt=2026-11-26" / "_SUCCESS").exists()
    return base, ids


def test_every_reading_recipe_returns_the_committed_rows_only(committed, monkeypatch):
    import duckdb

    base, ids = committed
    monkeypatch.chdir(base)
    blocks = readme_blocks("**Reading only committed partitions.**")
    assert [lang for lang, _ in blocks] == ["python", "python", "sql", "python"]
    (_, arrow), (_, frames), (_, sql), (_, spark) = blocks
    assert "spark.read" in spark  # the one not run here: no Spark

    ns: dict = {}
    exec(arrow, ns)
    table = ns["table"]
    assert sorted(table["id"].to_pylist()) == sorted(ids)
    assert {str(v) for v in table["dt"].to_pylist()} == {"2026-11-25"}

    ns = {}
    exec(frames, ns)
    assert sorted(ns["df"]["id"].to_list()) == sorted(ids)
    assert {str(v) for v in ns["df"]["dt"].to_list()} == {"2026-11-25"}
    assert sorted(ns["pdf"]["id"]) == sorted(ids) and set(ns["pdf"]["dt"]) == {"2026-11-25"}

    rows = duckdb.sql(sql).fetchall()
    columns = duckdb.sql(sql).columns
    got = [dict(zip(columns, r, strict=True)) for r in rows]
    assert sorted(r["id"] for r in got) == sorted(ids)
    assert {str(r["dt"]) for r in got} == {"2026-11-25"}


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
    assert "rows      3 (3 ok, 0 error)" in out and "python -m pipeline 0.1.0" in out
    for folder in ("out/run1", "out/wds", "out/pq"):
        assert os.path.exists(f"{folder}/_report.json")
