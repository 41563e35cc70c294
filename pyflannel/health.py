"""The HTTP endpoints: ``/healthz`` as flanneld serves it, ``/readyz``, and ``/metrics``.

Probes and scrapes need only a request line and an answer, so this is a small HTTP/1.1 responder
on ``socketserver``: ``http.server`` would add some 20 ms of imports to every start, two tenths of
a second under the manifest's 100m CPU limit.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any

Route = Callable[[], tuple[int, bytes, str]]
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}
MAX_REQUEST = 8192
TIMEOUT = 5.0


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], routes: dict[str, Route]) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)
        self.routes = routes


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(TIMEOUT)
        data = b""
        try:
            while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            parts = data.split(b"\r\n", 1)[0].split()
            route = self.server.routes.get(parts[1].decode("latin-1").split("?", 1)[0]) if len(parts) > 1 else None
            if len(parts) < 2:
                status, body, ctype = _text(400, "bad request\n")
            elif route is None:
                status, body, ctype = _text(404, "404 page not found\n")
            else:
                status, body, ctype = route()
            head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                    % (status, REASONS.get(status, ""), ctype, len(body))).encode()
            conn.sendall(head if parts[:1] == [b"HEAD"] else head + body)
        except OSError:
            pass


def _text(status: int, text: str) -> tuple[int, bytes, str]:
    return status, text.encode(), "text/plain; charset=utf-8"


def health_routes(ready: Callable[[], bool]) -> dict[str, Route]:
    """``/healthz`` is 200 while the process lives (flanneld's meaning); ``/readyz`` is 200 once ready."""
    return {
        "/healthz": lambda: _text(200, "flanneld is running"),
        "/readyz": lambda: _text(200, "flanneld is ready") if ready() else _text(503, "flanneld is not ready yet"),
    }


def metrics_routes(registry: Any) -> dict[str, Route]:
    """``/metrics`` in Prometheus' text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return {"/metrics": lambda: (200, generate_latest(registry), CONTENT_TYPE_LATEST)}


def serve(ip: str, port: int, routes: dict[str, Route]) -> _Server:
    """Serve ``routes`` on ip:port in a daemon thread; raises OSError when the address cannot be bound."""
    server = _Server((ip, port), routes)
    threading.Thread(target=server.serve_forever, name="http-%d" % port, daemon=True).start()
    return server
