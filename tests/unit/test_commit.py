"""The commit protocol on real files: a file system that fails at each step in turn, the
journal's recovery, and the output lease (exclusive, refused with its holder's name,
taken over once its holder is dead or silent)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.commit import LOCK, MOVE_WORKERS, Journal, Lease, LeaseHeld, Root, commit, recover

OLD = {"part-0-old.parquet": b"old0", "part-1-old.parquet": b"old1", "_report.json": b"{}"}
NEW = {"part-0-new.parquet": b"new0", "part-1-new.parquet": b"new1", "part-2-new.parquet": b"new2"}


class FailingFS(LocalFileSystem):
    """A real local file system whose ``fail_at``-th changing call raises, as a crash would."""

    CHANGING = ("mv", "rm", "rm_file", "pipe_file", "makedirs", "touch", "rename", "_rm", "mkdir")

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0
        self.lock = threading.Lock()  # the commit deletes and moves from a pool of threads

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name in FailingFS.CHANGING:

            def changing(*args, **kwargs):
                with self.lock:
                    self.calls += 1
                    call = self.calls
                if call == self.fail_at:
                    raise OSError(f"injected failure at call {call} ({name})")
                return attr(*args, **kwargs)

            return changing
        return attr


def layout(tmp_path):
    """An output with the old files and a finished staging of the new ones; the journal."""
    out = tmp_path / "out"
    (out / "_staging-r2").mkdir(parents=True)
    for name, data in OLD.items():
        (out / name).write_bytes(data)
    for name, data in NEW.items():
        (out / "_staging-r2" / name).write_bytes(data)
    journal = Journal(
        "r2",
        deletes=sorted(OLD),
        moves=[(f"_staging-r2/{n}", n) for n in sorted(NEW)],
        writes={"_report.json": {"rows": 3}, "_state/ledger.json": {"a": 1}},
        markers={"_SUCCESS": True},
    )
    return out, journal


def seen(out) -> dict[str, bytes]:
    """What a Parquet reader reads: the visible data files and their bytes."""
    return {p.name: p.read_bytes() for p in out.glob("*.parquet")}


def test_commit_on_a_healthy_file_system(tmp_path):
    out, journal = layout(tmp_path)
    commit(Root(str(out)), journal)
    assert seen(out) == NEW
    assert json.loads((out / "_report.json").read_text()) == {"rows": 3} and (out / "_SUCCESS").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*NEW, "_report.json", "_SUCCESS", "_state"])
    assert [p.name for p in (out / "_state").iterdir()] == ["ledger.json"]


def count_calls(tmp_path) -> int:
    out, journal = layout(tmp_path / "count")
    fs = FailingFS(fail_at=0)
    commit(Root(str(out), fs=fs), journal)
    return fs.calls


def test_a_failure_at_every_step_then_recovery_leaves_the_old_files_or_the_new(tmp_path):
    steps = count_calls(tmp_path)
    assert steps >= 10
    for k in range(1, steps + 1):
        out, journal = layout(tmp_path / f"k{k}")
        with pytest.raises(OSError, match="injected failure"):
            commit(Root(str(out), fs=FailingFS(fail_at=k)), journal)
        # At the crash: every visible file is a whole old or new file, and no image twice
        # (old files go before new ones arrive).
        now = seen(out)
        assert all(OLD.get(n) == d or NEW.get(n) == d for n, d in now.items()), (k, now)
        assert not (set(now) & set(OLD) and set(now) & set(NEW)), (k, now)
        journaled = (out / journal.rel).exists()
        committed = journaled or now == NEW  # past the commit point: the journal was written
        assert recover(Root(str(out))) == (1 if journaled else 0)
        old = {n: d for n, d in OLD.items() if n.endswith(".parquet")}
        assert seen(out) == (NEW if committed else old), k
        left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert not [n for n in left if n.startswith("_staging-") or "commit-" in n or ".tmp-" in n], (k, left)
        if committed:
            assert json.loads((out / "_state" / "ledger.json").read_text()) == {"a": 1}
        assert recover(Root(str(out))) == 0  # repaired is repaired


class CountingFS(LocalFileSystem):
    """A real local file system that records the calls the commit makes on it, in order
    (not those it makes on itself, as ``ls`` calling ``info`` for each entry), and how many
    ran at once."""

    cachable = False  # a fresh one each time, with its own counts
    COUNTED = ("exists", "info", "isdir", "isfile", "ls", "find", "mv", "rm", "rm_file", "makedirs",
               "pipe_file", "cat_file")  # fmt: skip

    def __init__(self):
        super().__init__()
        self.calls, self.lock, self.inside = [], threading.Lock(), threading.local()
        self.running = self.most = 0

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name not in CountingFS.COUNTED:
            return attr

        def counted(*args, **kwargs):
            outer = not getattr(self.inside, "depth", 0)
            if outer:
                with self.lock:
                    self.calls.append((name, args[0] if args else None))
                    self.running += 1
                    self.most = max(self.most, self.running)
            self.inside.depth = getattr(self.inside, "depth", 0) + 1
            try:
                return attr(*args, **kwargs)
            finally:
                self.inside.depth -= 1
                if outer:
                    with self.lock:
                        self.running -= 1

        return counted


def commit_files(out, n: int) -> CountingFS:
    """Commits ``n`` staged files into ``dt=2/`` in place of ``n`` old ones in ``dt=1/``."""
    (out / "_staging-r").mkdir(parents=True)
    (out / "dt=1").mkdir()
    for i in range(n):
        (out / "dt=1" / f"old-{i}.parquet").write_bytes(b"old")
        (out / "_staging-r" / f"new-{i}.parquet").write_bytes(b"new")
    journal = Journal(
        "r",
        deletes=[f"dt=1/old-{i}.parquet" for i in range(n)],
        moves=[(f"_staging-r/new-{i}.parquet", f"dt=2/new-{i}.parquet") for i in range(n)],
        writes={"_state/ledger.json": {"n": n}, "dt=2/_manifest.json": {"n": n}},
        markers={"dt=2/_SUCCESS": True},
    )
    fs = CountingFS()
    commit(Root(str(out), fs=fs), journal)
    arrived = sorted(p.name for p in (out / "dt=2").glob("*.parquet"))
    assert arrived == sorted(f"new-{i}.parquet" for i in range(n))
    assert not list((out / "dt=1").iterdir()) and not (out / "_staging-r").exists()
    return fs


def test_a_commit_lists_folders_not_files_and_moves_in_a_bounded_pool(tmp_path):
    """The commit used to ask for each file whether it existed (a HEAD each on S3) and moved
    them one at a time."""
    small, big = commit_files(tmp_path / "small", 30), commit_files(tmp_path / "big", 300)
    lookups = ("exists", "info", "isdir", "isfile", "ls", "find", "cat_file")
    count = [Counter(n for n, _ in fs.calls if n in lookups) for fs in (small, big)]
    assert count[0] == count[1] and sum(count[1].values()) <= 10, count
    names = [(n, str(path)) for n, path in big.calls]
    assert sum(n == "rm_file" and "/dt=1/old-" in p for n, p in names) == 300
    assert sum(n == "mv" and "/_staging-r/new-" in p for n, p in names) == 300
    made = [Counter(p for n, p in fs.calls if n == "makedirs") for fs in (small, big)]
    assert sum(made[0].values()) == sum(made[1].values()) <= 6, made  # per folder, not per file
    # Old files all go before a new one arrives; the ledger and manifests once all arrived.
    deletes = [i for i, (n, p) in enumerate(names) if n == "rm_file" and "/dt=1/old-" in p]
    moves = [i for i, (n, p) in enumerate(names) if n == "mv" and "/_staging-r/new-" in p]
    writes = [i for i, (n, p) in enumerate(names) if n == "pipe_file" and ("_manifest" in p or "ledger" in p)]
    assert max(deletes) < min(moves) and max(moves) < min(writes)
    assert 1 < big.most <= MOVE_WORKERS


def test_recover_drops_a_staging_that_never_reached_its_journal(tmp_path):
    out, _ = layout(tmp_path)
    assert recover(Root(str(out))) == 0
    assert seen(out) == {n: d for n, d in OLD.items() if n.endswith(".parquet")}
    assert not (out / "_staging-r2").exists()


def holder(root: Root) -> dict:
    return json.loads(root.read_bytes(LOCK))


def test_the_lease_is_exclusive_and_names_its_holder(tmp_path):
    root = Root(str(tmp_path / "out"))
    with Lease(root, "run-a"):
        assert holder(root)["run_id"] == "run-a" and holder(root)["host"] == socket.gethostname()
        with pytest.raises(LeaseHeld) as e:
            Lease(Root(str(tmp_path / "out")), "run-b").acquire()
        assert "is in use by run run-a on host" in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert not root.exists(LOCK)  # released
    with Lease(root, "run-b"):
        assert holder(root)["run_id"] == "run-b"


def test_a_silent_lease_is_taken_over_after_its_expiry_and_a_dead_holder_at_once(tmp_path):
    root = Root(str(tmp_path / "out"))
    stale = {"run_id": "old", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600,
             "expires_after_s": 120, "started": "2026-11-26T00:00:00+00:00"}  # fmt: skip
    root.fs.makedirs(root.path, exist_ok=True)
    root.fs.pipe_file(root.abs(LOCK), json.dumps(stale).encode())
    with Lease(root, "new"):
        assert holder(root)["run_id"] == "new"

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    from pipeline.commit import _pid_namespace

    fresh = {**stale, "host": socket.gethostname(), "pid_namespace": _pid_namespace(),
             "pid": int(dead.stdout), "heartbeat": time.time()}  # fmt: skip
    root.fs.pipe_file(root.abs(LOCK), json.dumps(fresh).encode())
    with Lease(root, "after-kill"):  # its heartbeat is fresh, but its process is gone
        assert holder(root)["run_id"] == "after-kill"

    alive = {**fresh, "host": "elsewhere"}
    root.fs.pipe_file(root.abs(LOCK), json.dumps(alive).encode())
    with pytest.raises(LeaseHeld, match="its lease expires 1[12][0-9] s from now"):
        Lease(root, "too-early").acquire()


def test_the_heartbeat_renews_the_lease_and_a_run_that_lost_it_cannot_commit(tmp_path):
    root = Root(str(tmp_path / "out"))
    with Lease(root, "run-a", expiry_s=0.4) as lease:  # a beat every 0.05 s
        first = holder(root)["heartbeat"]
        time.sleep(0.3)
        assert holder(root)["heartbeat"] > first
        lease.check()
        # Another run takes it over (as if this one had stalled past its expiry).
        root.fs.pipe_file(root.abs(LOCK), json.dumps({**holder(root), "run_id": "thief"}).encode())
        time.sleep(0.3)
        with pytest.raises(Exception, match="lost the lease"):
            lease.check()
    assert holder(root)["run_id"] == "thief"  # not released by the run that lost it


def test_the_recover_command_finishes_a_journaled_commit_and_respects_a_live_lease(tmp_path, capsys):
    from pipeline import cli

    out, journal = layout(tmp_path)
    Root(str(out)).write_json(journal.rel, {"run_id": "r2", "deletes": journal.deletes,
                                            "moves": journal.moves, "writes": journal.writes,
                                            "markers": journal.markers})  # fmt: skip
    with Lease(Root(str(out)), "live-run"):
        assert cli.main(["recover", str(out)]) == 2
        assert "is in use by run live-run" in capsys.readouterr().err
        assert (out / "_staging-r2").exists()  # a live run's staging is never touched
    assert cli.main(["recover", str(out)]) == 0
    assert "finished 1 interrupted commit(s)" in capsys.readouterr().out
    assert seen(out) == NEW


def test_a_lease_is_never_seen_half_written_and_one_of_many_takers_wins(tmp_path):
    """The lease file used to be created empty and then written: a second run reading it in
    between took the empty record for an expired lease, and both held it."""
    import threading

    root = Root(str(tmp_path / "out"))
    for attempt in range(20):
        won, start = [], threading.Barrier(4)

        def take(i, start=start, won=won, attempt=attempt):
            start.wait()
            try:
                Lease(Root(str(tmp_path / "out")), f"run-{attempt}-{i}").acquire()
                won.append(i)
            except LeaseHeld:
                pass

        threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, (attempt, won)
        assert holder(root)["run_id"] == f"run-{attempt}-{won[0]}"
        os.remove(root.abs(LOCK))

    # A lease left empty by a crash elsewhere counts as written when its file was.
    root.fs.pipe_file(root.abs(LOCK), b"")
    with pytest.raises(LeaseHeld):
        Lease(root, "too-early").acquire()
    os.utime(root.abs(LOCK), (time.time() - 3600, time.time() - 3600))
    with Lease(root, "later"):
        assert holder(root)["run_id"] == "later"


def test_a_run_whose_heartbeat_cannot_write_loses_its_lease(tmp_path, monkeypatch):
    """An error inside the heartbeat (a stale NFS handle, say) once killed its thread quietly:
    the lease expired, another run took it, and the first still passed check()."""
    root = Root(str(tmp_path / "out"))
    lease = Lease(root, "run-a", expiry_s=0.4)
    with lease:

        def failing(*args):
            raise OSError(116, "Stale file handle")

        monkeypatch.setattr(lease, "_swap", failing)
        time.sleep(0.5)
        assert lease.lost
        with pytest.raises(Exception, match="lost the lease"):
            lease.check()


def test_a_run_taken_over_before_its_commit_point_commits_nothing(tmp_path):
    """check() renews by compare-and-swap right before the journal: no clock is trusted. If a
    journal is written anyway after its staging was dropped, nothing old is deleted, and
    recovery drops that journal instead of stopping every later run."""
    out, journal = layout(tmp_path)
    a = Lease(Root(str(out)), "r2")
    a.acquire()
    stolen = {**holder(Root(str(out))), "run_id": "b"}
    Root(str(out)).fs.pipe_file(Root(str(out)).abs(LOCK), json.dumps(stolen).encode())
    with pytest.raises(Exception, match="lost the lease"):
        a.check()

    recover(Root(str(out)))  # the new holder drops r2's staging: r2 has no journal yet
    with pytest.raises(Exception, match="neither staged nor in place"):
        commit(Root(str(out)), journal)  # a journal written after all
    old = {n: d for n, d in OLD.items() if n.endswith(".parquet")}
    assert seen(out) == old  # nothing deleted
    assert recover(Root(str(out))) == 0 and seen(out) == old
    assert not [p for p in out.rglob("commit-*")]
