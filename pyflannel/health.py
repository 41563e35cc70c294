"""The HTTP endpoints: ``/healthz`` as flanneld serves it, ``/readyz``, and ``/metrics``."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: type, routes: dict[str, Callable[[], tuple[int, bytes, str]]]) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)
        self.routes = routes


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _answer(self) -> None:
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            status, body, ctype = 404, b"404 page not found\n", "text/plain; charset=utf-8"
        else:
            status, body, ctype = route()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _text(status: int, text: str) -> tuple[int, bytes, str]:
    return status, text.encode(), "text/plain; charset=utf-8"


def health_routes(ready: Callable[[], bool]) -> dict[str, Callable[[], tuple[int, bytes, str]]]:
    """``/healthz`` is 200 while the process lives (flanneld's meaning); ``/readyz`` is 200 once ready."""
    return {
        "/healthz": lambda: _text(200, "flanneld is running"),
        "/readyz": lambda: _text(200, "flanneld is ready") if ready() else _text(503, "flanneld is not ready yet"),
    }


def metrics_routes(registry: Any) -> dict[str, Callable[[], tuple[int, bytes, str]]]:
    """``/metrics`` in Prometheus' text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return {"/metrics": lambda: (200, generate_latest(registry), CONTENT_TYPE_LATEST)}


def serve(ip: str, port: int, routes: dict[str, Callable[[], tuple[int, bytes, str]]]) -> _Server:
    """Serve ``routes`` on ip:port in a daemon thread; raises OSError when the address cannot be bound."""
    server = _Server((ip, port), _Handler, routes)
    threading.Thread(target=server.serve_forever, name="http-%d" % port, daemon=True).start()
    return server
