"""The nightly job: new shards only, changed shards replaced, the error budget (in this
process, on the module's Ray), and exactly once when a real job process's driver or one
of its model actors is SIGKILLed."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import psutil
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

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
    """The output root, local or on the S3 test server, as a reader sees it."""

    def __init__(self, uri: str, endpoint: str | None):
        self.uri = uri
        if endpoint:
            self.fs = pafs.S3FileSystem(
                endpoint_override=endpoint.removeprefix("http://"), scheme="http",
                access_key="testing", secret_key="testing", region="us-east-1",
            )  # fmt: skip
            self.path = uri.removeprefix("s3://")
        else:
            self.fs, self.path = pafs.LocalFileSystem(), uri

    def names(self) -> list[str]:
        sel = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        return [f.path[len(self.path) :].lstrip("/") for f in self.fs.get_file_info(sel)]

    def visible(self) -> list[str]:
        return [
            n for n in self.names()
            if n.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in n.split("/"))
        ]  # fmt: skip

    def ids(self) -> list[str]:
        files = [f"{self.path}/{n}" for n in self.visible()]
        if not files:
            return []
        return pq.read_table(files, columns=["id"], filesystem=self.fs, partitioning=None)["id"].to_pylist()

    def read_json(self, rel: str) -> dict:
        with self.fs.open_input_stream(f"{self.path}/{rel}") as f:
            return json.loads(f.read())

    def ledger(self) -> dict[str, dict]:
        """The nightly ledger, as any Parquet reader sees it: input URI → entry."""
        files = [
            f"{self.path}/{n}"
            for n in self.names()
            if n.startswith("_state/ledger/") and n.endswith(".parquet")
        ]
        rows = pq.read_table(files, filesystem=self.fs, partitioning=None).to_pylist() if files else []
        return {r.pop("uri"): r for r in rows}

    def rows_of(self, name: str) -> dict[str, tuple]:
        """id → (embedding, file) of the rows of input ``<name>.tar``."""
        out = {}
        for n in self.visible():
            t = pq.read_table(f"{self.path}/{n}", columns=["id", "source", "embedding"], filesystem=self.fs)
            for i, src, emb in zip(*(t[c].to_pylist() for c in ("id", "source", "embedding")), strict=True):
                if src.endswith(f"/{name}.tar"):
                    out[i] = (emb, n)
        return out

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{rel}").type != pafs.FileType.NotFound


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
    assert out.exists("dt=2026-11-24/_SUCCESS")
    manifest = out.read_json("dt=2026-11-24/_manifest.json")
    assert manifest["rows"] == 6 and len(manifest["inputs"]) == 2 and manifest["model"] == "resnet18"
    assert manifest["weights"] == "none" and manifest["files"] and manifest["last_run_id"]

    expected |= make_shard(shards, "c", 2, 20)  # a new shard lands
    night(str(shards), out, "2026-11-25", s3_endpoint=s3_server)
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    second = out.read_json("dt=2026-11-25/_manifest.json")
    assert [i["uri"].rsplit("/", 1)[-1] for i in second["inputs"]] == ["c.tar"] and second["rows"] == 2

    proc = night(str(shards), out, "2026-11-25", s3_endpoint=s3_server)  # nothing new
    assert "nothing new" in proc.stdout
    assert proc.executions == 0  # no Ray Data run, no model actor

    # Shard a changes (4 samples now, other pixels): its old rows go, the new ones land once.
    # It shared night one's output file with b: b is not redone, its rows are carried over
    # (the same values, in its own partition), and only a runs through the model.
    b_before = out.rows_of("b")
    expected = (expected - {f"a/{i:03d}" for i in range(3)}) | make_shard(shards, "a", 4, 100)
    changed = night(str(shards), out, "2026-11-26", s3_endpoint=s3_server)
    assert "from 1 inputs" in changed.stdout, changed.stdout
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    b_after = out.rows_of("b")
    assert {i: e for i, (e, _) in b_after.items()} == {i: e for i, (e, _) in b_before.items()}
    assert {f for _, f in b_before.values()} != {f for _, f in b_after.values()}  # carried: a new file
    assert all(f.startswith("dt=2026-11-24/") for _, f in b_after.values())
    assert out.read_json("dt=2026-11-24/_manifest.json")["rows"] == 3
    assert out.read_json("dt=2026-11-26/_manifest.json")["rows"] == 4
    book = out.ledger()
    assert {u.rsplit("/", 1)[-1]: e["partition"] for u, e in book.items()} == {
        "a.tar": "dt=2026-11-26", "b.tar": "dt=2026-11-24", "c.tar": "dt=2026-11-25"
    }  # fmt: skip
    assert all(set(e["files"]) <= set(out.visible()) for e in book.values())
    # Downstream readers: pyarrow with Hive partitions sees dt as a column.
    table = pads.dataset(out.path, filesystem=out.fs, format="parquet", partitioning="hive",
                         exclude_invalid_files=True).to_table(columns=["id", "dt"])  # fmt: skip
    assert table.num_rows == len(expected)


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
    assert sorted(e["model"].split()[0] for e in out.ledger().values()) == ["resnet18", "resnet34"]
    # b's rows, carried over in night one's partition, are still resnet18's: no model named.
    carried = out.read_json("dt=2026-11-24/_manifest.json")
    assert carried["model"] is None and [f.split()[0] for f in carried["fingerprints"]] == ["resnet18"]
    refused = night(str(shards), out, "2026-11-26", "--model", "resnet34", s3_endpoint=s3_server, check=False)
    assert refused.returncode == 2 and "holds rows of resnet18" in refused.stderr  # a backfill under way
    second = night(str(shards), out, "2026-11-26", *args, s3_endpoint=s3_server)
    assert "from 1 inputs" in second.stdout and "left for later" not in second.stdout

    files = [f"{out.path}/{n}" for n in out.visible()]
    table = pq.read_table(files, columns=["id", "model"], filesystem=out.fs)
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert set(table["model"].to_pylist()) == {"resnet34"}
    ledger = out.ledger()
    assert {e["model"].split()[0] for e in ledger.values()} == {"resnet34"}
    assert out.read_json("dt=2026-11-26/_manifest.json")["fingerprints"] == [
        next(iter(ledger.values()))["model"]
    ]

    again = night(str(shards), out, "2026-11-27", "--model", "resnet34", s3_endpoint=s3_server)
    assert "nothing new" in again.stdout and again.executions == 0


class Reader(threading.Thread):
    """Reads what a reader sees, over and over, while the job runs; records any duplicate."""

    def __init__(self, out: Output):
        super().__init__(daemon=True)
        self.out, self.stop, self.problems, self.reads = out, threading.Event(), [], 0

    def run(self):
        while not self.stop.is_set():
            try:
                ids = self.out.ids()
            except (FileNotFoundError, OSError):
                continue  # a file moved away between listing and reading: not a partial file
            self.reads += 1
            if len(ids) != len(set(ids)):
                self.problems.append(sorted(i for i in set(ids) if ids.count(i) > 1))
            time.sleep(0.1)


def kill_marked(mark: str) -> None:
    """SIGKILLs every process carrying our test mark (the job and the Ray it started)."""
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("PIPELINE_TEST_MARK") == mark:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def test_sigkill_of_the_driver_process_group_then_rerun(tmp_path, out, s3_server, night):
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = set()
    for i, name in enumerate("abcd"):
        expected |= make_shard(shards, name, 8, 40 * i)
    mark = uuid.uuid4().hex
    env = job_env(s3_server, mark)
    reader = Reader(out)
    reader.start()
    # Small files and one thread: output is staged file by file, over several seconds.
    cmd = nightly_cmd(str(shards), out, "2026-11-26", "--rows-per-file", "4", "--threads-per-actor", "1")
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # Kill mid-run: once the first output file is staged, while the model is still at work.
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if any("_staging-" in n and n.endswith(".parquet") for n in out.names()):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the job ended before it could be killed"
    kill_marked(mark)  # the Ray processes it started, which may have left its process group
    assert len(set(out.ids())) == len(out.ids())

    night(str(shards), out, "2026-11-26", s3_endpoint=s3_server)
    reader.stop.set()
    reader.join()
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert reader.reads > 0 and reader.problems == []
    assert not [n for n in out.names() if "_staging-" in n or "pending-" in n]


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


def test_a_carry_commit_that_fails_midway_is_finished_by_the_next_night(tmp_path, night, monkeypatch):
    """A changed input's shared file is carried over in the night's one journal. The store
    fails after the old file is deleted and one file has moved in: the night fails, no image
    is seen twice meanwhile, and the next night finishes the commit: every image once."""
    import pipeline.commit

    shards = tmp_path / "shards"
    shards.mkdir()
    out = Output(str(tmp_path / "features"), None)
    expected = make_shard(shards, "a", 3, 0) | make_shard(shards, "b", 3, 10)
    night(str(shards), out, "2026-11-24")
    b_rows = out.rows_of("b")
    expected = (expected - {f"a/{i:03d}" for i in range(3)}) | make_shard(shards, "a", 2, 100)

    move_in, moved = pipeline.commit.Root.move_in, []

    def failing(self, src, dst, makedirs=True):
        if moved:
            raise OSError("the store went away")
        moved.append(dst)
        return move_in(self, src, dst, makedirs)

    monkeypatch.setattr(pipeline.commit.Root, "move_in", failing)
    failed = night(str(shards), out, "2026-11-25", check=False)
    assert failed.returncode == 1 and "the store went away" in failed.stderr, failed.stderr[-2000:]
    ids = out.ids()
    assert len(ids) == len(set(ids)) and len(ids) < len(expected)  # part of the change, never twice
    monkeypatch.setattr(pipeline.commit.Root, "move_in", move_in)

    after = night(str(shards), out, "2026-11-26")
    assert "recovered the interrupted commit" in after.stderr and "nothing new" in after.stdout
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert {i: e for i, (e, _) in out.rows_of("b").items()} == {i: e for i, (e, _) in b_rows.items()}
    assert {u.rsplit("/", 1)[-1]: e["partition"] for u, e in out.ledger().items()} == {
        "a.tar": "dt=2026-11-25", "b.tar": "dt=2026-11-24"
    }  # fmt: skip


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


def test_a_lost_shared_file_is_not_carried_and_its_inputs_are_redone(tmp_path, night):
    """A and b share an output file, which is lost. a alone fits in the night (--max-inputs
    1): there is no file to carry b's rows from, so b is redone the next night. The root
    sits under key=value folders, which pyarrow must not read into the ledger's columns."""
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = make_shard(shards, "a", 3, 0) | make_shard(shards, "b", 3, 10)
    out = Output(str(tmp_path / "model=resnet18" / "partition=x" / "features"), None)
    night(str(shards), out, "2026-11-24")
    (shared,) = out.visible()
    os.remove(f"{out.path}/{shared}")

    first = night(str(shards), out, "2026-11-25", "--max-inputs", "1")
    assert "from 1 inputs" in first.stdout and "1 inputs left for later nights" in first.stdout
    second = night(str(shards), out, "2026-11-26")
    assert "from 1 inputs" in second.stdout
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    book = out.ledger()
    assert {e["model"].split()[0] for e in book.values()} == {"resnet18"}
    assert all(set(e["files"]) <= set(out.visible()) for e in book.values())
    assert "nothing new" in night(str(shards), out, "2026-11-27").stdout


def test_error_budget(tmp_path, night):
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shard(shards, "a", 10, 0, broken=2)  # 20% broken
    out = Output(str(tmp_path / "out"), None)
    proc = night(str(shards), out, "2026-11-26", check=False)
    assert proc.returncode == 3
    assert "2 of 10 images are errors (20.0%), above --max-error-fraction 0.01" in proc.stderr
    assert len(out.ids()) == 10  # the rows are written, error rows included
    assert not out.exists("dt=2026-11-26/_SUCCESS")

    proc = night(str(shards), out, "2026-11-27", "--max-error-fraction", "0.5", check=False)
    assert proc.returncode == 0 and "nothing new" in proc.stdout  # done is done: no rerun


def test_bad_date_is_one_line(tmp_path):
    out = Output(str(tmp_path / "out"), None)
    (tmp_path / "s").mkdir()
    make_shard(tmp_path / "s", "a", 1, 0)
    proc = run_night(str(tmp_path / "s"), out, "26/11/2026", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --date must be YYYY-MM-DD, got '26/11/2026'"
