"""The output table without Ray: one commit per run, what it checks first, who wins a race,
what it records, and the commands that only read or tend a table."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipeline import cli, sinks
from pipeline import columns as C
from pipeline.sinks.delta import CommitCheckError
from tests.tables import FINGERPRINT, commit, read, rows, write


def test_a_run_is_one_commit_and_readers_see_each_version_whole(tmp_path):
    uri = str(tmp_path / "t")
    first = commit(
        uri, [("a.parquet", rows("s3://in/a.tar", 3)), ("b.parquet", rows("s3://in/b.tar", 2, errors=1))]
    )
    assert (first.version, first.rows, first.added_rows, first.added_errors) == (1, 5, 5, 1)

    table = sinks.Table(uri)
    old = {f.path: f for f in table.files()}
    assert {p: (f.rows, f.errors) for p, f in old.items()} == {"a.parquet": (3, 0), "b.parquet": (2, 1)}
    second = commit(uri, [("a2.parquet", rows("s3://in/a.tar", 4, version="2:b"))], run_id="r2",
                    removes=[old["a.parquet"]])  # fmt: skip
    assert (second.version, second.rows, second.removed_rows) == (2, 6, 3)

    assert read(uri, 0).num_rows == 0  # the table is created empty, then the run commits
    assert sorted(read(uri, 1)[C.ID].to_pylist()) == ["a/000", "a/001", "a/002", "b/000", "b/001"]
    assert sorted(read(uri)[C.ID].to_pylist()) == ["a/000", "a/001", "a/002", "a/003", "b/000", "b/001"]
    assert os.path.exists(tmp_path / "t" / "a.parquet")  # removed from the table, kept for time travel
    info = DeltaTable(uri).history(1)[0]["pipeline"]
    assert info == {"command": "test", "run_id": "r2"}


def test_the_files_carry_delta_statistics_and_the_embedding_its_dimension(tmp_path):
    uri = str(tmp_path / "t")
    commit(uri, [("a.parquet", rows("s3://in/a.tar", 5, errors=2, dim=3))])
    actions = DeltaTable(uri).get_add_actions(flatten=True)
    import pyarrow as pa

    a = pa.table(actions).to_pylist()[0]
    assert (
        a["num_records"] == 5
        and a["null_count.error"] == 3
        and a["min.id"] == "a/000"
        and a["max.id"] == "a/004"
    )
    assert a["min.source"] == a["max.source"] == "s3://in/a.tar" and a["min.fingerprint"] == FINGERPRINT
    field = DeltaTable(uri).schema().to_arrow()
    embedding = pa.schema(field).field(C.EMBEDDING)
    assert (
        embedding.type.value_type == pa.float32() and embedding.metadata[C.EMBEDDING_DIM_KEY.encode()] == b"3"
    )
    assert pq.read_table(str(tmp_path / "t" / "a.parquet"))[C.EMBEDDING].to_pylist()[2:] == [
        [0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]
    ]  # fmt: skip


def test_a_commit_checks_its_files_first_and_commits_nothing_when_they_are_wrong(tmp_path):
    uri = str(tmp_path / "t")
    commit(uri, [("a.parquet", rows("s3://in/a.tar", 2))])
    table = sinks.Table(uri)
    schema = rows("x", 1).schema

    lost = write(table, rows("s3://in/b.tar", 2), "b.parquet")
    os.remove(tmp_path / "t" / "b.parquet")  # written by a worker whose disk the driver does not see
    with pytest.raises(CommitCheckError, match="not under .* as the driver sees it"):
        table.transaction("r2", schema).commit([lost])

    f = write(table, rows("s3://in/b.tar", 2), "b.parquet")
    with pytest.raises(CommitCheckError, match="wrote 3 rows but their files hold 2"):
        table.transaction("r3", schema).commit([f], written_rows=3)
    with pytest.raises(CommitCheckError, match="1 rows were to be kept .* but 0 were written"):
        table.transaction("r4", schema, carried_rows=1).commit([f])
    assert sinks.Table(uri).version == 1 and sorted(read(uri)[C.ID].to_pylist()) == ["a/000", "a/001"]


def test_of_two_runs_planned_on_one_snapshot_only_the_first_commits(tmp_path):
    """Two appends of the same input do not conflict in Delta by themselves; the application
    transaction every commit carries makes the second one fail, whatever it holds."""
    uri = str(tmp_path / "t")
    commit(uri, [("a.parquet", rows("s3://in/a.tar", 2))])
    one, two = sinks.Table(uri), sinks.Table(uri)
    schema = rows("x", 1).schema
    tx1, tx2 = one.transaction("r1", schema), two.transaction("r2", schema)
    tx1.commit([write(one, rows("s3://in/b.tar", 2), "b1.parquet")])
    with pytest.raises(
        sinks.ConcurrentCommit, match="another run committed version 2; nothing was committed"
    ):
        tx2.commit([write(two, rows("s3://in/b.tar", 2), "b2.parquet")])
    assert sorted(read(uri)[C.ID].to_pylist()) == ["a/000", "a/001", "b/000", "b/001"]
    # The loser's file is in no snapshot; vacuum removes it (here at once: no run writes).
    assert sinks.vacuum(sinks.Table(uri), 0, dry_run=True) == ["b2.parquet"]


def test_two_runs_creating_one_table_at_once_only_one_creates_it(tmp_path):
    uri = str(tmp_path / "t")
    one, two = sinks.Table(uri), sinks.Table(uri)
    schema = rows("x", 1).schema
    one.transaction("r1", schema).commit([write(one, rows("s3://in/a.tar", 1), "a.parquet")])
    with pytest.raises(sinks.ConcurrentCommit):
        two.transaction("r2", schema).commit([write(two, rows("s3://in/b.tar", 1), "b.parquet")])
    assert read(uri)[C.ID].to_pylist() == ["a/000"]


def test_a_commit_whose_answer_was_lost_is_known_by_its_run_id(tmp_path, monkeypatch):
    """The store took the commit and the answer never came: the run finds its commit in the
    log and says it succeeded, once. A commit that never reached the store fails."""
    uri = str(tmp_path / "t")
    commit(uri, [("a.parquet", rows("s3://in/a.tar", 1))])
    real = DeltaTable.create_write_transaction

    def lost_answer(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise OSError("connection reset by peer")

    monkeypatch.setattr(DeltaTable, "create_write_transaction", lost_answer)
    table = sinks.Table(uri)
    done = table.transaction("r2", rows("x", 1).schema).commit(
        [write(table, rows("s3://in/b.tar", 1), "b.parquet")]
    )
    assert done.version == 2 and sorted(read(uri)[C.ID].to_pylist()) == ["a/000", "b/000"]

    def never_sent(self, *args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(DeltaTable, "create_write_transaction", never_sent)
    table = sinks.Table(uri)
    with pytest.raises(OSError, match="connection refused"):
        table.transaction("r3", rows("x", 1).schema).commit(
            [write(table, rows("s3://in/c.tar", 1), "c.parquet")]
        )
    assert sinks.Table(uri).version == 2


def test_inputs_are_read_from_the_planning_columns_as_runs(tmp_path):
    uri = str(tmp_path / "t")
    import pyarrow as pa

    mixed = pa.concat_tables([rows("s3://in/a.tar", 3, errors=1), rows("s3://in/b.tar", 2, version="7:x"),
                              rows("s3://in/a.tar", 2, start=3)])  # fmt: skip
    commit(
        uri,
        [("one.parquet", mixed), ("two.parquet", rows("s3://in/c.tar", 4, fingerprint="other"))],
        "2026-11-01",
    )
    got = sinks.Table(uri).inputs().sort_by([("file", "ascending"), (C.SOURCE, "ascending")]).to_pylist()
    assert got == [
        {"file": "dt=2026-11-01/one.parquet", "partition": "2026-11-01", C.SOURCE: "s3://in/a.tar",
         C.SOURCE_VERSION: "1:a", C.FINGERPRINT: FINGERPRINT, "rows": 5, "errors": 1},
        {"file": "dt=2026-11-01/one.parquet", "partition": "2026-11-01", C.SOURCE: "s3://in/b.tar",
         C.SOURCE_VERSION: "7:x", C.FINGERPRINT: FINGERPRINT, "rows": 2, "errors": 0},
        {"file": "dt=2026-11-01/two.parquet", "partition": "2026-11-01", C.SOURCE: "s3://in/c.tar",
         C.SOURCE_VERSION: "1:a", C.FINGERPRINT: "other", "rows": 4, "errors": 0},
    ]  # fmt: skip


def test_an_output_a_run_must_not_write_is_refused_before_any_work(tmp_path):
    schema = rows("x", 1).schema
    file = tmp_path / "file"
    file.write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    old = tmp_path / "old"
    (old / "dt=2026-11-01").mkdir(parents=True)
    (old / "dt=2026-11-01" / "part-0.parquet").write_bytes(b"x")
    (old / "dt=2026-11-01" / "_SUCCESS").write_bytes(b"")
    table = tmp_path / "table"
    commit(str(table), [("a.parquet", rows("s3://in/a.tar", 1))])
    nightly = tmp_path / "nightly"
    commit(str(nightly), [("a.parquet", rows("s3://in/a.tar", 1))], partition="2026-11-01")
    cases = [
        (file, False, False, "exists and is a file"),
        (other, False, False, "is not empty and is not a Delta table"),
        (old, True, False, f"convert it once with `python -m pipeline migrate {old}`"),
        (table, False, False, "is a table of 1 rows; pass --overwrite"),
        (table, True, False, "is a table not partitioned; nightly cannot write it"),
        (nightly, False, True, "partitioned by dt (a nightly table); run cannot write it"),
    ]
    for path, partitioned, replace, message in cases:
        with pytest.raises(sinks.TableError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sinks.Table(str(path)).check_writable(schema, partitioned=partitioned, replace=replace)
    sinks.Table(str(table)).check_writable(schema, partitioned=False, replace=True)
    sinks.Table(str(tmp_path / "new")).check_writable(schema, partitioned=True, replace=False)
    with pytest.raises(sinks.TableError, match="other columns"):
        sinks.Table(str(table)).check_writable(C.output_schema("both", 4), partitioned=False, replace=True)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", ["history", "vacuum", "migrate", "recover"])
def test_table_commands_given_a_path_that_is_no_table_touch_nothing(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "_staging-x").mkdir()
    (tmp_path / "keep.tmp-0123abcd").write_text("x")
    before = sorted(os.listdir(tmp_path))
    for path in ["", "/no/such/path", "typo", "s3://", str(tmp_path)]:
        code = cli.main([command, path])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (command, path, err)
    assert sorted(os.listdir(tmp_path)) == before and not os.path.exists("/no/such/path")


def test_history_has_a_line_per_commit_and_vacuum_keeps_what_time_travel_needs(tmp_path, capsys):
    uri = str(tmp_path / "t")
    commit(uri, [("a.parquet", rows("s3://in/a.tar", 2))], run_id="first")
    a = sinks.Table(uri).files()
    commit(uri, [("a2.parquet", rows("s3://in/a.tar", 3))], run_id="second", removes=a)
    (tmp_path / "t" / "orphan.parquet").write_bytes(b"a killed run's file")

    assert cli.main(["history", uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        lines[0].startswith("v2 ")
        and "run second" in lines[0]
        and lines[1].startswith("v1 ")
        and "run first" in lines[1]
    )
    assert lines[2].startswith("v0 ") and "CREATE TABLE" in lines[2]
    assert lines[3].startswith("version 2: 1 files, 3 rows") and "2 more files on disk" in lines[3]

    assert cli.main(["vacuum", uri]) == 0  # the default retention: a week of time travel
    assert "deleted 0 files" in capsys.readouterr().out
    assert sorted(read(uri, 1)[C.ID].to_pylist()) == ["a/000", "a/001"]
    assert cli.main(["vacuum", uri, "--retention-hours", "0", "--dry-run"]) == 0
    assert sorted(capsys.readouterr().out.split()[-2:]) == ["a.parquet", "orphan.parquet"]
    assert cli.main(["vacuum", uri, "--retention-hours", "0"]) == 0
    assert not os.path.exists(tmp_path / "t" / "orphan.parquet") and not os.path.exists(
        tmp_path / "t" / "a.parquet"
    )
    assert sorted(read(uri)[C.ID].to_pylist()) == ["a/000", "a/001", "a/002"]


def test_a_commit_records_the_run_and_redacts_credentials(tmp_path):
    uri = str(tmp_path / "t")
    table = sinks.Table(uri)
    f = write(table, rows("s3://in/a.tar", 1), "a.parquet")
    info = {"command": "run", "input": "https://user:pass@host/x?X-Amz-Signature=abc", "model": "resnet18"}
    table.transaction("r1", rows("x", 1).schema, info=info).commit([f], info={"rows": 1})
    log = os.path.join(uri, "_delta_log")
    raw = ""
    for name in sorted(os.listdir(log)):
        with open(os.path.join(log, name), "rb") as f:
            raw += f.read().decode(errors="replace")
    assert "pass" not in raw and "abc" not in raw
    got = DeltaTable(uri).history(1)[0]["pipeline"]
    assert (
        got["input"] == "https://<redacted>@host/x?<redacted>" and got["rows"] == 1 and got["run_id"] == "r1"
    )
