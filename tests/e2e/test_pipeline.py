"""End to end on a local Ray (2 CPUs): every input format and task, checked against torchvision."""

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipeline import columns as C
from pipeline import sinks
from pipeline.cli import config_from_args, get_args_parser, parse_args
from pipeline.run import run
from tests.conftest import ALL, BROKEN, FIDELITY_IDS, reference
from tests.tables import columns

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_pipeline(*argv):
    config = config_from_args(parse_args(get_args_parser(), ["run", *argv]))
    return run(config)


def read_output(folder):
    """The table's rows, from the files its latest version names (their footers too)."""
    files = sorted(os.path.join(folder, f.path) for f in sinks.Table(folder).files())
    assert files, f"no data files in the table at {folder}"
    return pq.read_table(files), files


# format → (input, extra flags, input id → output id)
FORMATS = {
    "images": ("{images_dir}", [], lambda k: k),
    "webdataset": ("{wds_dir}/shard-{{000000..000001}}.tar", [], lambda k: k.rsplit(".", 1)[0]),
    "parquet": ("{parquet_dir}", [], lambda k: k),
    "hf-parquet": (
        "{hf_parquet_dir}",
        ["--image-column", "img"],
        lambda k: f"train.parquet#{list(ALL).index(k)}",
    ),
}


@pytest.fixture(scope="module")
def expected(resnet18_checkpoint):
    return reference("resnet18", resnet18_checkpoint, {k: ALL[k] for k in FIDELITY_IDS})


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_gives_every_row_once_and_torchvision_numbers(
    fmt, request, tmp_path, ray_cluster, resnet18_checkpoint, expected
):
    pattern, extra, to_id = FORMATS[fmt]
    fixtures = {
        n: request.getfixturevalue(n) for n in ("images_dir", "wds_dir", "parquet_dir", "hf_parquet_dir")
    }
    out = str(tmp_path / "out")
    summary = run_pipeline(
        "--input",
        pattern.format(**fixtures),
        "--output",
        out,
        "--model",
        "resnet18",
        "--weights",
        resnet18_checkpoint,
        "--batch-size",
        "8",
        *extra,
    )
    table, _ = read_output(out)

    assert columns(table.schema) == columns(C.output_schema("both", 512))
    meta = table.schema.metadata
    assert meta[b"pipeline.model"] == b"resnet18"
    assert meta[b"pipeline.weights"].startswith(b"sha256:")
    assert (
        b"torchvision" in meta[b"pipeline.versions"]
        and b'"crop_size": [224]' in meta[b"pipeline.preprocessing"]
    )

    ids = table[C.ID].to_pylist()
    assert sorted(ids) == sorted(to_id(k) for k in ALL)  # every input exactly once
    assert (summary.rows, summary.ok, summary.errors) == (
        len(ALL),
        len(ALL) - len(BROKEN),
        len(BROKEN),
    )
    rows = {r[C.ID]: r for r in table.to_pylist()}
    for key in BROKEN:
        row = rows[to_id(key)]
        assert row[C.STATUS] == "error" and row[C.ERROR] and row[C.EMBEDDING] is None
    for key in set(ALL) - set(BROKEN):
        assert rows[to_id(key)][C.STATUS] == "ok", rows[to_id(key)][C.ERROR]

    for key, (feats, probs) in expected.items():
        row = rows[to_id(key)]
        np.testing.assert_allclose(row[C.EMBEDDING], feats, rtol=1e-4, atol=1e-4 * np.abs(feats).max())
        top = np.argsort(-probs)[:5]
        assert row[C.TOPK_INDEX] == top.tolist() and row[C.CLASS_INDEX] == top[0]
        np.testing.assert_allclose(row[C.TOPK_SCORE], probs[top], rtol=1e-4, atol=1e-6)


