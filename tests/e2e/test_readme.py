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
