"""The sink's commit protocol, one for ``run`` and ``nightly``: a lease, a journal, recovery.

Under an output root (Parquet readers skip every name starting with ``_`` or ``.``):

    _lock.json                  the lease: which run holds the root, where, its heartbeat
    _staging-<run>/             files Ray is writing (or wrote)
    _state/commit-<run>.json    the journal of a commit in progress

A run (1) takes the lease, or refuses with one line naming its holder; (2) recovers what
an earlier run left; (3) has Ray write everything under ``_staging-<run>/``; (4) writes the
journal in one atomic write, which is the commit point: every file it deletes, every
staged file it moves and where (data files; the nightly ledger's files), every small JSON
file (manifests, report) and marker it writes; (5) applies the journal; (6) drops the
journal and the staging; (7) lets the lease go. Each step of (5) is idempotent: deleting
what is gone, moving what has arrived and writing the same bytes again change nothing.
So a run killed anywhere is repaired by the next one, or by ``python -m pipeline recover
OUTPUT``: before the journal exists its staging is dropped and readers keep the old files;
once it exists the journal is applied again and readers get the new ones. Never neither,
never both, once repaired.

While (5) runs, a reader listing the root at that very moment can see part of the change
(old files deleted before the new ones arrive, so never an image twice): plain files on
a file system or a bucket have no atomic multi-file switch.

The lease is created exclusively (``O_EXCL`` on disks; a conditional PUT with
``If-None-Match: *`` on S3) and renewed by a heartbeat. A lease whose heartbeat is older
than ``LEASE_EXPIRY_S`` belongs to a dead run and is taken over by compare-and-swap
(``flock`` on disks, ``If-Match`` on S3), so two runs never hold it at once, and recovery,
which runs only under the lease, never touches the staging of a live run.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError
from pipeline.storage import redact, url_to_fs

LOCK = "_lock.json"
STATE = "_state"
JOURNAL_PREFIX = f"{STATE}/commit-"
STAGING_PREFIX = "_staging-"
LEASE_EXPIRY_S = float(os.environ.get("PIPELINE_LEASE_EXPIRY_S", 120))
# How many deletes, or moves, a commit runs at once. On an object store each is a request or
# two (a move is a whole-object copy, then a delete), tens of milliseconds spent waiting, so
# one at a time a commit of thousands of files waits that long thousands of times over.
# s3fs serves every thread from its one event loop over a pool of 10 connections (botocore's
# default), so many more threads would only queue; 16 keeps that pool busy, stays far below
# S3's request rates per prefix, and costs little on a disk, where a move is a rename.
MOVE_WORKERS = 16


class LeaseHeld(ConfigError):
    """Another live run holds the output root: one line, exit 2."""


class CommitError(RuntimeError):
    """A journal cannot be applied: a file it moves is neither staged nor in place."""


_TMP = re.compile(r"\.tmp-[0-9a-f]{8}$")  # write_json's temporary files


def staging_rel(run_id: str) -> str:
    return f"{STAGING_PREFIX}{run_id}"


def is_commit_file(rel: str) -> bool:
    """The lease, the commit's state and staging: never data, never replaced by a run."""
    return rel.startswith((LOCK, f"{STATE}/", STAGING_PREFIX))


