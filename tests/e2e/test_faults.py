"""Faults for real: two jobs on one output at once, and a Ray node lost mid-run.

Each job is a real process with its own Ray (or the two-node cluster below); nothing is
simulated but the timing."""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from tests.conftest import AWS_TEST_ENV
from tests.e2e.test_cluster import free_port
from tests.e2e.test_nightly import Output, job_env, make_shard, nightly_cmd

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("where", ["s3"])
def test_two_nightly_jobs_on_one_table_at_once(tmp_path, where, s3_server):
    """Two real jobs, their own Ray each, on the same inputs and table. Both plan from the
    empty table and run; the first commit creates it, and the other one's commit finds that
    another run committed first: it commits nothing and fails in one line (exit 2). (Had it
    planned after that commit, it would find nothing new.) Its inputs are never there twice.
    On S3, whose conditional PUT makes the commit; the races below run on both stores."""
    shards = tmp_path / "a"
    shards.mkdir()
    expected = make_shard(shards, "a", 6, 0)
    if where == "s3":
        import s3fs

        s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing").mkdir("race")
        out = Output("s3://race/features", s3_server)
    else:
        out = Output(str(tmp_path / "out"), None)
    env = job_env(s3_server if where == "s3" else "")
    procs = [
        subprocess.Popen(nightly_cmd(str(shards), out, "2026-11-26"), env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), [(c, e[-1500:]) for c, _, e in results]
    if codes == [0, 2]:
        err = next(e for c, _, e in results if c == 2).strip().splitlines()
        assert err[-1].startswith(f"error: output {out.uri} changed while this run worked"), err[-1]
        assert "nothing was committed" in err[-1]
    else:  # the second planned after the first committed
        assert any("nothing new" in o for _, o, _ in results)
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    # The table was created empty, then one run's data commit: the other committed nothing.
    assert [h.get("operation") for h in out.delta().history() if "pipeline" in h] == ["WRITE"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_racing_commits_never_put_an_input_twice(tmp_path, where, s3_server):
    """24 races of two real processes on one table, each planning from the same snapshot
    and committing at the same moment: new inputs (both would append them) and changed ones
    (both would replace their rows, in files shared with other inputs). Every race, at most
    one commits; in the end every input is in the table once, at its last version."""
    import multiprocessing as mp

    from tests.e2e.test_nightly import Output

    so = None
    if where == "s3":
        import s3fs

        s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing").mkdir("races")
        out, uri = Output("s3://races/t", s3_server), "s3://races/t"
        from pipeline.storage import storage_options

        so = storage_options(s3_server)
    else:
        uri = str(tmp_path / "t")
        out = Output(uri, None)
    from tests import racer

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    pipes = [ctx.Pipe() for _ in range(2)]
    workers = [ctx.Process(target=racer.main, args=(child, barrier, w), daemon=True)
               for w, (_, child) in enumerate(pipes)]  # fmt: skip
    for w in workers:
        w.start()
    versions: dict[str, str] = {}
    outcomes = []
    try:
        for i in range(24):
            if i % 3 == 2:  # change an input done before: both replace its rows
                key = f"s3://in/{i - 1:03d}.tar"
                versions[key] = f"{i}:changed"
            else:
                versions[f"s3://in/{i:03d}.tar"] = "1:a"
            for parent, _ in pipes:
                parent.send((uri, so, dict(versions)))
            assert all(parent.poll(120) for parent, _ in pipes), f"race {i}: a racer did not answer"
            got = sorted(parent.recv() for parent, _ in pipes)
            outcomes.append(got)
            assert got in (["committed", "refused"], ["committed", "nothing"], ["committed", "committed"]), (
                i,
                got,
            )
    finally:
        for parent, _ in pipes:
            parent.send(None)
        for w in workers:
            w.join(timeout=30)
    table = out.read(("id", "source"))
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 3 * len(versions)
    got_versions = {
        r["source"]: r["source_version"] for r in out.read(("source", "source_version")).to_pylist()
    }
    assert got_versions == versions
    # Both committing is right only when they did not race at all: never here, by the barrier.
    assert all(o != ["committed", "committed"] for o in outcomes)
    assert sum(o == ["committed", "refused"] for o in outcomes) >= 20, outcomes


def _processes_of(temp_dir: str) -> list[psutil.Process]:
    """A Ray node's processes: those naming its temp dir, and every descendant of its raylet
    (workers rename themselves "ray::..." and no longer show it)."""
    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in arg for arg in p.info["cmdline"] or []):
                found[p.pid] = p
                for child in p.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=15)


