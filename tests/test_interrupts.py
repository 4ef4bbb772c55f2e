"""Ctrl-C is noted whichever handler ran: chained before Python's, below them (PySpark replaces the handler while it
starts), and where a library's callback swallowed the KeyboardInterrupt; a run then stops before its next stage."""
import os
import signal
import sys
import weakref

import pytest

from matcher.interrupts import INTERRUPTED, clear_interrupts, interrupted, note_interrupts


@pytest.fixture
def noted():
    import matcher.interrupts as interrupts

    handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    note_interrupts()
    clear_interrupts()
    yield
    clear_interrupts()
    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = hook
    if interrupts._signals_read is not None:  # the pipe, as before the test: none
        signal.set_wakeup_fd(-1)
        os.close(interrupts._signals_read)
        interrupts._signals_read = None


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


def test_a_keyboard_interrupt_a_callback_swallowed_is_noted_quietly(noted):
    class Thing:
        pass

    def callback(ref):  # as Py4J's finalizer when PySpark's handler raised inside it
        raise KeyboardInterrupt

    def failing_callback(ref):
        raise ValueError("another library's bug")

    reported = []

    def report(unraisable) -> None:  # what Python would print
        reported.append(unraisable)

    sys.unraisablehook = report
    note_interrupts()  # chained before it
    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing
    assert ref() is None and interrupted() and reported == []  # noted, not printed
    other = Thing()
    ref = weakref.ref(other, failing_callback)
    del other
    assert [type(r.exc_value) for r in reported] == [ValueError]  # any other error as before


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
def test_a_spark_start_interrupted_while_pyspark_waits_for_its_jvm_leaves_no_jvm(tmp_path):
    """In a fresh process (PySpark keeps one JVM per process, so only a first start launches one)."""
    import subprocess
    import textwrap
    from pathlib import Path

    script = textwrap.dedent("""
        import types
        import pyspark.java_gateway
        import os
        from jobs.processes import children
        from jobs.spark import get_spark
        from matcher.config import load_config

        before = set(children(os.getpid()))
        def interrupted_wait(seconds):  # Ctrl-C while PySpark polls for the JVM's connection file (injected)
            raise KeyboardInterrupt
        pyspark.java_gateway.time = types.SimpleNamespace(sleep=interrupted_wait)  # PySpark's wait alone
        try:
            get_spark(load_config().spark)
        except KeyboardInterrupt:
            print("interrupted", sorted(set(children(os.getpid())) - before))
    """)
    root, out = Path(__file__).resolve().parent.parent, tmp_path / "out.txt"
    with open(out, "w") as sink:  # a file, not a pipe: a JVM left behind would hold a pipe open
        subprocess.run([sys.executable, "-c", script], cwd=root, stdout=sink, stderr=subprocess.STDOUT, timeout=120)
    said = out.read_text().strip().splitlines()
    left = [int(pid) for pid in said[-1].removeprefix("interrupted [").rstrip("]").split(", ") if pid.isdigit()]
    for pid in left:  # the test's own cleanup where the code under test failed
        os.kill(pid, signal.SIGKILL)
    assert said[-1] == "interrupted []", said[-20:]


def test_a_keyboard_interrupt_raised_as_the_command_answers_is_still_130_said_once(monkeypatch, capsys):
    """PySpark's handler may run only after the interrupt was noted below it and the command answered 130: its
    KeyboardInterrupt, late, escaped main and the process died by the signal (status -2 to its parent)."""
    import matcher.app.cli as cli

    def answered_then_interrupted(argv):
        cli._interrupted()
        raise KeyboardInterrupt  # the late handler, as it runs at the next bytecode

    monkeypatch.setattr(cli, "_command", answered_then_interrupted)
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err == "matcher: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # only the process's own command line ignores it


def test_a_handler_still_pending_as_the_process_stops_listening_does_not_kill_it_by_the_signal(monkeypatch, capsys):
    """signal.signal runs a pending handler before it replaces it (CPython): the process's own command line, having
    answered 130, got that handler's KeyboardInterrupt out of its SIG_IGN and died by the signal (-2) in CI."""
    import matcher.app.cli as cli

    real_signal, before = signal.signal, signal.getsignal(signal.SIGINT)
    pending = [True]

    def pending_handler_runs_first(signum, handler):
        if pending and signum == signal.SIGINT:
            pending.clear()
            raise KeyboardInterrupt  # the fault injected: PySpark's handler, pending until this call
        return real_signal(signum, handler)

    monkeypatch.setattr(cli, "_command", lambda argv: cli._interrupted())
    monkeypatch.setattr(signal, "signal", pending_handler_runs_first)
    try:
        assert cli.main(None) == 130
        assert not pending  # the injected handler did run
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        real_signal(signal.SIGINT, before)
    assert capsys.readouterr().err == "matcher: interrupted\n"
