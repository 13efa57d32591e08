"""An output of the previous layout (Parquet kept by our own journal, lease and ledger)
converted once into a table that the nightly job continues from (no Ray)."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipeline import cli, sinks
from pipeline import columns as C
from pipeline.incremental import plan

FP = "resnet18 none 99525c65c9c1"


def old_root(root, *, journal=False, lock=False) -> dict[str, list[float]]:
    """A nightly root as the previous release wrote it: two partitions, a ledger per
    partition, manifests and markers; returns id → embedding."""
    embeddings = {}
    ledger = []
    for p, (date, inputs) in enumerate((("2026-11-24", ["a", "b"]), ("2026-11-25", ["c"]))):
        folder = root / f"dt={date}"
        folder.mkdir(parents=True)
        ids, sources, emb = [], [], []
        for name in inputs:
            for i in range(2):
                ids.append(f"{name}/{i:03d}")
                sources.append(f"s3://in/{name}.tar")
                emb.append([float(p), float(i), float(ord(name))])
            ledger.append({"uri": f"s3://in/{name}.tar", "version": f"9:{name}", "partition": f"dt={date}",
                           "files": [f"dt={date}/part-000000-x.parquet"], "rows": 2, "errors": 0,
                           "run_id": f"run{p}", "model": FP})  # fmt: skip
        n = len(ids)
        old = pa.table(
            {
                "id": ids, "source": sources, "status": ["ok"] * n, "error": pa.nulls(n, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ravel(emb), pa.float32()), 3),
                "model": ["resnet18"] * n, "weights": ["none"] * n,
            },
        ).replace_schema_metadata({"pipeline.model": "resnet18"})  # fmt: skip
        pq.write_table(old, folder / "part-000000-x.parquet")
        (folder / "_SUCCESS").write_bytes(b"")
        (folder / "_manifest.json").write_text(json.dumps({"partition": f"dt={date}"}))
        embeddings.update(zip(ids, emb, strict=True))
        state = root / "_state" / "ledger" / f"dt={date}"
        state.mkdir(parents=True)
        mine = [e for e in ledger if e["partition"] == f"dt={date}"]
        pq.write_table(pa.Table.from_pylist(mine), state / f"run{p}.parquet")
    if journal:
        (root / "_state" / "commit-run9.json").write_text("{}")
    if lock:
        (root / "_lock.json").write_text("{}")
    return embeddings


def test_migrate_converts_the_previous_layout_and_the_next_night_has_nothing_to_do(tmp_path, capsys):
    root = tmp_path / "features"
    embeddings = old_root(root)
    (root / "dt=2026-11-24" / "part-migrated-000099.parquet").write_bytes(b"a killed migrate's half file")

    assert cli.main(["migrate", str(root)]) == 0
    assert "converted 2 data files (6 rows) into Delta table version 1" in capsys.readouterr().out
    delta = DeltaTable(str(root))
    rows = delta.to_pyarrow_table().to_pylist()
    assert {r["id"]: r["embedding"] for r in rows} == embeddings
    assert {(r["id"][0], r["dt"], r["source_version"], r["fingerprint"]) for r in rows} == {
        ("a", "2026-11-24", "9:a", FP), ("b", "2026-11-24", "9:b", FP), ("c", "2026-11-25", "9:c", FP)
    }  # fmt: skip
    left = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "_delta_log" not in p.parts
    )
    assert left == [
        "dt=2026-11-24/part-migrated-000000.parquet",
        "dt=2026-11-25/part-migrated-000001.parquet",
    ]
    table = sinks.Table(str(root))
    files = table.files()
    night = plan(table.inputs(files), {f"s3://in/{n}.tar": f"9:{n}" for n in "abc"}, FP, files)
    assert night.todo == [] and night.others == []

    assert cli.main(["migrate", str(root)]) == 0  # once is enough
    assert "is a Delta table (version 1): nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["journal", "lock"])
def test_migrate_refuses_a_root_in_use_or_with_a_commit_half_applied(tmp_path, capsys, kind):
    root = tmp_path / "features"
    old_root(root, **{kind: True})
    before = sorted(os.listdir(root))
    assert cli.main(["migrate", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert ("half applied" if kind == "journal" else "in use") in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(root)) == before and not (root / "_delta_log").exists()


def test_a_run_on_the_previous_layout_is_refused_naming_migrate(tmp_path):
    root = tmp_path / "features"
    old_root(root)
    with pytest.raises(sinks.TableError, match=f"convert it once with `python -m pipeline migrate {root}`"):
        sinks.Table(str(root)).check_writable(C.output_schema("features", 3), partitioned=True, replace=False)