def test_decode_gpu_on_cpu_actors_gives_the_same_rows(
    tmp_path, ray_cluster, wds_dir, resnet18_checkpoint, expected
):
    """``--decode gpu`` without a GPU: no decode stage, the actor decodes on its CPU."""
    out = str(tmp_path / "out")
    summary = run_pipeline(
        "--input", f"{wds_dir}/shard-{{000000..000001}}.tar", "--output", out,
        "--model", "resnet18", "--weights", resnet18_checkpoint, "--batch-size", "8", "--decode", "gpu",
    )  # fmt: skip
    assert summary.stages and not any("decode" in stage for stage in summary.stages), summary.stages
    table, _ = read_output(out)
    assert b'"decode": "gpu"' in table.schema.metadata[b"pipeline.preprocessing"]
    assert DeltaTable(out).history(1)[0]["pipeline"]["decode"] == "gpu"
    to_id = FORMATS["webdataset"][2]
    rows = {r[C.ID]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(to_id(k) for k in ALL)
    assert {k for k in ALL if rows[to_id(k)][C.STATUS] == "error"} == set(BROKEN)
    for key, (feats, _) in expected.items():
        emb = np.array(rows[to_id(key)][C.EMBEDDING])
        assert emb @ feats / np.linalg.norm(emb) / np.linalg.norm(feats) > 0.9999, key


def test_classify_task_and_file_sizing(tmp_path, ray_cluster, images_dir, resnet18_checkpoint):
    out = str(tmp_path / "out")
    run_pipeline(
        "--input",
        images_dir,
        "--output",
        out,
        "--task",
        "classify",
        "--model",
        "resnet18",
        "--weights",
        resnet18_checkpoint,
        "--rows-per-file",
        "5",
        "--top-k",
        "3",
    )
    table, files = read_output(out)
    assert columns(table.schema) == columns(C.output_schema("classify", 512))
    assert table.num_rows == len(ALL)
    sizes = sorted(pq.ParquetFile(f).metadata.num_rows for f in files)
    # --rows-per-file is honoured: every file holds 5 rows but one, the remainder (a full
    # file once came with a fragment of its own).
    assert sizes[1:] == [5] * (len(sizes) - 1) and sum(sizes) == len(ALL), sizes
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert {len(v) for v in table[C.TOPK_INDEX].to_pylist() if v is not None} == {3}


def test_resnet50_features_are_2048_and_overwrite_replaces(tmp_path, ray_cluster, images_dir):
    out = str(tmp_path / "out")
    for _ in range(2):  # the second run replaces the first, in one commit
        run_pipeline(
            "--input",
            f"{images_dir}/good",
            "--output",
            out,
            "--task",
            "features",
            "--normalize",
            "--model",
            "resnet50",
            "--weights",
            "none",
            "--overwrite",
        )
    table, _ = read_output(out)
    assert columns(table.schema) == columns(C.output_schema("features", 2048))
    assert table.num_rows == len([k for k in ALL if k.startswith("good/")])
    emb = np.array(table[C.EMBEDDING].to_pylist())
    assert emb.shape == (table.num_rows, 2048)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert set(table[C.WEIGHTS].to_pylist()) == {"none"}
    first, second = (DeltaTable(out, version=v).to_pyarrow_table().num_rows for v in (1, 2))
    assert first == second == table.num_rows  # version 1 still holds the first run's rows
    assert DeltaTable(out).history(1)[0]["pipeline"]["rows_replaced"] == first

    # Every reader gets the 2048 floats of each row, the values the run wrote.
    import duckdb
    import polars as pl
    import pyarrow.fs as pafs

    wrote = {r[C.ID]: r[C.EMBEDDING] for r in table.to_pylist()}
    dataset = DeltaTable(out).to_pyarrow_dataset(
        filesystem=pafs.SubTreeFileSystem(out, pafs.LocalFileSystem())
    )
    readers = {
        "pyarrow": dataset.to_table().to_pylist(),
        "polars": pl.read_delta(out).to_dicts(),
        "pandas": DeltaTable(out)
        .to_pandas(filesystem=pafs.SubTreeFileSystem(out, pafs.LocalFileSystem()))
        .to_dict("records"),
        "duckdb": duckdb.sql("SELECT id, embedding FROM dataset").arrow().read_all().to_pylist(),
    }
    for name, rows in readers.items():
        got = {r[C.ID]: list(r[C.EMBEDDING]) for r in rows}
        assert got == wrote and {len(e) for e in got.values()} == {2048}, name


def test_job_script_joins_the_cluster_in_ray_address(tmp_path, ray_cluster, images_dir, resnet18_checkpoint):
    """jobs/extract_features.py as a separate driver, joining the running cluster."""
    out = str(tmp_path / "out")
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "jobs/extract_features.py"),
            "--input",
            f"{images_dir}/bad",
            "--output",
            "out",  # relative to the driver's folder, wherever the workers run
            "--model",
            "resnet18",
            "--weights",
            resnet18_checkpoint,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"joined the Ray cluster at {address} (RAY_ADDRESS): 1 nodes, 2 CPUs, 0 GPUs" in proc.stderr
    assert f"rows      {len(BROKEN)} (0 ok, {len(BROKEN)} error)" in proc.stdout
    table, _ = read_output(out)
    assert columns(table.schema) == columns(C.output_schema("features", 512))
    assert sorted(table[C.ID].to_pylist()) == sorted(k.removeprefix("bad/") for k in BROKEN)


