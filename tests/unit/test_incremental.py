"""The nightly job's planning, from what a real table holds (no Ray), and its own checks."""

import pytest

from pipeline import columns as C
from pipeline import sinks
from pipeline.config import ConfigError
from pipeline.incremental import check_date, ledger_keys, plan
from tests.tables import FINGERPRINT, commit, rows


@pytest.mark.parametrize("bad", ["2026-13-01", "26/11/2026", "", None])
def test_check_date(bad):
    with pytest.raises(ConfigError):
        check_date(bad)
    assert check_date("2026-11-26") == "2026-11-26"


def test_inputs_whose_urls_differ_only_in_their_query_are_refused():
    """The table keys inputs by their redacted URI: two thumbnails ``thumb.jpg?id=1`` and
    ``?id=2`` were one key, and one of them was never done, night after night."""
    from pipeline.sources import InputError

    ok = ledger_keys(["s3://b/a.tar", "https://h/x.jpg?X-Amz-Signature=s", "https://h/y.jpg"])
    assert ok == {"s3://b/a.tar": "s3://b/a.tar", "https://h/x.jpg?<redacted>": "https://h/x.jpg?X-Amz-Signature=s",
                  "https://h/y.jpg": "https://h/y.jpg"}  # fmt: skip
    with pytest.raises(InputError, match=r"two inputs are both https://h/thumb.jpg\?<redacted>"):
        ledger_keys(["https://h/thumb.jpg?id=1", "https://h/thumb.jpg?id=2"])


A, B, C_, D = (f"s3://in/{n}.tar" for n in "abcd")


@pytest.fixture
def table(tmp_path):
    """Night one: a and b share a file; c has its own, made by another model."""
    import pyarrow as pa

    uri = str(tmp_path / "t")
    shared = pa.concat_tables([rows(A, 3), rows(B, 2, errors=1)])
    commit(
        uri, [("ab.parquet", shared), ("c.parquet", rows(C_, 2, fingerprint="resnet50 x 0000"))], "2026-11-24"
    )
    return sinks.Table(uri)


def night(table, versions, **kw):
    files = table.files()
    return plan(table.inputs(files), versions, FINGERPRINT, files, **kw)


def test_a_changed_input_is_redone_and_the_inputs_sharing_its_file_are_kept(table):
    n = night(table, {A: "2:new", B: "1:a", D: "1:a"}, backfill=True)
    assert n.todo == [A, D] and n.left == 0 and n.prune == [] and n.done == 3
    assert [f.path for f in n.removes] == ["dt=2026-11-24/ab.parquet"]
    assert (
        n.kept.drop == {A}
        and n.kept.rows == 2
        and [f.path for f in n.kept.files] == ["dt=2026-11-24/ab.parquet"]
    )
    assert n.others == ["resnet50 x 0000"]  # c, listed or not: the night is refused without --backfill


def test_nothing_to_do_when_every_listed_input_is_done_at_its_version(table):
    n = night(table, {A: "1:a", B: "1:a"})
    assert n.todo == [] and n.removes == [] and n.kept is None and n.others == ["resnet50 x 0000"]
    assert n.unlisted_others == 1  # c: not listed tonight, rows of another model


def test_backfill_redoes_the_inputs_of_another_model_after_the_changed_ones_within_max_inputs(table):
    n = night(table, {A: "2:new", B: "1:a", C_: "1:a"}, backfill=True, max_inputs=1)
    assert n.todo == [A] and n.left == 1
    n = night(table, {A: "1:a", B: "1:a", C_: "1:a"}, backfill=True)
    assert n.todo == [C_] and [f.path for f in n.removes] == ["dt=2026-11-24/c.parquet"] and n.kept is None
    n = night(table, {A: "1:a", B: "1:a", C_: "1:a"})
    assert n.todo == []  # without --backfill c is not planned (the night is refused on `others`)


def test_inputs_no_longer_listed_are_pruned_only_when_asked(table):
    n = night(table, {A: "1:a"}, prune_missing=True)
    assert n.todo == [] and n.prune == [B, C_]
    assert sorted(f.path for f in n.removes) == ["dt=2026-11-24/ab.parquet", "dt=2026-11-24/c.parquet"]
    assert n.kept.drop == {B} and n.kept.rows == 3  # a's rows stay, written again


def test_an_input_held_at_two_versions_is_redone(tmp_path):
    uri = str(tmp_path / "t")
    commit(
        uri, [("one.parquet", rows(A, 2, version="1:a")), ("two.parquet", rows(A, 1, version="2:b", start=5))]
    )
    n = night(sinks.Table(uri), {A: "2:b"})
    assert n.todo == [A] and len(n.removes) == 2 and n.kept is None


def test_rows_without_a_version_or_fingerprint_count_as_changed_and_as_this_models(tmp_path):
    """What the previous layout's `run` outputs become once migrated: no version, no fingerprint."""
    import pyarrow as pa

    uri = str(tmp_path / "t")
    data = rows(A, 2)
    data = data.set_column(
        data.schema.get_field_index(C.SOURCE_VERSION), C.SOURCE_VERSION, pa.nulls(2, pa.string())
    )
    data = data.set_column(
        data.schema.get_field_index(C.FINGERPRINT), C.FINGERPRINT, pa.nulls(2, pa.string())
    )
    commit(uri, [("a.parquet", data)])
    n = night(sinks.Table(uri), {A: "1:a"})
    assert n.todo == [A] and n.others == []
