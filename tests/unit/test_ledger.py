"""The nightly ledger: what to redo, which files are carried, what a night rewrites, on disk."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ledger
from pipeline.commit import Journal, Root, commit
from pipeline.errors import RunFailedError
from pipeline.sinks import counts_schema


def entry(version, files, partition="dt=1", model=None):
    return {"version": version, "files": files, "partition": partition, "rows": 1, "errors": 0,
            "run_id": "r", "model": model}  # fmt: skip


def book(entries: dict) -> ledger.Ledger:
    return ledger.Ledger(ledger.table_of(entries))


def counts(*rows) -> pa.Table:
    """``Sink.rows_per_source``'s table, files already at their committed paths."""
    names = ("file", "source", "rows", "errors")
    return pa.Table.from_pylist([dict(zip(names, r, strict=True)) for r in rows], schema=counts_schema())


def test_plan_new_changed_missing_and_not_the_inputs_sharing_their_files():
    entries = {
        "s3://b/a.tar": entry("10:e1", ["dt=1/f1.parquet"]),
        "s3://b/b.tar": entry("10:e2", ["dt=1/f1.parquet"]),  # shares f1 with a
        "s3://b/c.tar": entry("10:e3", ["dt=1/f2.parquet"]),
        "s3://b/d.tar": entry("10:e4", ["dt=1/f3.parquet", "dt=1/f2.parquet"]),
        "s3://b/gone.tar": entry("10:e6", ["dt=1/f9.parquet"]),  # no longer listed: kept as it is
    }
    visible = {"dt=1/f1.parquet", "dt=1/f2.parquet"}  # f3 vanished (a killed commit)
    versions = {"s3://b/a.tar": "11:e9", "s3://b/b.tar": "10:e2", "s3://b/c.tar": "10:e3",
                "s3://b/d.tar": "10:e4", "s3://b/e.tar": "5:e5"}  # fmt: skip
    planned = ledger.plan(book(entries), versions, visible, None)
    # a changed, d's file f3 is gone, e is new. b only shares a file with a: its rows are carried.
    assert planned.redo == ["s3://b/a.tar", "s3://b/d.tar", "s3://b/e.tar"]
    assert planned.backfill == planned.others == []
    same = {u: e["version"] for u, e in entries.items()}
    assert ledger.plan(book(entries), same, visible | {"dt=1/f3.parquet", "dt=1/f9.parquet"}, None).todo == []
    assert ledger.plan(ledger.Ledger(ledger.empty()), versions, set(), "m").redo == sorted(versions)


def test_plan_backfills_the_inputs_of_another_model_and_names_it():
    files = {"dt=1/f1.parquet", "dt=1/f2.parquet", "dt=1/f3.parquet"}
    entries = {
        "a.tar": entry("1", ["dt=1/f1.parquet"], model="resnet18 none 111"),
        "b.tar": entry("1", ["dt=1/f2.parquet"], model="resnet50 none 222"),
        "c.tar": entry("1", ["dt=1/f3.parquet"]),  # from before fingerprints: counted as this model's
        "d.tar": entry("1", ["dt=1/f3.parquet"], model="resnet18 none 111"),
        "gone.tar": entry("1", ["dt=1/f3.parquet"], model="resnet34 none 333"),  # no longer listed
    }
    versions = {"a.tar": "1", "b.tar": "1", "c.tar": "1", "d.tar": "1", "new.tar": "1"}
    planned = ledger.plan(book(entries), versions, files, "resnet50 none 222")
    assert (planned.redo, planned.backfill) == (["new.tar"], ["a.tar", "d.tar"])
    assert planned.others == ["resnet18 none 111"] and planned.todo == ["new.tar", "a.tar", "d.tar"]
    planned = ledger.plan(book(entries), versions, files, "resnet18 none 111")
    assert (planned.backfill, planned.others) == (["b.tar"], ["resnet50 none 222"])
    # Changed inputs of another model name it too: such a night is refused, not mixed in.
    changed = {**versions, "a.tar": "2", "d.tar": "2"}
    planned = ledger.plan(book(entries), changed, files, "resnet50 none 222")
    assert (planned.redo, planned.backfill) == (["a.tar", "d.tar", "new.tar"], [])
    assert planned.others == ["resnet18 none 111"]


