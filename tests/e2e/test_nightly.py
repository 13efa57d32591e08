"""The nightly job: new shards only, changed shards replaced, the error budget (in this
process, on the module's Ray), and exactly once when a real job process's driver or one
of its model actors is SIGKILLed."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable

import pipeline.run
from pipeline import cli
from pipeline.samples import photo_like
from tests.conftest import AWS_TEST_ENV, write_tar

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def jpeg(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    photo_like(seed, (320, 240)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shard(folder, name: str, count: int, seed: int, broken: int = 0) -> set[str]:
    """A tar of ``count`` samples keyed ``<name>/<i>``; the first ``broken`` are not images."""
    samples = []
    for i in range(count):
        data = b"<html>not an image</html>" if i < broken else jpeg(seed + i)
        samples.append((f"{name}/{i:03d}", {"jpg": data, "cls": b"1"}))
    write_tar(os.path.join(folder, f"{name}.tar"), samples)
    return {k for k, _ in samples}


class Output:
    """The output table, local or on the S3 test server, as a reader sees it: Delta's log
    read by delta-rs, the data files by pyarrow's own file system (not the pipeline's)."""

    def __init__(self, uri: str, endpoint: str | None):
        self.uri = uri
        self.endpoint = endpoint
        if endpoint:
            self.fs = pafs.S3FileSystem(
                endpoint_override=endpoint.removeprefix("http://"), scheme="http",
                access_key="testing", secret_key="testing", region="us-east-1",
            )  # fmt: skip
            self.path = uri.removeprefix("s3://")
            self.options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
        else:
            self.fs, self.path, self.options = pafs.LocalFileSystem(), uri, {}

    def delta(self, version: int | None = None) -> DeltaTable:
        return DeltaTable(self.uri, version=version, storage_options=self.options)

    def exists(self) -> bool:
        return DeltaTable.is_deltatable(self.uri, storage_options=self.options)

    def version(self) -> int | None:
        return self.delta().version() if self.exists() else None

    def read(self, columns=("id", "source"), version: int | None = None) -> pa.Table:
        """The snapshot's rows (with ``dt`` where the table has it), as the README reads them."""
        if not self.exists():
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        data = self.delta(version).to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(self.path, self.fs))
        return data.to_table(columns=list(columns))

    def ids(self, version: int | None = None) -> list[str]:
        return self.read(("id",), version)["id"].to_pylist()

    def names(self) -> list[str]:
        sel = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        return [f.path[len(self.path) :].lstrip("/") for f in self.fs.get_file_info(sel)]

    def live(self) -> list[str]:
        return self.delta().file_uris() if self.exists() else []

    def rows_of(self, name: str) -> dict[str, tuple]:
        """id → (embedding, dt, fingerprint) of the rows of input ``<name>.tar``."""
        t = self.read(("id", "source", "embedding", "dt", "fingerprint"))
        return {
            r["id"]: (r["embedding"], r["dt"], r["fingerprint"])
            for r in t.to_pylist() if r["source"].endswith(f"/{name}.tar")
        }  # fmt: skip

    def info(self, version: int | None = None) -> dict:
        """commitInfo's run facts of the latest commit this project made (or at ``version``)."""
        for h in self.delta().history():
            if "pipeline" in h and (version is None or h["version"] == version):
                return h["pipeline"]
        raise AssertionError(f"no run's commit in {self.uri}")


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path, s3_server):
    if request.param == "local":
        return Output(str(tmp_path / "features"), None)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing")
    bucket = f"nightly-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    return Output(f"s3://{bucket}/features", s3_server)


def nightly_cmd(shards: str, out: Output, date: str, *extra: str) -> list[str]:
    return [
        sys.executable, os.path.join(ROOT, "jobs/nightly_features.py"), "--input", shards,
        "--output", out.uri, "--date", date, "--model", "resnet18", "--weights", "none",
        "--batch-size", "4", *extra,
    ]  # fmt: skip