def test_gpu_actor_pool_runs_two_calls_at_once_and_keeps_every_row(ray_cluster, resnet18_checkpoint):
    """A GPU actor's pool (two calls at once, in threads) through Ray Data, on the CPU here:
    every row comes back once, with the numbers of a plain call."""
    import ray

    from pipeline import models
    from pipeline.config import ComputeConfig
    from pipeline.predict import Predictor, PredictorSpec
    from pipeline.run import GPU_CALLS_PER_ACTOR, actor_pool

    pool = actor_pool(ComputeConfig(num_gpus_per_actor=1))
    assert pool.max_concurrent_calls_per_actor == GPU_CALLS_PER_ACTOR == 2
    assert pool.enable_true_multi_threading
    assert actor_pool(ComputeConfig()).max_concurrent_calls_per_actor == 1

    keys = sorted(ALL) * 3
    items = [{C.ID: f"{i}/{k}", C.SOURCE: k, C.BYTES: ALL[k], C.ERROR: None} for i, k in enumerate(keys)]
    w = models.resolve("resnet18", resnet18_checkpoint)
    spec = PredictorSpec.from_weights(w, task="features", decode="gpu", device="cpu", threads=1)
    ds = ray.data.from_items(items, override_num_blocks=6).map_batches(
        Predictor, fn_constructor_kwargs={"spec": spec}, compute=pool, batch_size=4, num_cpus=0.5
    )
    rows = {r[C.ID]: r for r in ds.take_all()}
    assert sorted(rows) == sorted(item[C.ID] for item in items)
    plain = Predictor(spec)
    for k in sorted(ALL):
        want = plain({C.ID: np.array([k], object), C.SOURCE: np.array([k], object),
                      C.BYTES: np.array([ALL[k]], object), C.ERROR: np.array([None], object)})  # fmt: skip
        for i in (i for i, key in enumerate(keys) if key == k):
            got = rows[f"{i}/{k}"]
            assert got[C.STATUS] == want[C.STATUS][0].as_py() and got[C.ERROR] == want[C.ERROR][0].as_py()
            if got[C.STATUS] == "ok":
                np.testing.assert_allclose(
                    got[C.EMBEDDING], want[C.EMBEDDING][0].as_py(), rtol=1e-4, atol=1e-4
                )