def test_shared_files_are_carried_and_files_of_the_redone_alone_go():
    visible = {f"dt=1/f{i}.parquet" for i in (1, 2, 3)}
    entries = {
        "a": entry("1", ["dt=1/f1.parquet", "dt=1/f2.parquet"]),  # spans two files
        "b": entry("1", ["dt=1/f2.parquet"]),  # shares f2 with a
        "c": entry("1", ["dt=1/f3.parquet"]),
        "d": entry("1", ["dt=1/f3.parquet"]),
    }
    assert ledger.shared_files(book(entries), ["a"], visible) == (["dt=1/f1.parquet"], ["dt=1/f2.parquet"])
    assert ledger.shared_files(book(entries), ["c", "d"], visible) == (["dt=1/f3.parquet"], [])
    assert ledger.shared_files(book(entries), ["new"], visible) == ([], [])
    # A shared file that is gone is not carried (there is nothing to copy); b, whose rows
    # were in it too, is redone by plan when listed.
    assert ledger.shared_files(book(entries), ["a"], visible - {"dt=1/f2.parquet"}) == (
        ["dt=1/f1.parquet"],
        [],
    )


def test_a_night_rewrites_only_the_partitions_it_touched():
    entries = {f"u{i}": entry("1", [f"dt={i % 5}/f{i % 20}.parquet"], f"dt={i % 5}") for i in range(1_000)}
    old = book(entries)
    staged = counts(("dt=9/p.parquet", "u3", 2, 1), ("dt=9/p.parquet", "new", 4, 0))
    done = ledger.entries(["u3", "new"], staged, {"u3": "2", "new": "1"}, "dt=9", "r2", "m")
    renamed = {"dt=3/f3.parquet": "dt=3/part-carried-000000-r2.parquet"}
    tables = ledger.update(old, ["u3", "new"], done, renamed, "dt=9")
    assert list(tables) == ["dt=3", "dt=9"]  # not dt=0, 1, 2, 4
    new = {p: ledger.Ledger(t).entries() for p, t in tables.items()}
    assert new["dt=9"] == {
        "new": {"version": "1", "partition": "dt=9", "files": ["dt=9/p.parquet"], "rows": 4, "errors": 0,
                "run_id": "r2", "model": "m"},
        "u3": {"version": "2", "partition": "dt=9", "files": ["dt=9/p.parquet"], "rows": 2, "errors": 1,
               "run_id": "r2", "model": "m"},
    }  # fmt: skip
    assert "u3" not in new["dt=3"] and len(new["dt=3"]) == 199
    assert new["dt=3"]["u23"]["files"] == ["dt=3/part-carried-000000-r2.parquet"]  # u23 shared f3 with u3
    assert new["dt=3"]["u8"]["files"] == ["dt=3/f8.parquet"]
    legacy = ledger.Ledger(old.table, legacy=True)  # the JSON ledger of older roots: all rewritten
    assert list(ledger.update(legacy, ["u3"], done, {}, "dt=9")) == [
        "dt=0",
        "dt=1",
        "dt=2",
        "dt=3",
        "dt=4",
        "dt=9",
    ]