class Root:
    """An output root on its file system; every path given to it is relative to it."""

    def __init__(self, uri: str, storage_options: dict | None = None, fs=None):
        self.uri = uri.rstrip("/")
        fs_found, path = url_to_fs(self.uri, storage_options)
        self.fs = fs if fs is not None else fs_found
        self.path = path.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.s3 = "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def abs(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    def rel(self, path: str) -> str:
        return path[len(self.path) :].lstrip("/")

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.abs(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.abs(rel))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str, default):
        data = self.read_bytes(rel)
        return default if data is None else json.loads(data)

    def write_json(self, rel: str, value) -> None:
        """Atomic: a whole-object PUT on object stores, write, fsync, then rename on disks."""
        data = json.dumps(value, indent=1, sort_keys=True).encode()
        if self.local:
            tmp = self.abs(f"{rel}.tmp-{uuid.uuid4().hex[:8]}")
            self.fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            self.fs.mv(tmp, self.abs(rel))
        else:
            self.fs.pipe_file(self.abs(rel), data)

    def modified(self, rel: str) -> float | None:
        """When ``rel`` was last written (seconds since the epoch), or None."""
        try:
            info = self.fs.info(self.abs(rel))
        except FileNotFoundError:
            return None
        when = info.get("mtime") or info.get("LastModified") or info.get("updated")
        if hasattr(when, "timestamp"):
            return when.timestamp()
        return float(when) if when else None

    def move_in(self, src: str, dst: str, makedirs: bool = True) -> None:
        """A rename on disks, a whole-object copy then delete on object stores. ``makedirs``
        False: the caller made ``dst``'s folder already."""
        if makedirs:
            self.fs.makedirs(posixpath.dirname(self.abs(dst)), exist_ok=True)
        if self.local:
            self.fs.mv(self.abs(src), self.abs(dst))
        else:  # what fs.mv does for one file, without first asking whether each path is a folder
            self.fs.cp_file(self.abs(src), self.abs(dst))
            self.fs.rm_file(self.abs(src))

    def touch(self, rel: str) -> None:
        self.fs.makedirs(posixpath.dirname(self.abs(rel)), exist_ok=True)
        self.fs.pipe_file(self.abs(rel), b"")

    def remove(self, rel: str) -> None:
        """Removes a file or a folder; nothing if it is gone."""
        path = self.abs(rel)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            elif self.fs.exists(path):
                self.fs.rm_file(path)

    def listed(self, rels) -> dict[str, str]:
        """What is now in the folders holding ``rels``: relative path → "file" or "directory".

        One listing per distinct folder (one LIST per 1,000 names on S3), not a request per
        file: what a commit checks costs what the commit is, not what the root holds.
        """
        found: dict[str, str] = {}
        for folder in sorted({posixpath.dirname(r) for r in rels}):
            path = self.abs(folder) if folder else self.path
            self.fs.invalidate_cache(path)  # s3fs caches listings
            try:
                entries = self.fs.ls(path, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                found[self.rel(e["name"].rstrip("/"))] = e.get("type", "file")
        return found

    def listing(self) -> list[str]:
        """Every file under the root, relative."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.path):
            return []
        return [self.rel(p) for p in self.fs.find(self.path)]

    def data_files(self, is_data) -> list[str]:
        """What a table reader of the root would read (relative paths): ``is_data`` is the
        sink's (``Sink.is_data``); the commit knows no file format."""
        return sorted(n for n in self.listing() if is_data(n))


# ----------------------------------------------------------------------------- the journal


@dataclass
class Journal:
    """What one commit changes; applying it twice changes nothing more."""

    run_id: str
    deletes: list[str] = field(default_factory=list)  # files the commit replaces
    moves: list[tuple[str, str]] = field(default_factory=list)  # (staged, final)
    writes: dict[str, object] = field(default_factory=dict)  # small JSON files, written whole
    markers: dict[str, bool] = field(default_factory=dict)  # empty marker files: present or not

    @property
    def rel(self) -> str:
        return f"{JOURNAL_PREFIX}{self.run_id}.json"


def commit(root: Root, journal: Journal) -> None:
    """Writes the journal (the commit point), applies it, then drops it and the staging."""
    root.write_json(journal.rel, asdict(journal))
    _apply(root, journal)
    root.remove(journal.rel)
    root.remove(staging_rel(journal.run_id))


def _apply(root: Root, j: Journal, listed: dict[str, str] | None = None) -> None:
    """Applies ``j``; ``listed``: ``root.listed`` of its files, taken just before.

    Four phases (deletes, moves, writes, markers), each finished before the next starts;
    within one, files go in any order, ``MOVE_WORKERS`` at a time. A failure stops its phase
    (the calls under way end) and raises: the journal stays, and applying it again finishes it.
    """
    if listed is None:
        listed = root.listed([*j.deletes, *(p for m in j.moves for p in m)])
    # Every new file must be staged or in place before an old one goes.
    lost = [src for src, dst in j.moves if src not in listed and dst not in listed]
    if lost:
        raise CommitError(
            f"commit {j.run_id}: {len(lost)} files are neither staged nor in place (first: "
            f"{redact(root.abs(lost[0]))}); nothing was deleted"
        )
    # Old files go before new ones arrive: a reader never sees an image twice.
    _in_parallel(lambda rel: _delete(root, rel, listed[rel]), [r for r in j.deletes if r in listed])
    staged = [(src, dst) for src, dst in j.moves if src in listed]  # the others arrived already
    for folder in sorted({posixpath.dirname(dst) for _, dst in staged}):
        root.fs.makedirs(root.abs(folder) if folder else root.path, exist_ok=True)
    _in_parallel(lambda m: root.move_in(*m, makedirs=False), staged)
    _in_parallel(lambda w: root.write_json(*w), list(j.writes.items()))  # the ledger, manifests
    for rel, present in j.markers.items():
        if present:
            root.touch(rel)
        else:
            root.remove(rel)


def _delete(root: Root, rel: str, kind: str) -> None:
    if kind == "directory":
        root.remove(rel)
        return
    with contextlib.suppress(FileNotFoundError):  # gone since it was listed
        root.fs.rm_file(root.abs(rel))


def _in_parallel(call, items: list) -> None:
    """``call(item)`` for each item, ``MOVE_WORKERS`` at a time; returns once all are done.

    After a failure no further item starts; the calls under way end, then the first error
    is raised here.
    """
    if len(items) <= 1:
        for item in items:
            call(item)
        return
    pending, errors, stop, lock = iter(items), [], threading.Event(), threading.Lock()

    def work() -> None:
        while not stop.is_set():
            with lock:
                item = next(pending, _DONE)
            if item is _DONE:
                return
            try:
                call(item)
            except BaseException as e:  # raised in the caller's thread below
                with lock:
                    errors.append(e)
                stop.set()

    workers = min(MOVE_WORKERS, len(items))
    with ThreadPoolExecutor(workers, thread_name_prefix="commit") as pool:
        try:
            for f in [pool.submit(work) for _ in range(workers)]:
                f.result()
        finally:
            stop.set()  # the caller was interrupted: start nothing more
    if errors:
        raise errors[0]


_DONE = object()


def recover(root: Root) -> int:
    """Finishes every journaled commit and drops every staging folder left without one.

    Only under the lease: no live run is writing its staging. Returns the commits finished.
    """
    names = root.listing()
    journals = sorted(n for n in names if n.startswith(JOURNAL_PREFIX) and n.endswith(".json"))
    finished = 0
    for rel in journals:
        raw = root.read_json(rel, None)
        if raw is None:
            continue
        j = Journal(
            run_id=raw["run_id"],
            deletes=list(raw["deletes"]),
            moves=[tuple(m) for m in raw["moves"]],
            writes=dict(raw["writes"]),
            markers=dict(raw["markers"]),
        )
        listed = root.listed([*j.deletes, *(p for m in j.moves for p in m)])
        if j.moves and not any(s in listed or d in listed for s, d in j.moves):
            # A journal written after its run lost the lease and its staging was dropped:
            # nothing of it was applied (_apply checks before it deletes). Undo it.
            print(
                f"dropped commit {j.run_id}: its staged files are gone; the old files stay", file=sys.stderr
            )
            root.remove(rel)
            continue
        _apply(root, j, listed)
        root.remove(rel)
        finished += 1
    for stale in sorted({n.split("/", 1)[0] for n in names if n.startswith(STAGING_PREFIX)}):
        root.remove(stale)
    for tmp in (n for n in names if _TMP.search(n)):
        root.remove(tmp)  # a JSON write killed before its rename
    return finished


# ----------------------------------------------------------------------------- the lease


class Lease:
    """The output root's lock, held for a run: ``with Lease(root, run_id): ...``.

    ``check()`` renews the lease by compare-and-swap and raises if it was lost: a run calls
    it right before its commit point, so a run that stalled past its expiry and was taken
    over can never commit (fencing), whatever the clocks of its hosts say.
    """

    def __init__(self, root: Root, run_id: str, expiry_s: float = LEASE_EXPIRY_S):
        self.root = root
        self.run_id = run_id
        self.expiry_s = expiry_s
        self._mine: bytes | None = None  # the lease's bytes as we last wrote them
        self._lock = threading.Lock()  # the heartbeat, check() and release() swap one at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed = time.monotonic()
        self.lost = False

    def _record(self, started: str | None = None) -> bytes:
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid_namespace": _pid_namespace(),
                "pid": os.getpid(),
                "started": started or datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "heartbeat": time.time(),
                "expires_after_s": self.expiry_s,
            },
            sort_keys=True,
        ).encode()

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.release()

    def acquire(self) -> None:
        for _ in range(5):
            data = self._record()
            if self._create(data):
                self._mine = data
                return
            held = self.root.read_bytes(LOCK)
            if held is None:
                continue  # released meanwhile: try again
            holder = _parse(held)
            if "heartbeat" not in holder:  # unreadable (a crash mid-write elsewhere): its file's age
                holder["heartbeat"] = self.root.modified(LOCK) or time.time()
            age = time.time() - float(holder["heartbeat"])
            alive = age <= float(holder.get("expires_after_s", self.expiry_s))
            same_host = holder.get("host") == socket.gethostname()
            if alive and same_host and holder.get("pid_namespace") == _pid_namespace():
                alive = _pid_alive(holder.get("pid"))  # a killed run on this host: no need to wait
            if alive:
                raise LeaseHeld(
                    f"output {redact(self.root.uri)} is in use by run {holder.get('run_id')} on host "
                    f"{holder.get('host')} (pid {holder.get('pid')}, since {holder.get('started')}, "
                    f"last heartbeat {age:.0f} s ago); two jobs must not write one output. If that run "
                    f"is dead, its lease expires {max(0.0, self.expiry_s - age):.0f} s from now"
                )
            # Its holder stopped heart-beating: take it over, unless someone else just did.
            if self._swap(held, data):
                self._mine = data
                return
        raise LeaseHeld(f"output {redact(self.root.uri)}: could not take its lease; another run is taking it")

    def release(self) -> None:
        with self._lock:
            if self._mine is not None and not self.lost:
                with contextlib.suppress(Exception):  # not ours any more: it expires on its own
                    self._swap(self._mine, None)
            self._mine = None

    def _renew(self) -> bool:
        """Rewrites the lease with a fresh heartbeat if it is still ours."""
        with self._lock:
            if self.lost or self._mine is None:
                return False
            fresh = self._record(_parse(self._mine).get("started"))
            try:
                renewed = self._swap(self._mine, fresh)
            except Exception:
                return False  # a failing store: retried at the next beat, and check() says so
            if renewed:
                self._mine = fresh
                self._renewed = time.monotonic()
            else:
                self.lost = True  # taken over: this run must not commit
            return renewed

    def _beat(self) -> None:
        while not self._stop.wait(self.expiry_s / 8):
            if not self._renew() and (self.lost or time.monotonic() - self._renewed > self.expiry_s / 2):
                self.lost = True  # not renewed for half its expiry: another run may take it over
                return

    def check(self) -> None:
        """Renews the lease now; raises if it is no longer this run's (see the class doc)."""
        if not self._renew():
            self.lost = True
            raise CommitError(f"lost the lease on {redact(self.root.uri)} to another run; nothing committed")

    # -- the two atomic operations, per file system

    def _create(self, data: bytes) -> bool:
        """Creates the lease file, whole, only if there is none."""
        path = self.root.abs(LOCK)
        self.root.fs.makedirs(self.root.path, exist_ok=True)
        if self.root.local:
            # Written whole to a name of our own, then linked into place: link() fails if the
            # lease exists, and no one ever sees it half written.
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
            return True
        if self.root.s3:
            try:
                self.root.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            except OSError:  # a store that reports the precondition otherwise
                if self.root.read_bytes(LOCK) is not None:
                    return False
                raise
            return True
        if self.root.exists(LOCK):  # other stores: best effort, not atomic
            return False
        self.root.fs.pipe_file(path, data)
        return True

    def _swap(self, expected: bytes, data: bytes | None) -> bool:
        """Replaces the lease by ``data`` (None: removes it) only if it still holds ``expected``."""
        path = self.root.abs(LOCK)
        if self.root.local:
            import fcntl

            with open(f"{path}.guard", "a") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                try:
                    with open(path, "rb") as f:
                        if f.read() != expected:
                            return False
                except FileNotFoundError:
                    return False
                if data is None:
                    os.remove(path)
                else:
                    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                return True
        if self.root.s3:
            fs = self.root.fs
            try:
                etag = fs.info(path, refresh=True)["ETag"]
                if fs.cat_file(path) != expected:
                    return False
                if data is None:
                    bucket, key, _ = fs.split_path(path)
                    fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
                else:
                    fs.pipe_file(path, data, IfMatch=etag)
            except (FileNotFoundError, OSError):  # 412: it changed since it was read
                return False
            finally:
                fs.invalidate_cache(path)
            return True
        if self.root.read_bytes(LOCK) != expected:  # other stores: best effort
            return False
        if data is None:
            self.root.remove(LOCK)
        else:
            self.root.fs.pipe_file(path, data)
        return True


def _pid_namespace() -> str:
    """Which process ids a pid means: containers on one host name have their own."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # someone else's process, or no pid recorded: assume alive
    return True


def _parse(data: bytes) -> dict:
    try:
        value = json.loads(data)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}