def job_env(s3_endpoint: str = "", mark: str = "") -> dict:
    """The job's environment: test credentials, the S3 server's endpoint, a mark to find its processes."""
    env = {**os.environ, **AWS_TEST_ENV, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PIPELINE_TEST_MARK": mark}
    env.pop("RAY_ADDRESS", None)
    if s3_endpoint:
        env["AWS_ENDPOINT_URL"] = s3_endpoint
    return env


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    executions: int  # Ray Data runs (pipeline.run.execute calls) the job made


@pytest.fixture
def night(ray_cluster, capfd, monkeypatch):
    """Runs the nightly job in this process, as ``python jobs/nightly_features.py`` with
    RAY_ADDRESS would: the same entry point, joined to this module's Ray, so the runs skip
    the start of a Python, torch and a Ray each (about 15 s). The tests that kill the job
    run it as a real process with its own Ray."""

    execute = pipeline.run.execute

    def run(shards, out, date, *extra, s3_endpoint="", check=True) -> Ran:
        calls = []

        def counted(*args, **kwargs):
            calls.append(args)
            return execute(*args, **kwargs)

        with monkeypatch.context() as m:
            if s3_endpoint:
                m.setenv("AWS_ENDPOINT_URL", s3_endpoint)
            m.setattr(pipeline.run, "execute", counted)
            capfd.readouterr()
            code = cli.main(
                ["nightly", *nightly_cmd(shards, out, date, *extra)[2:]], defaults={"task": "features"}
            )
            ran = Ran(code, *capfd.readouterr(), executions=len(calls))
        if check:
            assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
        return ran

    return run


def run_night(shards, out, date, *extra, check=True):
    """The nightly job as a real process, with its own Ray."""
    proc = subprocess.run(
        nightly_cmd(shards, out, date, *extra), capture_output=True, text=True,
        env=job_env(), cwd=ROOT, timeout=600,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def test_two_nights_rerun_and_changed_shard(tmp_path, out, s3_server, night):
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = make_shard(shards, "a", 3, 0) | make_shard(shards, "b", 3, 10)

    first = night(str(shards), out, "2026-11-24", s3_endpoint=s3_server)
    assert first.executions == 1
    assert sorted(out.ids()) == sorted(expected)
    info = out.info()
    assert (
        info["rows"] == 6
        and info["inputs"] == 2
        and info["model"] == "resnet18"
        and info["weights"] == "none"
    )
    assert info["partition"] == "dt=2026-11-24" and info["error_budget_held"] and info["run_id"]
    versions = {r["source"]: r["source_version"] for r in out.read(("source", "source_version")).to_pylist()}
    assert {u.rsplit("/", 1)[-1] for u in versions} == {"a.tar", "b.tar"} and all(versions.values())

    expected |= make_shard(shards, "c", 2, 20)  # a new shard lands
    night(str(shards), out, "2026-11-25", s3_endpoint=s3_server)
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert out.info()["inputs"] == 1 and out.info()["rows"] == 2 and out.version() == 2  # CREATE, night 1, 2

    proc = night(str(shards), out, "2026-11-25", s3_endpoint=s3_server)  # nothing new
    assert "nothing new" in proc.stdout and "3 inputs done" in proc.stdout
    assert proc.executions == 0 and out.version() == 2  # no Ray Data run, no commit

    # Shard a changes (4 samples now, other pixels): its old rows go, the new ones land once,
    # in one commit. It shared night one's output file with b: b is not redone, its rows are
    # written again (the same values, in its own partition), and only a runs through the model.
    b_before = out.rows_of("b")
    before = out.version()
    expected = (expected - {f"a/{i:03d}" for i in range(3)}) | make_shard(shards, "a", 4, 100)
    changed = night(str(shards), out, "2026-11-26", s3_endpoint=s3_server)
    assert "from 1 inputs" in changed.stdout, changed.stdout
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert out.rows_of("b") == b_before  # same embeddings, same dt, same fingerprint
    info = out.info()
    assert (info["rows"], info["rows_replaced"], info["rows_carried"]) == (4, 3, 3), info
    assert {r[1] for r in out.rows_of("a").values()} == {"2026-11-26"}
    # Time travel: the version before holds the old a, whole.
    then = out.read(("id", "source"), before).to_pylist()
    old = [r["id"] for r in then if r["source"].endswith("/a.tar")]
    assert sorted(old) == ["a/000", "a/001", "a/002"]


def test_a_changed_input_of_the_same_size_is_redone(tmp_path, night):
    """Its version is size plus mtime on a disk (ETag on a store): a new mtime alone redoes it."""
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shard(shards, "a", 2, 0)
    out = Output(str(tmp_path / "features"), None)
    night(str(shards), out, "2026-11-24")
    os.utime(shards / "a.tar", (time.time() + 60, time.time() + 60))
    again = night(str(shards), out, "2026-11-25")
    assert "from 1 inputs" in again.stdout and again.executions == 1
    assert sorted(out.ids()) == ["a/000", "a/001"]


def test_another_model_is_refused_then_backfilled_exactly_once(tmp_path, out, s3_server, night):
    """A nightly run with another --model on the same root once mixed the embeddings of two
    models in one dataset, in silence. Now it is refused before any work, and --backfill
    redoes every input with the new model, each exactly once."""
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = make_shard(shards, "a", 3, 0) | make_shard(shards, "b", 2, 10)
    night(str(shards), out, "2026-11-24", s3_endpoint=s3_server)
    before = sorted(out.names())

    refused = night(str(shards), out, "2026-11-25", "--model", "resnet34", s3_endpoint=s3_server, check=False)
    line = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and refused.executions == 0, refused.stderr[-2000:]
    assert line.startswith("error: ") and "holds rows of resnet18 none" in line and "--backfill" in line
    assert sorted(out.names()) == before  # nothing written, nothing deleted

    # In bounded batches: one input this night, the other the next one, each exactly once.
    args = ("--model", "resnet34", "--backfill", "--max-inputs", "1")
    first = night(str(shards), out, "2026-11-25", *args, s3_endpoint=s3_server)
    assert "from 1 inputs" in first.stdout and "1 inputs left for later nights" in first.stdout
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    prints = out.read(("source", "fingerprint")).to_pylist()
    assert sorted({(r["source"][-5:], r["fingerprint"].split()[0]) for r in prints}) == [
        ("a.tar", "resnet34"), ("b.tar", "resnet18")
    ]  # fmt: skip
    refused = night(str(shards), out, "2026-11-26", "--model", "resnet34", s3_endpoint=s3_server, check=False)
    assert refused.returncode == 2 and "holds rows of resnet18" in refused.stderr  # a backfill under way
    second = night(str(shards), out, "2026-11-26", *args, s3_endpoint=s3_server)
    assert "from 1 inputs" in second.stdout and "left for later" not in second.stdout

    table = out.read(("id", "model", "fingerprint"))
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert set(table["model"].to_pylist()) == {"resnet34"} and len(set(table["fingerprint"].to_pylist())) == 1

    again = night(str(shards), out, "2026-11-27", "--model", "resnet34", s3_endpoint=s3_server)
    assert "nothing new" in again.stdout and again.executions == 0


def test_a_night_of_another_model_over_new_inputs_only_is_refused_too(tmp_path, night):
    """The refusal covers every row of the table, not only the inputs listed tonight: per-day
    folders (a new prefix each night) with another model would mix 512-d and 2048-d rows."""
    day1, day2 = tmp_path / "2026-11-24", tmp_path / "2026-11-25"
    day1.mkdir()
    day2.mkdir()
    make_shard(day1, "a", 2, 0)
    make_shard(day2, "b", 2, 10)
    out = Output(str(tmp_path / "features"), None)
    night(str(day1), out, "2026-11-24")
    refused = night(str(day2), out, "2026-11-25", "--model", "resnet50", check=False)
    assert refused.returncode == 2 and refused.executions == 0
    assert "holds rows of resnet18 none" in refused.stderr.strip().splitlines()[-1]
    assert out.version() == 1  # created, then night one: nothing since


def test_inputs_no_longer_listed_keep_their_rows_unless_pruned(tmp_path, night):
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shard(shards, "a", 2, 0)
    make_shard(shards, "b", 2, 10)
    out = Output(str(tmp_path / "features"), None)
    night(str(shards), out, "2026-11-24")
    os.remove(shards / "b.tar")
    assert "nothing new" in night(str(shards), out, "2026-11-25").stdout
    assert sorted(out.ids()) == ["a/000", "a/001", "b/000", "b/001"]
    pruned = night(str(shards), out, "2026-11-25", "--prune-missing")
    assert "dropped the rows of 1 inputs no longer listed" in pruned.stdout and pruned.executions == 1
    assert sorted(out.ids()) == ["a/000", "a/001"]
    assert out.rows_of("a") and {v[1] for v in out.rows_of("a").values()} == {"2026-11-24"}  # a kept its dt


READER = """
import json, sys, time
import pyarrow.fs as pafs
from deltalake import DeltaTable
uri, path, endpoint = sys.argv[1:4]
if endpoint:
    fs = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
else:
    fs, options = pafs.LocalFileSystem(), {}
print("ready", flush=True)
while True:
    t = time.time()
    try:
        if DeltaTable.is_deltatable(uri, storage_options=options):
            delta = DeltaTable(uri, storage_options=options)
            data = delta.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(path, fs))
            ids = sorted(data.to_table(columns=["id"])["id"].to_pylist())
            print(json.dumps({"t": t, "version": delta.version(), "ids": ids}), flush=True)
    except Exception as e:  # a file that a snapshot names must never be missing
        print(json.dumps({"t": t, "error": repr(e)}), flush=True)
    time.sleep(0.05)
"""


class Reader:
    """A reader elsewhere: another process that reads the latest snapshot of the table again
    and again while a job runs (delta-rs for the log, pyarrow for the data)."""

    def __init__(self, out: Output):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, out.uri, out.path, out.endpoint or ""],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **AWS_TEST_ENV},
        )  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready"
        self.reads: list[dict] = []
        self.errors: list[str] = []

    def stop(self) -> None:
        self.proc.kill()
        for line in self.proc.communicate()[0].splitlines():
            r = json.loads(line)
            (self.errors.append(r["error"]) if "error" in r else self.reads.append(r))

    @property
    def seen(self) -> dict[int, list[list[str]]]:
        """version → the ids of each read of it."""
        out: dict[int, list[list[str]]] = {}
        for r in self.reads:
            out.setdefault(r["version"], []).append(r["ids"])
        return out