def test_credentials_in_uris_are_never_printed_or_stored(
    tmp_path, capsys, ray_cluster, images_dir, resnet18_checkpoint, http_dir
):
    """A presigned checkpoint URL put its key id, signature and token into the run report and
    the summary; a user:password@ URL its password. Nor may the commit or the footers hold them."""
    import json
    import shutil

    from pipeline import cli

    folder, host = http_dir
    shutil.copy(resnet18_checkpoint, folder / "r18.pth")
    secrets = ("AKIAEXAMPLE", "s1gnature", "t0ken", "hunter2")
    presigned = (
        f"http://{host}/r18.pth?X-Amz-Credential=AKIAEXAMPLE%2F20261127&X-Amz-Signature=s1gnature"
        "&X-Amz-Security-Token=t0ken"
    )
    out = tmp_path / "out"
    argv = ["run", "--input", f"{images_dir}/good", "--output", str(out), "--model", "resnet18",
            "--weights", presigned, "--task", "features"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "r18.pth?<redacted>" in printed.err
    stored = "".join(p.read_text() for p in sorted((out / "_delta_log").glob("*.json")))
    assert "r18.pth?<redacted>" in DeltaTable(str(out)).history(1)[0]["pipeline"]["weights_source"]
    footer = pq.read_schema(read_output(str(out))[1][0]).metadata
    text = (
        printed.out + printed.err + stored + json.dumps({k.decode(): v.decode() for k, v in footer.items()})
    )
    assert not [s for s in secrets if s in text]

    missing = f"http://bob:hunter2@{host}/nothing.pth?X-Amz-Signature=s1gnature"
    argv = ["run", "--input", f"{images_dir}/good", "--output", str(tmp_path / "o2"), "--model", "resnet18",
            "--weights", missing]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"http://<redacted>@{host}/nothing.pth?<redacted>" in err
    assert not [s for s in secrets if s in err]


def test_without_ray_address_a_run_never_joins_or_waits_on_a_cluster_left_on_the_machine(
    tmp_path, images_dir, resnet18_checkpoint
):
    """A plain ray.init() joins the cluster whose address `ray start` left in Ray's temp
    folder, and waits on it when that head is dead. Here the address is a dead one."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live here
    try:
        os.makedirs(os.path.join(ray_tmp, "ray"))
        with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:9\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = ray_tmp
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--input", f"{images_dir}/bad", "--output", "out",
             "--model", "resnet18", "--weights", resnet18_checkpoint, "--task", "features"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "joined the Ray cluster" not in proc.stderr and "127.0.0.1:9" not in proc.stderr
    table, _ = read_output(str(tmp_path / "out"))
    assert table.num_rows == len(BROKEN)


@pytest.mark.parametrize("where", ["main thread", "worker thread", "SIGINT ignored"])
def test_the_stall_watchdog_stops_the_run_in_its_own_thread(ray_cluster, where):
    """The watchdog once interrupted the main thread whatever thread the run was on, and
    nothing at all where SIGINT was ignored: the run then hung, which it exists to prevent."""
    import signal
    import threading

    from pipeline import efficiency
    from pipeline.run import RunError, _watched

    stats = efficiency.start_stats()
    stop = threading.Event()

    def stalled(stand_down):  # an execution that makes no progress (no batch is ever told)
        while not stop.wait(0.05):
            pass

    def watched() -> str:
        try:
            _watched(stalled, stats, stall_timeout=1.0)
            return "returned"
        except RunError as e:
            return str(e)

    results: list[str] = []
    if where == "worker thread":
        thread = threading.Thread(target=lambda: results.append(watched()))
        thread.start()
        thread.join(timeout=60)
        stop.set()
        assert not thread.is_alive()
    else:
        old = signal.getsignal(signal.SIGINT)
        if where == "SIGINT ignored":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            results.append(watched())
        finally:
            signal.signal(signal.SIGINT, old)
    assert results and results[0].startswith("no progress for 1 s (--stall-timeout) after 0 rows"), results


def test_the_stall_watchdog_stands_down_before_a_commit_and_never_interrupts_it(ray_cluster):
    """Once the run calls ``stand_down`` (right before its commit) no stall is declared, however
    long the commit takes; a stall declared just before it stops the run there instead."""
    import time

    from pipeline import efficiency
    from pipeline.run import RunError, _watched

    stats = efficiency.start_stats()

    def slow_commit(stand_down):
        stand_down()
        time.sleep(3.0)  # a commit on a slow store: three stall timeouts long
        return "committed"

    assert _watched(slow_commit, stats, stall_timeout=1.0) == "committed"

    committed = []

    def late(stand_down):
        time.sleep(2.5)  # the stall is declared (after 1 s without progress, checked every 0.25 s)
        stand_down()
        committed.append(True)

    with pytest.raises(RunError, match="no progress for 1 s"):
        _watched(late, stats, stall_timeout=1.0)
    assert committed == []
