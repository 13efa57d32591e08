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


def test_ledger_entries_of_many_inputs_from_the_staged_counts():
    """Each input's entry once came from a pass over every staged file: O(inputs × files)."""
    from pipeline.incremental import entries

    n, per_file = 20_000, 100
    todo = {f"s3://b/{i}.tar" for i in range(n)}
    counts: dict = {}
    for i in range(n):  # input i in file i // 100, and every tenth also in the next file
        for k in (i // per_file, i // per_file + 1) if i % 10 == 0 else (i // per_file,):
            counts.setdefault(f"/stage/f{k:04d}.parquet", {})[f"s3://b/{i}.tar"] = [2, i % 2]
    moves = {p: f"dt=2/{p.rsplit('/', 1)[1]}" for p in counts}
    done = entries(todo, counts, moves, {u: "v1" for u in todo}, "dt=2", "r9", "m1")
    assert set(done) == todo
    for i in (0, 1, 9_999, 19_990, 19_999):
        ks = (i // per_file, i // per_file + 1) if i % 10 == 0 else (i // per_file,)
        files = [f"dt=2/f{k:04d}.parquet" for k in ks]
        assert done[f"s3://b/{i}.tar"] == {"version": "v1", "partition": "dt=2", "files": files,
                                           "rows": 2 * len(files), "errors": (i % 2) * len(files),
                                           "run_id": "r9", "model": "m1"}  # fmt: skip
    assert sum(e["rows"] for e in done.values()) == sum(c[0] for per in counts.values() for c in per.values())
    new = entries({"s3://b/new.tar"}, counts, moves, {"s3://b/new.tar": "v"}, "dt=2", "r", "m")
    assert new["s3://b/new.tar"] == {"version": "v", "partition": "dt=2", "files": [], "rows": 0,
                                     "errors": 0, "run_id": "r", "model": "m"}  # fmt: skip


def test_manifests_group_the_ledger_once_and_match_one_built_from_all_of_it():
    from pipeline.incremental import manifest, manifests

    ledger = {f"u{i}": {**entry("1", [f"dt={i % 7}/f{i % 50}.parquet"], f"dt={i % 7}"), "model": f"m{i % 3}"}
              for i in range(5_000)}  # fmt: skip
    built = manifests({"dt=1", "dt=3", "dt=9"}, ledger, None, "r2")
    assert list(built) == ["dt=1", "dt=3", "dt=9"]
    for p, m in built.items():
        whole = manifest(p, ledger, None, "r2")
        del m["written"], whole["written"]
        assert m == whole
    assert built["dt=1"]["rows"] == len(built["dt=1"]["inputs"]) == sum(i % 7 == 1 for i in range(5_000))
    assert built["dt=9"]["inputs"] == [] and built["dt=9"]["rows"] == 0
    assert built["dt=9"]["last_run_id"] == "r2"


def test_plan_closes_over_shared_files_once_each():
    """Inputs chained through shared files, and one file shared by thousands: all redone."""
    n = 20_000
    chain = {f"c{i}": entry("1", [f"dt=1/c{i}.parquet", f"dt=1/c{i + 1}.parquet"]) for i in range(n)}
    big = {f"b{i}": entry("1", ["dt=1/big.parquet"]) for i in range(5_000)}
    ledger = {**chain, **big, "alone": entry("1", ["dt=1/alone.parquet"])}
    versions = {u: "1" for u in ledger}
    visible = {f for e in ledger.values() for f in e["files"]}
    assert plan_inputs({**versions, "c0": "2"}, ledger, visible) == set(chain)
    assert plan_inputs({**versions, "b7": "2"}, ledger, visible) == set(big)
    unlisted = {**versions, "c0": "2"}
    del unlisted["c5"]  # no longer listed: neither redone nor a link in the chain
    assert plan_inputs(unlisted, ledger, visible) == {f"c{i}" for i in range(5)}
