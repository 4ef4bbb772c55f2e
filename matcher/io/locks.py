"""One writer per partition date: a lease in the lake's `_locks/dt=D/`, renewed by a heartbeat, judged by the store's
clock, and fenced by a token at commit points.

Layout of `_locks/dt=D/`:
  <token>-<nonce>.json   a holder's (or a contender's) lock document; `token` (12 digits) orders holders
  _token.json            the highest token handed out for the date, so a date's tokens only grow
  _revoked/<lock name>   a tombstone: that lock was taken over after its holder stopped renewing it
  _run.json              the run claim: the run (e.g. an Airflow DAG run) whose stages hold the date between stages

Works on any storage with read-after-write listings (local disks, S3, SeaweedFS), with no atomic create and no
conditional write: a contender bumps `_token.json`, writes its own file, then lists the folder, and keeps the lock only
if its file is the only live one; otherwise it deletes its file and raises DateLockedError at once. Two that arrive
together may both back off, never both proceed.

Time. No holder's clock is trusted: a lease's age is the difference of two modification times set by the store
itself (S3: the server's Last-Modified, 1 s resolution; a local disk or NFS: the file system's mtime). A contender's
"now" is the mtime of the file it has just written; a lock is stale once its file's mtime is more than `stale_after`
behind that. The holders' wall clocks (`clock`) only fill the documents' informational `started` stamps, so a
holder or contender whose clock is hours off neither loses nor steals a lease. A holder on the same host whose
process is gone is taken over at once (a killed run retried there need not wait).

Holder. Every `heartbeat_every` seconds (a monotonic wait) the holder rewrites its file and reads back the mtime the
store gave it. It marks the lock lost, stops beating and removes its file when a beat fails, when its file is gone or
tombstoned (someone took over), when a held lock with a newer token exists, or when two of its beats are more than
`stale_after - heartbeat_every` apart in store time (a stall long enough that a contender may be taking over). Work
under the lock calls `check()` (cheap: the flag) and, right before a commit, `assert_held()` (a synchronous beat and
the checks above); both raise LockLostError, a retryable error. Leaving the `with` block raises it too if the lock
was lost meanwhile.

Fencing. A contender that takes over a stale lock first writes its tombstone, then deletes it; a stalled holder that
wakes finds the tombstone (or, if its in-flight write resurrected its file, the gap between its beats) and refuses
to commit. `token` is the fencing token: it is recorded by the caller beside what it commits.
Limit: storage without conditional writes cannot fence a stall that falls between `assert_held()` and the commit's
own write (microseconds of code, unless the process is frozen right there for longer than `stale_after`).

Runs. `matcher run` holds one lock across all its stages (`held=`). Airflow runs one stage per process: a holder
that names `run_id` also claims the date for that run (`_run.json`) until `finish_run()` (publish) or until
`run_claim_ttl` of store time passes without a stage of the run, so another run's stage is refused while a run of
the date is between stages."""
from __future__ import annotations

import contextvars
import json
import os
import posixpath
import random
import socket
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import pyarrow.fs as pafs

from matcher.failures import classify
from matcher.io.lake import Lake

_READ_TRIES = 3
_UNREADABLE = object()


STALE_AFTER_SECONDS = 300.0  # a lock not renewed this long (its holder died) may be taken over


class DateLockedError(RuntimeError):
    """Another run holds the date; the message is one line naming it. Retryable: a later try may find it done."""


class LockLostError(DateLockedError):
    """This holder no longer holds the date (a heartbeat failed, or another run took the lock over): stop before
    committing anything. Retryable, as a busy date is."""


def _put_doc(lake: Lake, rel: str, doc: dict) -> None:
    """Replace a document whole (Lake.write_bytes: an S3 PUT, or on a local disk written aside and renamed)."""
    lake.write_bytes(rel, json.dumps(doc, default=str).encode())  # written aside and renamed on a local disk


def _read_doc(lake: Lake, rel: str) -> object:
    """The document, None if the file is gone, or _UNREADABLE when it cannot be parsed after a few tries: callers
    treat that as a live lock (fail closed), never as an absent one."""
    for attempt in range(_READ_TRIES):
        try:
            data = lake.read_bytes(rel)
            if data is None:
                return None
            doc = json.loads(data)
            if isinstance(doc, dict):
                return doc
        except (OSError, ValueError):
            pass
        time.sleep(0.05 * (attempt + 1))
    return _UNREADABLE


def _mtime(info: pafs.FileInfo) -> float:
    return info.mtime_ns / 1e9