def kill_marked(mark: str) -> None:
    """SIGKILLs every process carrying our test mark (the job and the Ray it started)."""
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("PIPELINE_TEST_MARK") == mark:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def test_readers_see_the_table_before_the_commit_or_after_it(tmp_path, out, s3_server, night):
    """A reader polls the table while a night with a changed and a new input commits; on S3
    the store takes 3 s to write a commit, so the commit takes seconds. Every snapshot read
    holds each input's rows exactly once and is the old state or the new one."""
    shards = tmp_path / "shards"
    shards.mkdir()
    old = make_shard(shards, "a", 3, 0) | make_shard(shards, "b", 3, 10)
    night(str(shards), out, "2026-11-24", s3_endpoint=s3_server)
    new = (
        (old - {"a/000", "a/001", "a/002"}) | make_shard(shards, "a", 2, 100) | make_shard(shards, "c", 2, 20)
    )
    endpoint, proxy = s3_server, None
    if out.endpoint:
        from tests.faultproxy import FaultProxy

        proxy = FaultProxy(s3_server, every=0, delay_s=3, delay_match=r"^PUT .*/_delta_log/\d+\.json").start()
        endpoint = proxy.url
    reader = Reader(out)
    try:
        night(str(shards), out, "2026-11-25", s3_endpoint=endpoint)
        time.sleep(0.5)
        puts = [t for m, p, t in proxy.timed_requests if m == "PUT" and "_delta_log/" in p] if proxy else []
    finally:
        reader.stop()
        if proxy:
            proxy.stop()
    assert reader.errors == []
    if proxy:  # the reader read while the commit was on its way to the store
        assert any(puts[0] < r["t"] < puts[0] + 3 and r["version"] == 1 for r in reader.reads), puts
    states = {v: {tuple(ids) for ids in reads} for v, reads in reader.seen.items()}
    assert states[1] == {tuple(sorted(old))}, states  # night one's (version 0: created empty)
    assert states[max(states)] == {tuple(sorted(new))}, states
    assert set(states) <= {1, 2, 3}  # the night's commit, then upkeep's (rows unchanged)
    assert all(ids in (tuple(sorted(old)), tuple(sorted(new))) for v in states for ids in states[v])
    assert all(len(ids) == len(set(ids)) for reads in states.values() for ids in reads)
    assert len(reader.reads) > 3


