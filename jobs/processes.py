"""This machine's processes, read from Linux's /proc (elsewhere none are found): a process's children and
descendants, whether it is alive (a pid's start time tells it apart from the pid's reuse), and ending a group of
them: SIGTERM, a grace period, then SIGKILL."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if gone): tells a pid apart from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.append(child)
                todo.append(child)
    return seen


def is_running(pid: int, started: int | None) -> bool:
    now = proc_start_time(pid)
    if now is None:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except OSError:
        return False
    return started is None or now == started


def terminate(procs: list[tuple[int, int | None]], grace: float) -> None:
    """SIGTERM what is still alive, wait up to `grace` seconds, then SIGKILL the rest."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        alive = [(p, s) for p, s in procs if s is not None and is_running(p, s)]
        if not alive:
            return
        for p, _ in alive:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(is_running(p, s) for p, s in alive):
            time.sleep(0.2)


def reap(pids: list[int]) -> None:
    """Collect the exit status of these child processes that have ended, so none stays a zombie (for children
    whose Popen handle is lost)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not ours, or reaped already
            pass
