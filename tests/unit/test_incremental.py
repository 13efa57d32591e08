"""The nightly bookkeeping: what to redo, and the date."""

import pytest

from pipeline.config import ConfigError
from pipeline.incremental import check_date, other_models, plan_inputs


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


def test_plan_redoes_the_inputs_of_another_model_and_names_it():
    files = {"dt=1/f1.parquet", "dt=1/f2.parquet", "dt=1/f3.parquet"}
    ledger = {
        "a.tar": {**entry("1", ["dt=1/f1.parquet"]), "model": "resnet18 none 111"},
        "b.tar": {**entry("1", ["dt=1/f2.parquet"]), "model": "resnet50 none 222"},
        "c.tar": entry("1", ["dt=1/f3.parquet"]),  # from before fingerprints: counted as this model's
        "gone.tar": {**entry("1", ["dt=1/f3.parquet"]), "model": "resnet34 none 333"},  # no longer listed
    }
    versions = {"a.tar": "1", "b.tar": "1", "c.tar": "1"}
    assert other_models(ledger, versions, "resnet50 none 222") == ["resnet18 none 111"]
    assert plan_inputs(versions, ledger, files, "resnet50 none 222") == {"a.tar"}
    assert plan_inputs(versions, ledger, files, "resnet18 none 111") == {"b.tar"}
    assert other_models(ledger, versions, "resnet18 none 111") == ["resnet50 none 222"]


@pytest.mark.parametrize("bad", ["2026-13-01", "26/11/2026", ""])
def test_check_date(bad):
    with pytest.raises(ConfigError):
        check_date(bad)
    assert check_date("2026-11-26") == "2026-11-26"
