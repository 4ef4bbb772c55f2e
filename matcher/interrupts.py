"""Ctrl-C, noted: SIGINT sets INTERRUPTED before whatever handled it runs (Python's KeyboardInterrupt, or PySpark's,
which cancels the jobs over Py4J and raises it). In a terminal the signal reaches Spark's JVM too, so the error that
stops a stage may be a Py4J one, not KeyboardInterrupt: the event lets the command say "interrupted" (exit 130)
instead of reporting a bug. PySpark replaces the handler while it starts (a Ctrl-C then runs PySpark's alone), so
a SIGINT is also noted below Python's handlers, in a pipe its C-level handler writes each signal to."""
from __future__ import annotations

import os
import signal
import sys
import threading

INTERRUPTED = threading.Event()
_signals_read: int | None = None  # the pipe's read end: signal.set_wakeup_fd writes each signal's number to it


def note_interrupts() -> None:
    """Chain INTERRUPTED.set() before the process's current SIGINT handler (once; the main thread only, where
    Python delivers signals). Called by the CLI at start and again once Spark has started: PySpark installs its own
    handler then, in place of any before it."""
    if threading.current_thread() is not threading.main_thread():
        return
    _note_signals_below_handlers()
    _quiet_swallowed_interrupts()
    previous = signal.getsignal(signal.SIGINT)
    if getattr(previous, "notes_interrupts", False) or previous == signal.SIG_IGN:
        return

    def on_interrupt(signum, frame):
        INTERRUPTED.set()
        (previous if callable(previous) else signal.default_int_handler)(signum, frame)

    on_interrupt.notes_interrupts = True
    signal.signal(signal.SIGINT, on_interrupt)


def _quiet_swallowed_interrupts() -> None:
    """A KeyboardInterrupt raised where Python cannot propagate it (a garbage-collection callback of Py4J's) is
    printed with a traceback and dropped: noted instead, and silent (the run stops at its next stage)."""
    if getattr(sys.unraisablehook, "notes_interrupts", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            INTERRUPTED.set()
            return
        previous(unraisable)

    hook.notes_interrupts = True
    sys.unraisablehook = hook


def _note_signals_below_handlers() -> None:
    global _signals_read
    if _signals_read is not None:
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if previous != -1:  # another's (an event loop): given back
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return
    _signals_read = read


def interrupted() -> bool:
    """Whether a SIGINT arrived since clear_interrupts(), whichever Python handler then ran."""
    if not INTERRUPTED.is_set() and signal.SIGINT in _signals_since():
        INTERRUPTED.set()
    return INTERRUPTED.is_set()


def clear_interrupts() -> None:
    INTERRUPTED.clear()
    _signals_since()


def _signals_since() -> bytes:
    if _signals_read is None:
        return b""
    got = b""
    try:
        while chunk := os.read(_signals_read, 512):
            got += chunk
    except BlockingIOError:
        pass
    return got