def _own_ports() -> list[str]:
    """Free ports for a node's side services, which otherwise take fixed defaults (the
    dashboard agent's 52365, say) that another Ray on the machine may hold."""
    return [
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
    ]  # fmt: skip


@pytest.fixture
def two_nodes(tmp_path):
    """A real two-node Ray cluster on this machine: `ray start --head` and `ray start
    --address`, 2 CPUs each, each with its own temp dir; every process ended by id."""
    home = tmp_path / "home"  # Ray 2.60 writes its auth token under ~/.ray
    home.mkdir()
    dirs = [tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("rh", "rw")]  # short: unix sockets
    env = {**os.environ, **AWS_TEST_ENV, "HOME": str(home), "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_AUTH_MODE": "token"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    port = free_port()
    common = ["--num-cpus", "2", "--disable-usage-stats"]
    try:
        # As on a real cluster: a token exists, so `ray start` turns token authentication on,
        # and every process that joins says so (RAY_AUTH_MODE=token).
        subprocess.run([*ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
        head = ["--head", "--port", str(port), "--include-dashboard", "false"]
        for args in (
            [*head, "--temp-dir", dirs[0]],
            ["--address", f"127.0.0.1:{port}", "--temp-dir", dirs[1]],
        ):
            started = subprocess.run([*ray, "start", *args, *common, *_own_ports()],
                                     env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"127.0.0.1:{port}", dirs[1], {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        for d in dirs:
            _kill(_processes_of(d))
            shutil.rmtree(d, ignore_errors=True)


def test_losing_a_node_mid_run_ends_the_run_in_bounded_time_and_a_rerun_completes(tmp_path, two_nodes):
    """The worker node's every process is SIGKILLed while a model actor works there. The
    re-created actor used to take the last CPUs of the head, and the run waited forever.
    Now it waits for a node of its own (one CPU actor per node), and the run usually
    finishes on the head; if it cannot, the stall watchdog ends it."""
    address, worker_dir, env = two_nodes
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = set()
    for i, name in enumerate("abcd"):
        expected |= make_shard(shards, name, 8, 30 * i)
    out = Output(str(tmp_path / "out"), None)
    slow = ["--model", "resnet50", "--batch-size", "2", "--threads-per-actor", "1", "--actors", "2"]
    cmd = [*nightly_cmd(str(shards), out, "2026-11-26"), *slow, "--stall-timeout", "45"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Kill once a model actor has worked on the worker node for a few seconds.
    deadline, killed = time.time() + 300, False
    while proc.poll() is None and time.time() < deadline and not killed:
        for p in _processes_of(worker_dir):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if "MapWorker" in " ".join(p.cmdline()) and time.time() - p.create_time() > 15:
                    _kill(_processes_of(worker_dir))
                    killed = True
                    break
        time.sleep(0.5)
    assert killed, "no model actor ran on the worker node"
    t_kill = time.time()
    stdout, stderr = proc.communicate(timeout=300)  # ends: it never hangs
    assert proc.returncode in (0, 1), stderr[-3000:]
    if proc.returncode == 1:  # failed within its stall timeout, saying what it waited for
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: run failed: no progress for 45 s (--stall-timeout)"), last
        assert "1 of 2 nodes alive" in last and "nothing was committed" in last
        assert time.time() - t_kill < 45 + 120
    assert len(out.ids()) == len(set(out.ids()))  # never a row twice, whatever happened

    # The nightly job again, on what is left of the cluster, with the same model (another
    # would be refused: its rows must not mix with these): every input exactly once.
    same = ["--model", "resnet50", "--batch-size", "8"]
    again = subprocess.run([*nightly_cmd(str(shards), out, "2026-11-26"), *same], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    ids = out.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))


def test_a_run_without_progress_fails_in_one_line_and_commits_nothing(tmp_path):
    """The stall watchdog on its own: ResNet-152 takes seconds to load and to run its first
    batch, far past a 2-second --stall-timeout once the images are read and decoded."""
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shard(shards, "a", 8, 0)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "run", "--input", str(shards), "--output", str(out),
           "--model", "resnet152", "--weights", "none", "--stall-timeout", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: run failed: no progress for 2 s \(--stall-timeout\) after \d+ rows", last), last
    assert "1 of 1 nodes alive" in last and last.endswith("nothing was committed")
    # The stopped execution never starts a Ray of its own after ours is shut down (it did, from
    # a thread left running, and could then crash at exit with a backtrace after this line).
    assert proc.stderr.count("Started a local Ray instance") <= 1, proc.stderr[-2000:]
    assert not list(out.glob("*.parquet")) and not (out / "_lock.json").exists()