def test_sigkill_of_the_driver_process_group_then_rerun(tmp_path, out, s3_server, night):
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = set()
    for i, name in enumerate("abcd"):
        expected |= make_shard(shards, name, 8, 40 * i)
    mark = uuid.uuid4().hex
    env = job_env(s3_server, mark)
    reader = Reader(out)
    # Small files and one thread: output is written file by file, over several seconds.
    cmd = nightly_cmd(str(shards), out, "2026-11-26", "--rows-per-file", "4", "--threads-per-actor", "1")
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # Kill mid-run: once the first data file is written, while the model is still at work.
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if any(n.endswith(".parquet") for n in out.names()):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the job ended before it could be killed"
    kill_marked(mark)  # the Ray processes it started, which may have left its process group
    assert not out.exists() and out.ids() == []  # its files are written, and in no snapshot
    orphans = [n for n in out.names() if n.endswith(".parquet")]
    assert orphans

    night(str(shards), out, "2026-11-26", s3_endpoint=s3_server)
    reader.stop()
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert reader.errors == [] and set(reader.seen) <= {0, 1}  # created empty, then the rerun's commit
    assert all(ids in ([], sorted(expected)) for reads in reader.seen.values() for ids in reads)
    # The killed run's files are in no snapshot; vacuum removes them (at once here: nothing runs).
    code = cli.main(["vacuum", out.uri, "--retention-hours", "0", "--s3-endpoint-url", s3_server])
    assert code == 0
    live = {u.rsplit("/", 1)[-1] for u in out.live()}
    data = {n.rsplit("/", 1)[-1] for n in out.names() if n.endswith(".parquet") and "_delta_log" not in n}
    assert data == live
    assert sorted(out.ids()) == sorted(expected)


