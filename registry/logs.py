"""How every pullthrough process writes its log: one stream (stderr), one level
(`PULLTHROUGH_LOG_LEVEL`, info by default) and one format (`PULLTHROUGH_LOG_FORMAT`): `text`,
or `json`, one JSON object a line with `time`, `pid`, `level`, `logger` and `message` (and
`exception` with its traceback), so that a Loki or Elasticsearch parser never meets a line of
another shape.

`configure()` is called by each process itself (the web app in create_app, the workers, the
CLI), so the access log and the warnings are there however the process was started;
serving.GunicornLogger gives gunicorn's own lines the same format.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from registry import accesslog

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s %(message)s"


def log_format() -> str:
    value = os.environ.get("PULLTHROUGH_LOG_FORMAT", "text").strip().lower() or "text"
    if value not in FORMATS:
        raise ValueError(f"PULLTHROUGH_LOG_FORMAT must be text or json, not {value!r}")
    return value


def log_level() -> str:
    return (os.environ.get("PULLTHROUGH_LOG_LEVEL", "info").strip() or "info").upper()


class JsonFormatter(logging.Formatter):
    """One record, one line: a JSON object (a traceback goes inside it, not after it)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": self.formatTime(record),
            "pid": record.process,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, separators=(",", ":"))


def formatter(fmt: str | None = None) -> logging.Formatter:
    if (fmt or log_format()) == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


class _Ours(logging.StreamHandler):
    """The handler configure() puts on the root logger (found again by its class)."""


def configure(*, quiet: bool = False) -> None:
    """This process's logging: a stderr handler on the root logger, so that every library's
    lines (rq's, urllib3's) take the same format; pullthrough's loggers at the configured
    level (`quiet`: warnings and worse, for the CLI's output). Called again, it replaces
    its handler. A root logger that already has handlers of someone else (a test runner's)
    keeps them and gets none of ours."""
    fmt = log_format()
    accesslog.configure(fmt)
    # A log line per request is on the hot path: skip the caller lookup (a stack walk per
    # record) and the thread and process-name fields nobody prints.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Ours)]:
        root.removeHandler(handler)
    level = "WARNING" if quiet else log_level()
    if not root.handlers:
        handler = _Ours(sys.stderr)
        handler.setFormatter(formatter(fmt))
        root.addHandler(handler)
        root.setLevel(level)
    for name in ("registry", "workers"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = True
    logging.captureWarnings(True)