def test_entries_of_many_inputs_from_the_staged_counts():
    """Each input's entry once came from a pass over every staged file: O(inputs × files)."""
    n, per_file = 20_000, 100
    todo = {f"s3://b/{i}.tar" for i in range(n)} | {"s3://b/empty.tar"}
    rows = []
    for i in range(n):  # input i in file i // 100, and every tenth also in the next file
        for k in (i // per_file + 1, i // per_file) if i % 10 == 0 else (i // per_file,):
            rows.append((f"dt=2/f{k:04d}.parquet", f"s3://b/{i}.tar", 2, i % 2))
    table = counts(*reversed(rows))
    done = ledger.Ledger(ledger.entries(todo, table, {u: "v1" for u in todo}, "dt=2", "r9", "m1")).entries()
    assert set(done) == todo
    for i in (0, 1, 9_999, 19_990, 19_999):
        ks = (i // per_file, i // per_file + 1) if i % 10 == 0 else (i // per_file,)
        files = [f"dt=2/f{k:04d}.parquet" for k in ks]
        assert done[f"s3://b/{i}.tar"] == {"version": "v1", "partition": "dt=2", "files": files,
                                           "rows": 2 * len(files), "errors": (i % 2) * len(files),
                                           "run_id": "r9", "model": "m1"}  # fmt: skip
    assert sum(e["rows"] for e in done.values()) == sum(r[2] for r in rows)
    assert done["s3://b/empty.tar"] == {"version": "v1", "partition": "dt=2", "files": [], "rows": 0,
                                        "errors": 0, "run_id": "r9", "model": "m1"}  # fmt: skip
    assert ledger.entries([], counts(), {}, "dt=2", "r", "m").num_rows == 0
    assert (
        ledger.Ledger(ledger.entries(["x"], counts(), {"x": "1"}, "dt=2", "r", "m")).entries()["x"]["files"]
        == []
    )


def test_the_ledger_on_disk_per_partition_and_from_the_legacy_file(tmp_path):
    # Under key=value folders named like the ledger's columns: pyarrow must not read them
    # as Hive partitions into every row (it did: every entry's model became "resnet18").
    out = tmp_path / "model=resnet18" / "partition=eu" / "version=9" / "out"
    root = Root(str(out))
    entries = {"a": entry("1", ["dt=1/f.parquet"]), "b": entry("1", ["dt=2/g.parquet"], "dt=2", "m")}
    (out / "_state").mkdir(parents=True)
    (out / "_state" / "ledger.json").write_text(json.dumps(entries))
    old = ledger.load(root)
    assert old.legacy and old.entries() == entries

    # A night into dt=3 replaces the legacy file by one ledger file per partition.
    done = ledger.entries(["c"], counts(("dt=3/p.parquet", "c", 3, 0)), {"c": "9"}, "dt=3", "r1", "m")
    tables = ledger.update(old, ["c"], done, {}, "dt=3")
    deletes, moves = ledger.stage(root, "r1", tables, old)
    assert deletes == [ledger.LEGACY]
    assert sorted(dst for _, dst in moves) == [f"_state/ledger/dt={p}/r1.parquet" for p in (1, 2, 3)]
    commit(root, Journal("r1", deletes=deletes, moves=moves))
    now = ledger.load(root)
    assert not now.legacy and not (out / "_state" / "ledger.json").exists()
    assert now.entries() == {
        **entries,
        "c": {**entry("9", ["dt=3/p.parquet"], "dt=3", "m"), "rows": 3, "run_id": "r1"},
    }
    assert now.files == {f"dt={p}": [f"_state/ledger/dt={p}/r1.parquet"] for p in (1, 2, 3)}

    # The next night redoes b alone: only dt=2 (emptied: its file goes) and dt=4 are written.
    done = ledger.entries(["b"], counts(("dt=4/q.parquet", "b", 1, 0)), {"b": "2"}, "dt=4", "r2", "m")
    tables = ledger.update(now, ["b"], done, {}, "dt=4")
    deletes, moves = ledger.stage(root, "r2", tables, now)
    assert deletes == ["_state/ledger/dt=2/r1.parquet"] and [d for _, d in moves] == [
        "_state/ledger/dt=4/r2.parquet"
    ]
    commit(root, Journal("r2", deletes=deletes, moves=moves))
    again = ledger.load(root)
    assert sorted(again.files) == ["dt=1", "dt=3", "dt=4"] and again.entries()["b"]["partition"] == "dt=4"

    # An input in two ledger files (never written so; a hand-made copy) is refused, not doubled.
    pq.write_table(
        pq.read_table(root.abs("_state/ledger/dt=4/r2.parquet")), root.abs("_state/ledger/dt=4/x.parquet")
    )
    with pytest.raises(RunFailedError, match="holds an input twice"):
        ledger.load(root)


def test_a_manifest_from_a_partitions_ledger():
    from pipeline.incremental import manifest

    entries = {f"u{i}": {**entry("1", [f"dt=1/f{i % 3}.parquet"], model=f"m{i % 2}" if i else None),
                         "rows": i, "errors": i % 2, "run_id": f"r{i % 4}"} for i in range(10)}  # fmt: skip
    m = manifest("dt=1", ledger.table_of(entries), None, "r9")
    assert [i["uri"] for i in m["inputs"]] == sorted(entries) and "partition" not in m["inputs"][0]
    assert m["inputs"][1] == {"uri": "u1", **{k: v for k, v in entries["u1"].items() if k != "partition"}}
    assert m["files"] == ["dt=1/f0.parquet", "dt=1/f1.parquet", "dt=1/f2.parquet"]
    assert (m["rows"], m["errors"], m["fingerprints"]) == (45, 5, ["m0", "m1"])
    assert m["run_ids"] == ["r0", "r1", "r2", "r3"] and m["last_run_id"] == "r9"
    empty = manifest("dt=2", ledger.empty(), None, "r9")
    assert (empty["inputs"], empty["files"], empty["rows"], empty["errors"]) == ([], [], 0, 0)
