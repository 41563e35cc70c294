"""Logging in klog's format (the format flanneld and every Kubernetes component use), or JSON.

klog: ``Lmmdd hh:mm:ss.uuuuuu <pid padded to 7> file:line] msg`` on stderr, where L is I, W, E
or F. ``-v N`` enables the verbose lines logged at ``V(n)`` for n <= N.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

def V(n: int) -> int:
    """The logging level of klog's verbosity ``n`` (logged with letter I when enabled)."""
    return logging.INFO - n


def _letter(levelno: int) -> str:
    if levelno >= logging.CRITICAL:
        return "F"
    if levelno >= logging.ERROR:
        return "E"
    if levelno >= logging.WARNING:
        return "W"
    return "I"


class KlogFormatter(logging.Formatter):
    """Formats records as klog text lines."""

    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        line = "%s%02d%02d %02d:%02d:%02d.%06d %7d %s:%d] %s" % (
            _letter(record.levelno), t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, micros,
            self._pid, record.filename, record.lineno, record.getMessage(),
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """Formats records as one JSON object a line, with klog's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 6),
            "level": {"I": "info", "W": "warning", "E": "error", "F": "fatal"}[_letter(record.levelno)],
            "v": max(0, logging.INFO - record.levelno) if record.levelno < logging.INFO else 0,
            "caller": "%s:%d" % (record.filename, record.lineno),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(verbosity: int = 0, fmt: str = "klog") -> None:
    """Send pyflannel's log to stderr at klog verbosity ``verbosity``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("pyflannel").setLevel(V(verbosity))
