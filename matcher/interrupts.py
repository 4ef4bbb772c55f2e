"""Ctrl-C, noted: SIGINT sets INTERRUPTED before whatever handled it runs (Python's KeyboardInterrupt, or PySpark's,
which cancels the jobs over Py4J and raises it). In a terminal the signal reaches Spark's JVM too, so the error that
stops a stage may be a Py4J one, not KeyboardInterrupt: the event lets the command say "interrupted" (exit 130)
instead of reporting a bug."""
from __future__ import annotations

import signal
import threading

INTERRUPTED = threading.Event()


def note_interrupts() -> None:
    """Chain INTERRUPTED.set() before the process's current SIGINT handler (once; the main thread only, where
    Python delivers signals). Called by the CLI at start and again once Spark has started: PySpark installs its own
    handler then, in place of any before it."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGINT)
    if getattr(previous, "notes_interrupts", False) or previous == signal.SIG_IGN:
        return

    def on_interrupt(signum, frame):
        INTERRUPTED.set()
        (previous if callable(previous) else signal.default_int_handler)(signum, frame)

    on_interrupt.notes_interrupts = True
    signal.signal(signal.SIGINT, on_interrupt)
