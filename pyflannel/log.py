"""Logging in klog's format (the format flanneld and every Kubernetes component use), or JSON.

klog: ``Lmmdd hh:mm:ss.uuuuuu <pid padded to 7> file:line] msg`` on stderr, where L is I, W, E
or F. ``-v N`` enables the verbose lines logged at ``V(n)`` for n <= N; ``-vmodule pattern=N,...``
does so for the source files whose base name (without ``.py``) matches the glob ``pattern``, or
whose path does when the pattern contains ``/``; the first matching pattern counts, as in klog.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
import os
import sys
import time
from urllib.parse import urlsplit

__all__ = ["JsonFormatter", "KlogFormatter", "V", "loopback_host", "parse_vmodule", "printable", "redact_url",
           "redact_urls", "setup"]

MAX_MESSAGE = 16 << 10  # characters of one log message; the rest is cut (values from the API are far shorter)


def V(n: int) -> int:
    """The logging level of klog's verbosity ``n`` (logged with letter I when enabled).

    ``INFO - n``, except that 0 is skipped: to :mod:`logging` a level of 0 (NOTSET) means "take the
    parent's level", so V(20) is -1, V(21) -2, and so on.
    """
    level = logging.INFO - n
    return level if level > logging.NOTSET else level - 1


def _verbosity(levelno: int) -> int:
    """The ``n`` of a record logged at ``V(n)``; 0 for INFO and above."""
    if levelno >= logging.INFO:
        return 0
    return logging.INFO - levelno - (1 if levelno < logging.NOTSET else 0)


def printable(text: str, limit: int = 0) -> str:
    """``text`` with every character that is not printable escaped as Python writes it (``\\n``,
    ``\\x1b``, ``\\u2028``), so that a value from another node can neither start a forged log line nor
    send a terminal escape; cut to ``limit`` characters (with ``...``) when given."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if limit and len(text) > limit:
        text = text[:limit] + "..."
    return text


def _message(record: logging.LogRecord) -> str:
    """A record's message, printable and at most MAX_MESSAGE characters."""
    msg = printable(record.getMessage())
    if len(msg) > MAX_MESSAGE:
        msg = "%s... (%d more characters)" % (msg[:MAX_MESSAGE], len(msg) - MAX_MESSAGE)
    return msg


def redact_url(url: str) -> str:
    """``url`` fit for a log line: a password in its userinfo (``http://user:secret@host``) masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return "%s://%s:********@%s%s%s" % (scheme, user, host, slash, path)


def redact_urls(text: str) -> str:
    """A comma-separated list of URLs (``--etcd-endpoints``) fit for a log line."""
    return ",".join(redact_url(url) for url in text.split(","))


def loopback_host(url: str) -> bool:
    """Whether a URL's host is this machine (localhost or a loopback address): plain HTTP to it stays local."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_vmodule(spec: str) -> list[tuple[str, int]]:
    """klog's ``-vmodule`` syntax, ``pattern=N,...``, as (pattern, N) pairs; raises ValueError with klog's text."""
    out = []
    for item in spec.split(","):
        if not item:
            continue
        fields = item.split("=")
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise ValueError("syntax error: expect comma-separated list of filename=N")
        digits = fields[1][1:] if fields[1][:1] in "+-" else fields[1]
        # strconv.ParseInt(s, 10, 32)
        if not (digits.isascii() and digits.isdigit()) or not -(1 << 31) <= int(fields[1]) < 1 << 31:
            raise ValueError("syntax error: expect comma-separated list of filename=N")
        level = int(fields[1])
        if level < 0:
            raise ValueError("negative value for vmodule level")
        out.append((fields[0], level))
    return out


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
            self._pid, record.filename, record.lineno, _message(record),
        )
        if record.exc_info:  # a traceback's lines, each printable
            line += "\n" + "\n".join(printable(part) for part in self.formatException(record.exc_info).split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """Formats records as one JSON object a line, with klog's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 6),
            "level": {"I": "info", "W": "warning", "E": "error", "F": "fatal"}[_letter(record.levelno)],
            "v": _verbosity(record.levelno),
            "caller": "%s:%d" % (record.filename, record.lineno),
            "msg": _message(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class _VModule(logging.Filter):
    """Passes a verbose record if ``-v`` or the first ``-vmodule`` pattern matching its file enables it."""

    def __init__(self, verbosity: int, patterns: list[tuple[str, int]]) -> None:
        super().__init__()
        self._verbosity = verbosity
        self._patterns = patterns
        self._levels: dict[str, int] = {}  # source file -> its -vmodule verbosity

    def _level(self, pathname: str) -> int:
        level = self._levels.get(pathname)
        if level is None:
            path = pathname[:-3] if pathname.endswith(".py") else pathname
            name = os.path.basename(path)
            level = next((n for pattern, n in self._patterns
                          if fnmatch.fnmatchcase(path if "/" in pattern else name, pattern)), self._verbosity)
            self._levels[pathname] = level
        return level

    def filter(self, record: logging.LogRecord) -> bool:
        n = _verbosity(record.levelno)
        return n <= self._verbosity or n <= self._level(record.pathname)


def setup(verbosity: int = 0, fmt: str = "klog", vmodule: str = "") -> None:
    """Send pyflannel's log to stderr at klog verbosity ``verbosity`` (and ``-vmodule``'s, see above).

    A negative verbosity counts as 0: INFO lines are always written, as klog does. Raises
    ValueError for a bad ``vmodule``.
    """
    patterns = parse_vmodule(vmodule)
    verbosity = max(0, verbosity)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KlogFormatter())
    level = V(max([verbosity] + [n for _, n in patterns]))
    if patterns:
        handler.addFilter(_VModule(verbosity, patterns))
    if level < logging.NOTSET:
        # Records below a handler's level are dropped (its default is 0), and so are records at
        # or below logging.disable's level (default 0) on every logger.
        handler.setLevel(level)
        logging.disable(level - 1)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("pyflannel").setLevel(level)
