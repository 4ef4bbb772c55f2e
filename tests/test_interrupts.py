"""Ctrl-C is noted whichever handler ran: chained before Python's, below them (PySpark replaces the handler while it
starts), and where a library's callback swallowed the KeyboardInterrupt; a run then stops before its next stage."""
import os
import signal
import sys
import weakref
from types import SimpleNamespace

import pytest

from matcher.interrupts import INTERRUPTED, clear_interrupts, interrupted, note_interrupts


@pytest.fixture
def noted():
    handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    note_interrupts()
    clear_interrupts()
    yield
    clear_interrupts()
    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = hook


def test_a_sigint_handled_by_a_handler_installed_after_ours_is_noted(noted):
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))  # as PySpark's replaces ours
    try:
        os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.SIGINT] and not INTERRUPTED.is_set()  # our chained handler never ran
    assert interrupted()  # the signal was noted below the handlers
    clear_interrupts()
    assert not interrupted()


def test_a_keyboard_interrupt_a_callback_swallowed_is_noted_quietly(noted, capsys):
    class Thing:
        pass

    def callback(ref):  # as Py4J's finalizer when PySpark's handler raised inside it
        raise KeyboardInterrupt

    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing
    assert ref() is None and interrupted()
    assert "KeyboardInterrupt" not in capsys.readouterr().err


def test_a_run_stops_before_its_next_stage_once_interrupted(noted, tmp_path):
    from jobs.context import RunContext
    from jobs.pipeline import run_pipeline
    from matcher.config import load_config

    ctx = RunContext(load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}}), "2026-01-01")
    INTERRUPTED.set()
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(ctx, ["clean"])
    assert ctx.timings == {}  # no stage started


@pytest.mark.integration
def test_a_spark_start_interrupted_while_pyspark_waits_for_its_jvm_leaves_no_jvm(monkeypatch):
    import time

    import pyspark.java_gateway

    from jobs.spark import _children, get_spark, stop_spark
    from matcher.config import load_config

    stop_spark()  # a fresh start: the JVM is launched by this call
    before = _children()

    def interrupted_wait(seconds):  # Ctrl-C while PySpark polls for the JVM's connection file (a fault injected)
        raise KeyboardInterrupt

    monkeypatch.setattr(pyspark.java_gateway, "time", SimpleNamespace(sleep=interrupted_wait))  # PySpark's alone
    with pytest.raises(KeyboardInterrupt):
        get_spark(load_config().spark)
    monkeypatch.undo()
    deadline = time.monotonic() + 30
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _children() - before
    for pid in left:  # the test's own cleanup where the code under test failed
        os.kill(pid, signal.SIGKILL)
    assert not left, f"JVM processes left running: {left}"
