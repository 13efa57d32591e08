"""The nightly bookkeeping on real files: what to redo, and repairing a killed commit."""

import pytest

from pipeline.config import ConfigError
from pipeline.incremental import LEDGER, PENDING, Root, check_date, plan_inputs, recover


def entry(version, files, partition="dt=2026-11-25"):
    return {"version": version, "files": files, "partition": partition, "rows": 1, "errors": 0, "run_id": "r"}


def test_plan_new_changed_missing_and_colocated():
    ledger = {
        "s3://b/a.tar": entry("10:e1", ["dt=1/f1.parquet"]),
        "s3://b/b.tar": entry("10:e2", ["dt=1/f1.parquet"]),  # shares f1 with a
        "s3://b/c.tar": entry("10:e3", ["dt=1/f2.parquet"]),
        "s3://b/d.tar": entry("10:e4", ["dt=1/f3.parquet"]),
    }
    visible = {"dt=1/f1.parquet", "dt=1/f2.parquet"}  # f3 vanished (a killed commit)
    versions = {"s3://b/a.tar": "11:e9", "s3://b/b.tar": "10:e2", "s3://b/c.tar": "10:e3",
                "s3://b/d.tar": "10:e4", "s3://b/e.tar": "5:e5"}  # fmt: skip
    assert plan_inputs(versions, ledger, visible) == {
        "s3://b/a.tar",  # changed
        "s3://b/b.tar",  # in the same file as a: the file is replaced whole
        "s3://b/d.tar",  # its file is gone
        "s3://b/e.tar",  # new
    }
    same = {u: e["version"] for u, e in ledger.items()}
    assert plan_inputs(same, ledger, {"dt=1/f1.parquet", "dt=1/f2.parquet", "dt=1/f3.parquet"}) == set()


def test_recover_removes_what_a_killed_commit_had_moved(tmp_path):
    root = Root(str(tmp_path), None)
    (tmp_path / "dt=2").mkdir()
    (tmp_path / "dt=2" / "new1.parquet").write_bytes(b"x")  # moved before the kill
    (tmp_path / "_staging-run2").mkdir()
    (tmp_path / "_staging-run2" / "new2.parquet").write_bytes(b"x")  # not moved yet
    root.write_json(LEDGER, {"u": entry("1:a", ["dt=1/old.parquet"])})
    root.write_json(f"{PENDING}run2.json", {"new_files": ["dt=2/new1.parquet", "dt=2/new2.parquet"],
                                            "old_files": ["dt=1/old.parquet"]})  # fmt: skip
    assert recover(root) == 1
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == [LEDGER]  # the ledger alone: the inputs are redone by the next run
    assert recover(root) == 0


def test_ledger_write_is_whole(tmp_path):
    root = Root(str(tmp_path), None)
    root.write_json(LEDGER, {"a": 1})
    root.write_json(LEDGER, {"a": 2})
    assert root.read_json(LEDGER, None) == {"a": 2}
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("bad", ["2026-13-01", "26/11/2026", ""])
def test_check_date(bad):
    with pytest.raises(ConfigError):
        check_date(bad)
    assert check_date("2026-11-26") == "2026-11-26"
