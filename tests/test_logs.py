"""Log lines carry the night's context (stage, date, run) in text and in JSON."""
import io
import json
import logging

import pytest

from matcher.logs import configure_logging, log_context, progress_bar, progress_terminal


@pytest.fixture
def restore_logging():
    root, ours = logging.getLogger(), logging.getLogger("matcher")
    handlers, level, our_level = list(root.handlers), root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


def test_text_lines_name_the_stage_date_and_run_inside_a_context(restore_logging):
    out = io.StringIO()
    configure_logging(logging.INFO, "text", out, force=True)
    log = logging.getLogger("matcher")
    log.info("before")
    with log_context(stage="score", date="2026-01-02", run_id="scheduled__1"):
        log.info("scoring %d products", 7)
    # Another library's statistics (as torch's at exit; torch itself, once imported, logs through its own handler).
    logging.getLogger("a_library.stats").info("cache_misses: 0")
    logging.getLogger("a_library").warning("a warning")
    lines = out.getvalue().splitlines()
    assert "cache_misses" not in out.getvalue() and lines[-1].endswith("WARNING a_library: a warning")
    assert lines[0].endswith("INFO matcher: before")
    assert lines[1].endswith("INFO matcher [stage=score] [date=2026-01-02] [run_id=scheduled__1]: scoring 7 products")


def test_json_lines_are_objects_with_the_context_as_fields(restore_logging):
    out = io.StringIO()
    configure_logging(logging.INFO, "json", out, force=True)
    configure_logging(logging.INFO, "json", out, force=True)  # a second call replaces its handler, not doubled
    with log_context(date="2026-01-02"), log_context(stage="extract"):
        logging.getLogger("matcher").warning("slow: %s", "红色")
        try:
            raise ValueError("bad row")
        except ValueError:
            logging.getLogger("matcher").exception("failed")
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(docs) == 2
    assert {k: docs[0][k] for k in ("level", "logger", "message", "stage", "date")} == {
        "level": "WARNING", "logger": "matcher", "message": "slow: 红色", "stage": "extract", "date": "2026-01-02"}
    assert "run_id" not in docs[0] and "ValueError: bad row" in docs[1]["exception"]
    with pytest.raises(ValueError, match="text, json"):
        configure_logging(logging.INFO, "xml")
    configure_logging(logging.INFO, "text", io.StringIO())  # the test runner's handlers are there: left alone
    assert sum(getattr(h, "_matcher", False) for h in logging.getLogger().handlers) == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_is_drawn_only_on_a_terminal_with_text_logs(restore_logging):
    configure_logging(logging.INFO, "text", _Terminal(), force=True)
    assert progress_terminal() is not None
    configure_logging(logging.INFO, "json", _Terminal(), force=True)  # log collectors get lines, not a bar
    assert progress_terminal() is None
    configure_logging(logging.INFO, "text", io.StringIO(), force=True)  # a file, or Airflow's task log
    assert progress_terminal() is None
    bar = progress_bar("extract", 2960, 9583, 107.44, "products", width=20)
    assert bar == "extract [######..............]  31% 2,960/9,583 products, 107.4/s"
    assert progress_bar("clean", 1200, 0, 50.0, "products") == "clean: 1,200 products, 50.0/s"  # total unknown


@pytest.mark.integration
def test_a_spark_stages_progress_is_drawn_as_a_bar_on_a_terminal(restore_logging):
    import time

    from jobs.spark import get_spark
    from jobs.spark_lake import Progress
    from matcher.config import load_config

    terminal = _Terminal()
    configure_logging(logging.INFO, "text", terminal, force=True)
    with Progress(get_spark(load_config().spark), "extract", 10) as progress:
        progress.accumulator.add(3)  # as a task adds its products when it finishes
        time.sleep(1.2)  # the bar is redrawn every 0.5 s
    drawn = terminal.getvalue()
    assert "\rextract [#########.....................]  30% 3/10 products" in drawn, drawn
    assert "\r\033[K" in drawn and "extract: 3/10 products (30%)" in drawn.split("\r\033[K")[-1], drawn  # then a line


def test_under_a_host_that_shows_the_message_alone_the_context_is_in_the_message(restore_logging):
    from matcher.logs import context_in_messages

    root, ours = logging.getLogger(), logging.getLogger("matcher")
    host = io.StringIO()  # as Airflow's task log handler: its own format, none of matcher's fields
    root.handlers[:] = [logging.StreamHandler(host)]
    ours.setLevel(logging.INFO)
    with context_in_messages():
        with log_context(stage="score", date="2026-01-02", run_id="scheduled__1"):
            ours.info("scoring %d products at 100%%", 7)
        ours.info("outside")
    with log_context(stage="score"):
        ours.info("after the block")
    assert host.getvalue().splitlines() == [
        "scoring 7 products at 100% [stage=score] [date=2026-01-02] [run_id=scheduled__1]", "outside",
        "after the block"]
    configure_logging(logging.INFO, "text", io.StringIO(), force=True)  # matcher's own handler: no second copy
    with context_in_messages(), log_context(stage="score", date="2026-01-02"):
        record = logging.LogRecord("matcher", logging.INFO, __file__, 1, "plain", None, None)
        ours.handle(record)
    assert record.getMessage() == "plain"