@pytest.mark.parametrize("command", ["nightly", "run"])
def test_sigkill_of_a_model_actor_loses_and_duplicates_nothing(tmp_path, command):
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = set()
    for i, name in enumerate("abc"):
        expected |= make_shard(shards, name, 14, 70 * i)
    out = Output(str(tmp_path / "out"), None)
    mark = uuid.uuid4().hex
    # ResNet-50 on one thread, two images a batch: about 15 s of inference to interrupt.
    slow = ["--model", "resnet50", "--batch-size", "2", "--threads-per-actor", "1"]
    if command == "nightly":
        cmd = [*nightly_cmd(str(shards), out, "2026-11-26"), *slow]
    else:
        cmd = [sys.executable, "-m", "pipeline", "run", "--input", str(shards), "--output", out.uri,
               "--weights", "none", *slow]  # fmt: skip
    proc = subprocess.Popen(cmd, env=job_env("", mark), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    killed = None
    deadline = time.time() + 300
    while proc.poll() is None and killed is None and time.time() < deadline:
        for p in psutil.process_iter(["pid", "name", "cmdline"]):
            try:
                title = " ".join(p.info["cmdline"] or []) + (p.info["name"] or "")
                ours = "MapWorker" in title and p.environ().get("PIPELINE_TEST_MARK") == mark
                if ours and time.time() - p.create_time() > 10:  # past its model load, at work
                    p.kill()
                    killed = p.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.5)
    output, _ = proc.communicate(timeout=600)
    assert killed, "no model actor was found to kill"
    assert proc.returncode == 0, output[-3000:]
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))


