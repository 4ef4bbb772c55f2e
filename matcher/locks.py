"""One writer per partition date: a lock file per holder under the lake's `_locks/dt=D/`, kept fresh by a heartbeat.

Works on any storage with read-after-write listings (local disks, S3, SeaweedFS), with no atomic create: a holder
writes its own file, then lists the folder, and keeps the lock only if its file is the only live one; otherwise it
deletes its file and backs off. Two that arrive together may both back off, never both proceed. A holder that
died stops refreshing its heartbeat, and its file is ignored (and removed) once `stale_after` seconds old, or at
once by a process on the same host that finds the holder's pid gone."""
from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import pyarrow.fs as pafs

from matcher.lake import Lake


class DateLockedError(RuntimeError):
    """Another run holds the date; the message is one line naming it."""


def _live_locks(lake: Lake, dt: str, stale_after: float) -> dict[str, dict]:
    folder = lake.path(Lake.lock_dir(dt))
    try:
        infos = lake.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except FileNotFoundError:
        return {}
    live = {}
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        rel = lake.relative(info.path)
        try:
            doc = lake.read_json(rel)
        except (OSError, ValueError):
            continue  # being written or removed right now: the next look settles it
        if doc is None:
            continue
        if time.time() - float(doc.get("heartbeat", 0)) > stale_after or _died_here(doc):
            lake.delete_file_quietly(rel)  # its holder died
            continue
        live[rel] = doc
    return live


def _died_here(doc: dict) -> bool:
    """A holder on this host whose process is gone (a killed run, retried here) need not wait for expiry."""
    if doc.get("host") != socket.gethostname() or not isinstance(doc.get("pid"), int):
        return False
    try:
        os.kill(doc["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


@contextmanager
def date_lock(lake: Lake, dt: str, holder: str, stale_after: float = 300.0,
              heartbeat_every: float = 30.0) -> Iterator[None]:
    """Hold partition date `dt` of the lake while the block runs, or raise DateLockedError at once."""
    mine = posixpath.join(Lake.lock_dir(dt), f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json")
    doc = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def beat() -> None:
        lake.write_json(mine, {**doc, "heartbeat": time.time()})

    beat()
    others = {k: v for k, v in _live_locks(lake, dt, stale_after).items() if k != mine}
    if others:
        lake.delete_file_quietly(mine)
        other = next(iter(others.values()))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(other.get("started", 0)))
        raise DateLockedError(
            f"date {dt} is being run by {other.get('holder')} (host {other.get('host')}, pid {other.get('pid')}, "
            f"since {since} UTC); wait for it to finish (a lock whose holder died expires {stale_after:.0f}s "
            f"after its last heartbeat)")
    stop = threading.Event()

    def keep_fresh() -> None:
        while not stop.wait(heartbeat_every):
            try:
                beat()
            except OSError:
                pass  # a missed beat only brings expiry closer; the next one may succeed

    thread = threading.Thread(target=keep_fresh, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        lake.delete_file_quietly(mine)