def _token_of(name: str) -> int:
    match = Lake.LEASE_NAME.match(name)
    return int(match.group(1)) if match else 0


def _lock_files(lake: Lake, dt: str) -> list[pafs.FileInfo]:
    """The lock documents of a date (not the token, run claim, tombstones or files being written aside)."""
    try:
        infos = lake.fs.get_file_info(pafs.FileSelector(lake.path(Lake.lock_dir(dt)), allow_not_found=True))
    except FileNotFoundError:
        return []
    return [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".json")
            and not i.base_name.startswith("_")]


def _died_here(doc: object) -> bool:
    """A holder on this host whose process is gone (a killed run, retried here) need not wait for expiry."""
    if not isinstance(doc, dict) or doc.get("host") != socket.gethostname() or not isinstance(doc.get("pid"), int):
        return False
    try:
        os.kill(doc["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _describe(doc: object, name: str) -> str:
    if not isinstance(doc, dict):
        return f"an unreadable lock file {name} (treated as live)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(doc.get("started") or 0)))
    run = f", run {doc['run_id']}" if doc.get("run_id") else ""
    return (f"{doc.get('holder')} (host {doc.get('host')}, pid {doc.get('pid')}{run}, since {since} UTC by its "
            f"clock)")


class DateLock:
    """A held lease on one partition date. `token` grows with every acquisition of the date (the fencing token)."""

    def __init__(self, lake: Lake, dt: str, holder: str, stale_after: float = STALE_AFTER_SECONDS,
                 heartbeat_every: float = 30.0,
                 run_id: str = "", run_claim_ttl: float = 2 * 3600.0, clock: Callable[[], float] = time.time):
        if not 0 < heartbeat_every * 3 <= stale_after:
            raise ValueError(f"heartbeat_every ({heartbeat_every}s) must be at most a third of stale_after "
                             f"({stale_after}s), so a live holder renews well before a contender may take over")
        self.lake, self.dt, self.holder, self.run_id = lake, dt, holder, run_id
        self.stale_after, self.heartbeat_every, self.run_claim_ttl = stale_after, heartbeat_every, run_claim_ttl
        self.clock = clock
        self.token = 0
        self.name = ""  # lake-relative path of this holder's file
        self.active = False  # acquired and not yet released
        self._lost: str | None = None
        self._last_mtime = 0.0  # store time of the last successful beat
        self._beats = 0
        self._started = 0.0
        self._run_finished = False
        self._beat_mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # public ---------------------------------------------------------------------------------------------------------
    @property
    def lost(self) -> str | None:
        """Why the lock was lost, or None while it is held."""
        return self._lost

    def check(self) -> None:
        """Raise LockLostError if the heartbeat has found the lock lost (no storage call)."""
        if self._lost is not None:
            raise LockLostError(f"lost the lock on date {self.dt} (token {self.token}): {self._lost}")
        if not self.active:
            raise LockLostError(f"the lock on date {self.dt} is not held (released or never acquired)")

    def assert_held(self) -> None:
        """The fence before a commit: renew the lease now and verify that this holder still holds the date and its
        token is the newest held one; raise LockLostError otherwise."""
        self.check()
        with self._beat_mutex:
            self._beat()
            newer = self._newer_holder()
            if newer:
                self._lose(f"a newer holder took the date: {newer}")
        self.check()

    def finish_run(self) -> None:
        """End this run's claim on the date (its last stage has committed): another run may take the date."""
        self.assert_held()
        claim = _read_doc(self.lake, self._run_file)
        if isinstance(claim, dict) and claim.get("run_id") == self.run_id:
            self.lake.delete_file_quietly(self._run_file)
        self._run_finished = True

    # acquisition ----------------------------------------------------------------------------------------------------
    @property
    def _run_file(self) -> str:
        return Lake.run_claim_file(self.dt)

    def _tombstone(self, name: str) -> str:
        return posixpath.join(Lake.revoked_dir(self.dt), posixpath.basename(name))

    def _doc(self, state: str) -> dict:
        return {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
                "token": self.token, "state": state, "beat": self._beats, "started": self._started}

    def acquire(self) -> "DateLock":
        """Take the date, or raise DateLockedError at once naming the holder."""
        self._started = self.clock()
        existing = _lock_files(self.lake, self.dt)
        high = _read_doc(self.lake, Lake.lock_token_file(self.dt))
        if high is _UNREADABLE:
            raise DateLockedError(f"date {self.dt}: the lock's token file is unreadable; try again")
        self.token = max([int((high or {}).get("token", 0))] + [_token_of(i.base_name) for i in existing]) + 1
        _put_doc(self.lake, Lake.lock_token_file(self.dt), {"token": self.token, "by": self.holder})
        self.name = Lake.lease_file(self.dt, self.token, uuid.uuid4().hex[:12])
        _put_doc(self.lake, self.name, self._doc("claiming"))
        try:
            now = self._store_mtime()  # the store's "now": the mtime it gave the file just written
            live = self._live_others(now)
            if live:
                name, doc = live[0]
                # A lake-wide lock ("tables", "models") is named as such, not as a date.
                held = f"date {self.dt} is being run" if self.dt[:1].isdigit() else f"the lake's {self.dt} lock is held"
                raise DateLockedError(
                    f"{held} by {_describe(doc, name)}; wait for it to finish (a lock whose "
                    f"holder died expires {self.stale_after:.0f}s after its last heartbeat, by the lake's clock)")
            self._last_mtime = now
            self.active = True
            with self._beat_mutex:
                self._beat(state="held")
            self.check()
            if self.run_id or self._claimed_by_other_run(now) is not None:
                self._claim_run(now)
        except BaseException:
            self.active = False
            self.lake.delete_file_quietly(self.name)
            raise
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._keep_fresh,),
                                        name=f"date-lock-{self.dt}", daemon=True)  # in the log context
        self._thread.start()
        return self

    def _store_mtime(self) -> float:
        info = self.lake.fs.get_file_info(self.lake.path(self.name))
        if info.type != pafs.FileType.File:
            raise LockLostError(f"lock file {self.name} vanished right after it was written")
        return _mtime(info)

    def _live_others(self, now: float) -> list[tuple[str, object]]:
        """Other lock files that are live; stale or dead ones are taken over (tombstoned, then removed)."""
        live = []
        for info in sorted(_lock_files(self.lake, self.dt), key=lambda i: i.base_name):
            rel = self.lake.relative(info.path)
            if rel == self.name:
                continue
            doc = _read_doc(self.lake, rel)
            if doc is None:
                continue  # released between the listing and the read
            if now - _mtime(info) > self.stale_after or _died_here(doc):
                if self._take_over(rel, info):
                    continue
            live.append((rel, doc))
        return live

    def _take_over(self, rel: str, seen: pafs.FileInfo) -> bool:
        """Revoke a stale lock unless it was renewed since it was listed; True when it is gone."""
        again = self.lake.fs.get_file_info(seen.path)
        if again.type != pafs.FileType.File:
            return True
        if again.mtime_ns != seen.mtime_ns:
            return False  # it beat just now: its holder is alive after all
        _put_doc(self.lake, self._tombstone(rel), {"revoked_by": self.holder, "token": self.token})
        self.lake.delete_file_quietly(rel)
        return True

    def _claimed_by_other_run(self, now: float) -> dict | None:
        claim = _read_doc(self.lake, self._run_file)
        if claim is None:
            return None
        if claim is _UNREADABLE:
            return {"run_id": "(unreadable run claim)"}
        info = self.lake.fs.get_file_info(self.lake.path(self._run_file))
        if info.type != pafs.FileType.File or now - _mtime(info) > self.run_claim_ttl:
            return None  # expired: that run stopped between stages long ago
        return None if claim.get("run_id") == self.run_id else claim

    def _claim_run(self, now: float) -> None:
        other = self._claimed_by_other_run(now)
        if other is not None:
            raise DateLockedError(
                f"date {self.dt} is between the stages of run {other.get('run_id')} (last stage: "
                f"{other.get('holder')}); wait for it to publish, or for its claim to expire "
                f"{self.run_claim_ttl:.0f}s after its last stage (or remove {self.lake.display(self._run_file)} if "
                f"that run is abandoned)")
        if self.run_id:
            _put_doc(self.lake, self._run_file, {"run_id": self.run_id, "holder": self.holder, "token": self.token})

    # the lease -------------------------------------------------------------------------------------------------------
    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
        self.lake.delete_file_quietly(self.name)  # our own name: never another holder's file

    def _beat(self, state: str = "held") -> None:
        """Renew the lease (the caller holds _beat_mutex); marks the lock lost instead of raising."""
        if self._lost is not None:
            return
        try:
            if self.lake.exists(self._tombstone(self.name)):
                return self._lose("another holder took the lock over (this one stopped renewing it)")
            if not self.lake.exists(self.name):
                return self._lose("its lock file is gone")
            self._beats += 1
            _put_doc(self.lake, self.name, self._doc(state))
            now = self._store_mtime()
            if now - self._last_mtime > self.stale_after - self.heartbeat_every:
                return self._lose(f"the lease lapsed: {now - self._last_mtime:.1f}s between renewals by the lake's "
                                  f"clock (a stall; stale after {self.stale_after:.0f}s)")
            if self.lake.exists(self._tombstone(self.name)):  # taken over while this beat was being written
                return self._lose("another holder took the lock over (this one stopped renewing it)")
            self._last_mtime = now
        except Exception as exc:  # noqa: BLE001 - any failed renewal ends the lease
            self._lose(f"a heartbeat failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    def _newer_holder(self) -> str | None:
        for info in _lock_files(self.lake, self.dt):
            rel = self.lake.relative(info.path)
            if rel == self.name or _token_of(info.base_name) <= self.token:
                continue
            doc = _read_doc(self.lake, rel)
            if isinstance(doc, dict) and doc.get("state") == "held":
                return _describe(doc, rel)
        return None

    def _keep_fresh(self) -> None:
        while not self._stop.wait(self.heartbeat_every) and self._lost is None:
            with self._beat_mutex:
                self._beat()

    def release(self) -> None:
        """Stop the heartbeat and remove this holder's file; a run's claim on the date is renewed (its next stage
        has run_claim_ttl from now) unless finish_run() ended it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.run_id and self._lost is None and self.active and not self._run_finished:
            try:
                _put_doc(self.lake, self._run_file, {"run_id": self.run_id, "holder": self.holder,
                                                     "token": self.token})
            except OSError:
                pass  # the claim then expires run_claim_ttl after the stage began
        self.active = False
        self.lake.delete_file_quietly(self.name)
        self._remove_old_tombstones()

    def _remove_old_tombstones(self) -> None:
        """Tombstones are needed only while a revoked holder may still wake; drop those older than 2 x stale_after."""
        folder = self.lake.path(Lake.revoked_dir(self.dt))
        try:
            infos = self.lake.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except OSError:
            return
        for info in infos:
            if info.type == pafs.FileType.File and self._last_mtime - _mtime(info) > 2 * self.stale_after:
                self.lake.delete_file_quietly(self.lake.relative(info.path))


@contextmanager
def date_lock(lake: Lake, dt: str, holder: str, stale_after: float = STALE_AFTER_SECONDS,
              heartbeat_every: float = 30.0,
              run_id: str = "", held: DateLock | None = None,
              clock: Callable[[], float] = time.time) -> Iterator[DateLock]:
    """Hold partition date `dt` of the lake while the block runs, or raise DateLockedError at once.

    `held`: a lock this process already holds on the date (a run's stages under one lock): it is used as is and
    stays held after the block. Leaving the block raises LockLostError if the lock was lost meanwhile."""
    if held is not None and held.active and held.lake.uri == lake.uri and held.dt == dt:
        yield held
        held.check()
        return
    lock = DateLock(lake, dt, holder, stale_after=stale_after, heartbeat_every=heartbeat_every, run_id=run_id,
                    clock=clock).acquire()
    try:
        yield lock
    except BaseException as exc:
        lock.release()
        # A storage error in the block may be the lock's loss showing; a permanent failure (bad input, a failed
        # gate) stays what it is, so that it is not retried.
        if lock.lost is not None and isinstance(exc, Exception) and not isinstance(exc, LockLostError) \
                and classify(exc).retryable:
            raise LockLostError(f"lost the lock on date {dt} (token {lock.token}): {lock.lost}") from exc
        raise
    lock.release()
    if lock.lost is not None:
        lock.check()


@contextmanager
def waited_lock(lake: Lake, key: str, holder: str, wait_seconds: float,
                locked_error: type[DateLockedError] = DateLockedError, what: str = "") -> Iterator[DateLock]:
    """Hold a lake-wide lock (`key` names it beside the dates' own, e.g. "models") while the block runs, waiting for
    it up to `wait_seconds` with jittered back-off, then raising `locked_error`."""
    deadline = time.monotonic() + wait_seconds
    pause = 0.05
    held = ExitStack()
    while True:
        try:
            lock = held.enter_context(date_lock(lake, key, holder=holder))
            break
        except DateLockedError as exc:
            if time.monotonic() >= deadline:
                raise locked_error(f"{what or key} stayed locked for {wait_seconds:.0f}s: {exc}") from None
            time.sleep(pause * (0.5 + random.random()))  # noqa: S311 (jitter) two that backed off together do not meet again
            pause = min(pause * 2, 2.0)
    with held:
        yield lock