def test_a_night_with_nothing_new_needs_no_weights_file(tmp_path, night, monkeypatch):
    """The model zoo's file is loaded once a night has work: offline, with the torch hub
    cache gone, a night with nothing new still exits 0; one with work fails in one line."""
    import torch
    from torchvision import models as tvm

    from pipeline import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = models.hub_cache_file(tvm.ResNet18_Weights.IMAGENET1K_V1)
    os.makedirs(os.path.dirname(cache))
    torch.save(models.build("resnet18").state_dict(), cache)
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = make_shard(shards, "a", 2, 0)
    out = Output(str(tmp_path / "features"), None)
    night(str(shards), out, "2026-11-24", "--weights", "IMAGENET1K_V1")

    os.remove(cache)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # the internet, not our code
    again = night(str(shards), out, "2026-11-25", "--weights", "IMAGENET1K_V1")
    assert "nothing new" in again.stdout and again.executions == 0
    before = sorted(out.names())
    make_shard(shards, "b", 2, 10)
    work = night(str(shards), out, "2026-11-25", "--weights", "IMAGENET1K_V1", check=False)
    line = work.stderr.strip().splitlines()[-1]
    assert work.returncode == 2 and work.executions == 0, work.stderr[-2000:]
    assert line.startswith("error: cannot load ResNet18_Weights.IMAGENET1K_V1") and "TORCH_HOME" in line
    assert sorted(out.names()) == before and sorted(out.ids()) == sorted(expected)


def test_error_budget(tmp_path, night):
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shard(shards, "a", 10, 0, broken=2)  # 20% broken
    out = Output(str(tmp_path / "out"), None)
    proc = night(str(shards), out, "2026-11-26", check=False)
    assert proc.returncode == 3
    assert "2 of 10 images are errors (20.0%), above --max-error-fraction 0.01" in proc.stderr
    assert len(out.ids()) == 10  # the rows are written, error rows included
    info = out.info()
    assert info["error_budget_held"] is False and info["errors"] == 2 and info["max_error_fraction"] == 0.01

    proc = night(str(shards), out, "2026-11-27", "--max-error-fraction", "0.5", check=False)
    assert proc.returncode == 0 and "nothing new" in proc.stdout  # done is done: no rerun


