"""One log format for every entry point, with the night's context on each line: the stage, the partition date and
the run a record belongs to. `text` for people (a line each), `json` for log collectors (an object each, the context
as fields). Entry points call configure_logging once; jobs/pipeline.py sets the context around each stage."""
from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from contextlib import contextmanager
from typing import IO, Iterator

LOG_FORMATS = ("text", "json")
CONTEXT_FIELDS = ("stage", "date", "run_id")
_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("matcher_log_context", default=None)
NOISY = ("py4j", "great_expectations", "jieba", "botocore", "urllib3", "transformers", "httpx")
_terminal: IO[str] | None = None  # where a live progress bar may go: a terminal the text logs go to, else none


def progress_terminal() -> IO[str] | None:
    """The terminal a long stage may draw its progress bar on; None in Airflow, in JSON logs, or into a file."""
    return _terminal


def progress_bar(label: str, done: int, total: int, rate: float, unit: str, width: int = 30) -> str:
    """One line: `extract [#########.....................]  31% 2,960/9,583 products, 107.4/s` (no bar when the
    total is not known beforehand: `clean: 1,200 products, 50.0/s`)."""
    if not total:
        return f"{label}: {done:,} {unit}, {rate:.1f}/s"
    share = min(1.0, done / total)
    filled = int(round(share * width))
    return (f"{label} [{'#' * filled}{'.' * (width - filled)}] {100 * share:3.0f}% "
            f"{done:,}/{total:,} {unit}, {rate:.1f}/s")


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Add these fields (stage, date, run_id) to every record logged inside the block, in this thread or task."""
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get() or {}
        for name in CONTEXT_FIELDS:
            setattr(record, name, context.get(name, ""))
        record.context = _context_suffix(context)
        return True


def _context_suffix(context: dict[str, str]) -> str:
    return "".join(f" [{n}={context[n]}]" for n in CONTEXT_FIELDS if context.get(n))


class _ContextInMessage(logging.Filter):
    """The context appended to matcher's messages, for a host whose handlers show the message alone (Airflow's
    task logs, where configure_logging leaves the root logger to Airflow)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if any(getattr(h, "_matcher", False) for h in logging.getLogger().handlers):
            return True  # matcher's own handler shows the context already
        suffix = _context_suffix(_context.get() or {})
        if suffix and not getattr(record, "_context_in_message", False):  # once, however many blocks are open
            record.msg = f"{record.msg}{suffix.replace('%', '%%') if record.args else suffix}"
            record._context_in_message = True
        return True


@contextmanager
def context_in_messages() -> Iterator[None]:
    """Inside the block, the context appended to the messages of matcher's logger (see _ContextInMessage)."""
    ours, added = logging.getLogger("matcher"), _ContextInMessage()
    ours.addFilter(added)
    try:
        yield
    finally:
        ours.removeFilter(added)


class _Py4JAfterInterrupt(logging.Filter):
    """Py4J logs each call that Ctrl-C cut (its JVM gone) with a traceback, on the root logger: after an interrupt
    they say nothing the command's "interrupted" does not."""

    def filter(self, record: logging.LogRecord) -> bool:
        from matcher.interrupts import interrupted

        return not (f"{os.sep}py4j{os.sep}" in record.pathname and interrupted())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        doc.update({n: getattr(record, n) for n in CONTEXT_FIELDS if getattr(record, n, "")})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(level: int = logging.INFO, fmt: str = "text", stream: IO[str] | None = None,
                      force: bool = False) -> None:
    """Send matcher's records (and other libraries' warnings) to `stream` (stderr) in `fmt`: text or json. As
    logging.basicConfig, it leaves alone a root logger that its host (a test runner, an application embedding
    matcher) has configured already, unless `force`."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}; got {fmt!r}")
    root = logging.getLogger()
    if not force and any(not getattr(h, "_matcher", False) for h in root.handlers):
        return
    global _terminal
    target = stream or sys.stderr
    _terminal = target if fmt == "text" and getattr(target, "isatty", lambda: False)() else None
    handler = logging.StreamHandler(target)
    handler.addFilter(_ContextFilter())
    handler.addFilter(_Py4JAfterInterrupt())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s", datefmt="%H:%M:%S"))
    for old in [h for h in root.handlers if getattr(h, "_matcher", False)]:
        root.removeHandler(old)
    handler._matcher = True  # type: ignore[attr-defined]  # replaced, not stacked, by a second call
    root.addHandler(handler)
    # Other libraries' records from warnings up (torch logs statistics at INFO when the process exits).
    root.setLevel(max(level, logging.WARNING))
    logging.getLogger("matcher").setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
