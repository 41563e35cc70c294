"""The HTTP endpoints: ``/healthz`` as flanneld serves it, ``/readyz``, and ``/metrics``.

Probes and scrapes need only a request line and an answer, so this is a small HTTP/1.1 responder:
``http.server`` would add some 20 ms of imports to every start, two tenths of a second under the
manifest's 100m CPU limit. One thread serves every connection with non-blocking sockets, so its
resources are bounded (one thread, at most MAX_CONNECTIONS sockets of at most MAX_REQUEST bytes
each) and a client that connects and sends nothing, or reads its answer slowly, holds up no one:
it is dropped after TIMEOUT seconds, or earlier when MAX_CONNECTIONS others are waiting.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Collection
from ipaddress import ip_address
from typing import Any

log = logging.getLogger(__name__)

Route = Callable[[], tuple[int, bytes, str]]
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}
MAX_REQUEST = 8192
MAX_CONNECTIONS = 32
TIMEOUT = 5.0  # seconds a connection may take from accept to its answer sent


class _Conn:
    """One client connection: the request read so far, then the answer left to send."""

    __slots__ = ("sock", "deadline", "data", "out")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.data = b""
        self.out = b""


class Server:
    """Serves ``routes`` on one address from one thread until :meth:`shutdown`."""

    def __init__(self, addr: tuple[str, int], routes: dict[str, Route], local: Collection[str] = ()) -> None:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(addr)
            self._listener.listen(64)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.server_address: tuple[Any, ...] = self._listener.getsockname()
        self.routes = routes
        self.local = local  # paths answered only to clients on this host (as if unknown to the others)
        self._waker_r, self._waker_w = socket.socketpair()
        self._stopping = False
        self._conns: dict[socket.socket, _Conn] = {}  # in order of arrival
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._waker_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="http-%d" % self.server_address[1], daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stop serving, close every socket and wait for the thread."""
        self._stopping = True
        self._waker_w.send(b"x")
        self._thread.join()
        self._waker_w.close()

    def _serve(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._conns:
                    timeout = max(0.0, min(c.deadline for c in self._conns.values()) - time.monotonic())
                for key, events in self._sel.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is not self._waker_r:
                        conn = self._conns.get(key.fileobj)  # type: ignore[call-overload]
                        if conn is not None:  # else closed to make room earlier in this turn
                            self._io(conn)
                now = time.monotonic()
                for conn in [c for c in self._conns.values() if c.deadline <= now]:
                    self._close(conn)
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._sel.close()
            self._listener.close()
            self._waker_r.close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError as exc:  # out of file descriptors, say: pause rather than spin on the listener
            log.error("Failed to accept a connection: %s", exc)
            time.sleep(0.5)
            return
        if len(self._conns) >= MAX_CONNECTIONS:
            self._close(next(iter(self._conns.values())))  # the oldest is the likeliest to be stuck
        sock.setblocking(False)
        conn = _Conn(sock, time.monotonic() + TIMEOUT)
        self._conns[sock] = conn
        self._sel.register(sock, selectors.EVENT_READ)

    def _io(self, conn: _Conn) -> None:
        try:
            if conn.out:
                sent = conn.sock.send(conn.out)
                conn.out = conn.out[sent:]
                if not conn.out:
                    self._close(conn)
                return
            chunk = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not chunk and not conn.data:
            self._close(conn)
            return
        conn.data += chunk
        if chunk and b"\r\n\r\n" not in conn.data and b"\n\n" not in conn.data and len(conn.data) < MAX_REQUEST:
            return
        conn.out = self._answer(conn.data, conn.sock)
        self._sel.modify(conn.sock, selectors.EVENT_WRITE)

    def _answer(self, request: bytes, sock: socket.socket) -> bytes:
        parts = request.split(b"\r\n", 1)[0].split()
        path = parts[1].decode("latin-1").split("?", 1)[0] if len(parts) > 1 else ""
        route = self.routes.get(path) if path not in self.local or _on_this_host(sock) else None
        if len(parts) < 2:
            status, body, ctype = _text(400, "bad request\n")
        elif route is None:
            status, body, ctype = _text(404, "404 page not found\n")
        else:
            try:
                status, body, ctype = route()
            except Exception as exc:
                log.error("Error serving %s: %s", parts[1].decode("latin-1"), exc)
                status, body, ctype = _text(500, "internal error\n")
        head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (status, REASONS.get(status, ""), ctype, len(body))).encode()
        return head if parts[:1] == [b"HEAD"] else head + body

    def _close(self, conn: _Conn) -> None:
        del self._conns[conn.sock]
        self._sel.unregister(conn.sock)
        conn.sock.close()


def _on_this_host(sock: socket.socket) -> bool:
    """Whether the client of ``sock`` is on this host: it came over loopback, or from the address it
    connected to (a host's connection to its own address)."""
    try:
        peer, here = sock.getpeername()[0], sock.getsockname()[0]
        addr = ip_address(peer)
    except (OSError, ValueError):
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return peer == here or addr.is_loopback or bool(mapped and mapped.is_loopback)


def _text(status: int, text: str) -> tuple[int, bytes, str]:
    return status, text.encode(), "text/plain; charset=utf-8"


def health_routes(ready: Callable[[], bool], stalled: Callable[[], str]) -> dict[str, Route]:
    """``/healthz`` is 200 while the daemon makes progress (``stalled()`` says what does not, or '');
    ``/readyz`` is 200 once ready."""

    def healthz() -> tuple[int, bytes, str]:
        what = stalled()
        return _text(503, "flanneld is not making progress: %s" % what) if what else _text(200, "flanneld is running")

    return {
        "/healthz": healthz,
        "/readyz": lambda: _text(200, "flanneld is ready") if ready() else _text(503, "flanneld is not ready yet"),
    }


def metrics_routes(registry: Any) -> dict[str, Route]:
    """``/metrics`` in Prometheus' text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return {"/metrics": lambda: (200, generate_latest(registry), CONTENT_TYPE_LATEST)}


def serve(ip: str, port: int, routes: dict[str, Route], local: Collection[str] = ()) -> Server:
    """Serve ``routes`` on ip:port in a daemon thread (those of ``local`` only to clients on this host);
    raises OSError when the address cannot be bound."""
    server = Server((ip, port), routes, local)
    server.start()
    return server