def test_bad_date_is_one_line(tmp_path):
    out = Output(str(tmp_path / "out"), None)
    (tmp_path / "s").mkdir()
    make_shard(tmp_path / "s", "a", 1, 0)
    proc = run_night(str(tmp_path / "s"), out, "26/11/2026", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --date must be YYYY-MM-DD, got '26/11/2026'"


KILLER = """
import os, signal, sys
import deltalake
from pipeline import cli
from pipeline.sinks import delta

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def then_die(fn):
    def wrapped(*args, **kwargs):
        fn(*args, **kwargs)
        die()
    return wrapped

step = sys.argv[1]
if step == "written":  # every data file written and checked; the commit not made
    delta.Transaction._check = then_die(delta.Transaction._check)
elif step == "committed":  # the commit is in the log; nothing after it ran
    delta.Transaction._landed = die
elif step == "compacted":  # upkeep: the compaction committed; no checkpoint yet
    deltalake.DeltaTable.create_checkpoint = die
elif step == "vacuuming":  # upkeep: the log checkpointed; the vacuum under way
    deltalake.DeltaTable.vacuum = die
cli.main(["nightly", *sys.argv[2:]], defaults={"task": "features"})
"""


@pytest.mark.parametrize("step", ["written", "committed", "compacted", "vacuuming"])
def test_a_night_killed_at_each_step_of_its_commit_then_run_again(tmp_path, step, night, ray_cluster):
    """A real job process SIGKILLed at each step of the commit lifecycle, with a changed and
    a new input. The table is the old one or the new one, never between; the night run again
    finishes the work (or finds it done); vacuum then leaves no file that no version names.
    The job joins the module's Ray (RAY_ADDRESS), as a job on a cluster does."""
    shards = tmp_path / "shards"
    shards.mkdir()
    old = make_shard(shards, "a", 3, 0) | make_shard(shards, "b", 3, 10)
    out = Output(str(tmp_path / "features"), None)
    night(str(shards), out, "2026-11-24")
    new = (
        (old - {"a/000", "a/001", "a/002"}) | make_shard(shards, "a", 2, 100) | make_shard(shards, "c", 3, 20)
    )

    mark = uuid.uuid4().hex
    # Files of two rows: the night's partition gets several small files, which upkeep compacts.
    args = [*nightly_cmd(str(shards), out, "2026-11-25")[2:], "--rows-per-file", "2"]
    env = {**job_env("", mark), "RAY_ADDRESS": ray_cluster._private.worker._global_node.address}
    proc = subprocess.run([sys.executable, "-c", KILLER, step, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    kill_marked(mark)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ids = out.ids()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(old if step == "written" else new)
    if step == "compacted":
        assert out.delta().history(1)[0]["operation"] == "OPTIMIZE"

    again = night(str(shards), out, "2026-11-25")
    assert ("from 2 inputs" if step == "written" else "nothing new") in again.stdout, again.stdout
    ids = out.ids()
    assert sorted(ids) == sorted(new) and len(ids) == len(set(ids))
    assert cli.main(["vacuum", out.uri, "--retention-hours", "0"]) == 0
    live = {u[len(out.path) + 1 :] for u in out.live()}
    assert {n for n in out.names() if n.endswith(".parquet") and not n.startswith("_delta_log/")} == live
    assert sorted(out.ids()) == sorted(new)


def test_a_current_link_repointed_at_new_files_replaces_their_rows(tmp_path, night):
    """Inputs were known by their resolved path: re-pointing ``current`` from v1/ to v2/ made
    every v2 file a new input, and each id appeared twice. An input is the path as given."""
    import shutil

    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    make_shard(v1, "a", 2, 0)
    make_shard(v1, "b", 2, 10)
    make_shard(v2, "a", 3, 50)  # a changed
    shutil.copy2(v1 / "b.tar", v2 / "b.tar")  # b the same: its size and mtime kept
    current = tmp_path / "current"
    os.symlink(v1, current)
    out = Output(str(tmp_path / "features"), None)
    night(str(current), out, "2026-11-24")
    os.remove(current)
    os.symlink(v2, current)
    again = night(str(current), out, "2026-11-25")
    assert "from 1 inputs" in again.stdout, again.stdout
    table = out.read(("id", "source"))
    assert sorted(table["id"].to_pylist()) == ["a/000", "a/001", "a/002", "b/000", "b/001"]
    assert {s.rsplit("/", 1)[0] for s in table["source"].to_pylist()} == {f"file://{current}"}


def test_ctrl_c_is_one_line_exit_130_and_commits_nothing(tmp_path):
    """A SIGINT mid-run printed a whole traceback."""
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shard(shards, "a", 12, 0)
    out = Output(str(tmp_path / "out"), None)
    mark = uuid.uuid4().hex
    slow = ["--model", "resnet50", "--weights", "none", "--batch-size", "2", "--threads-per-actor", "1"]
    cmd = [sys.executable, "-m", "pipeline", "run", "--input", str(shards), "--output", out.uri, *slow]
    proc = subprocess.Popen(
        cmd, env=job_env("", mark), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # interrupt once the model is at work
        actors = [
            p for p in psutil.process_iter(["cmdline"]) if "MapWorker" in " ".join(p.info["cmdline"] or [])
        ]
        if any(_marked(p, mark) and time.time() - p.create_time() > 8 for p in actors):
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    kill_marked(mark)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in stderr, stderr[
        -3000:
    ]
    assert not out.exists() or out.ids() == []


def _marked(p, mark: str) -> bool:
    try:
        return p.environ().get("PIPELINE_TEST_MARK") == mark
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
