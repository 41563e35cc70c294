"""/healthz, /readyz and /metrics over real HTTP."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

from pyflannel import health, metrics


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers["Content-Type"]


def test_health_endpoints() -> None:
    ready = [False]
    stalled = [""]
    server = health.serve("127.0.0.1", 0, health.health_routes(lambda: ready[0], lambda: stalled[0]))
    port = server.server_address[1]
    try:
        assert get(port, "/healthz") == (200, "flanneld is running", "text/plain; charset=utf-8")
        stalled[0] = "the main loop made no progress for 95s (at most 90s allowed)"
        assert get(port, "/healthz")[:2] == (503, "flanneld is not making progress: " + stalled[0])
        stalled[0] = ""
        assert get(port, "/healthz", "POST")[0] == 200
        assert get(port, "/readyz")[:2] == (503, "flanneld is not ready yet")
        ready[0] = True
        assert get(port, "/readyz")[:2] == (200, "flanneld is ready")
        assert get(port, "/other")[:2] == (404, "404 page not found\n")
        assert get(port, "/healthz", "HEAD")[:2] == (200, "")
    finally:
        server.shutdown()


def test_metrics_endpoint() -> None:
    registry = metrics.enable("9.9.9")
    try:
        metrics.LEASES.set(3)
        metrics.LEASE_EVENTS.labels("added").inc()
        server = health.serve("127.0.0.1", 0, health.metrics_routes(registry))
        try:
            status, text, ctype = get(server.server_address[1], "/metrics")
        finally:
            server.shutdown()
    finally:
        metrics.disable()
    assert status == 200 and ctype.startswith("text/plain")
    assert "pyflannel_leases 3.0" in text
    assert 'pyflannel_lease_events_total{type="added"} 1.0' in text
    assert 'pyflannel_build_info{version="9.9.9"} 1.0' in text
    assert metrics.LEASES is metrics.LEASE_EVENTS  # back to the no-op


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_stuck_clients_do_not_stall_the_probe() -> None:
    """More silent or slow clients than the server keeps, then a probe: answered at once, by one thread."""
    server = health.serve("127.0.0.1", 0, health.health_routes(lambda: True, lambda: ""))
    port = server.server_address[1]
    threads = threading.active_count()
    stuck = []
    try:
        for i in range(health.MAX_CONNECTIONS + 8):
            sock = connect(port)
            if i % 2:
                sock.sendall(b"GET /hea")  # half a request line, never finished
            stuck.append(sock)
        started = time.monotonic()
        assert get(port, "/healthz")[:2] == (200, "flanneld is running")
        took = time.monotonic() - started
        print("probe answered in %.3fs beside %d stuck clients" % (took, len(stuck)))
        assert took < 1.0
        assert threading.active_count() == threads
    finally:
        for sock in stuck:
            sock.close()
        server.shutdown()


def test_a_silent_client_is_dropped_after_the_timeout() -> None:
    server = health.serve("127.0.0.1", 0, health.health_routes(lambda: True, lambda: ""))
    try:
        with connect(server.server_address[1]) as sock:
            started = time.monotonic()
            assert sock.recv(100) == b""  # closed by the server
            took = time.monotonic() - started
        assert health.TIMEOUT - 0.5 < took < health.TIMEOUT + 2
    finally:
        server.shutdown()


def test_a_failing_route_answers_500_and_the_server_goes_on() -> None:
    def broken() -> tuple[int, bytes, str]:
        raise RuntimeError("boom")

    server = health.serve("127.0.0.1", 0, {"/broken": broken, **health.health_routes(lambda: True, lambda: "")})
    port = server.server_address[1]
    try:
        assert get(port, "/broken")[0] == 500
        assert get(port, "/healthz")[0] == 200
    finally:
        server.shutdown()


def test_a_request_split_in_pieces_is_answered() -> None:
    server = health.serve("127.0.0.1", 0, health.health_routes(lambda: True, lambda: ""))
    try:
        with connect(server.server_address[1]) as sock:
            for piece in (b"GET /rea", b"dyz HTTP/1.1\r\nHost: x\r\n", b"\r\n"):
                sock.sendall(piece)
                time.sleep(0.05)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"flanneld is ready")
    finally:
        server.shutdown()


class _Sock:
    def __init__(self, peer: str, here: str) -> None:
        self.peer, self.here = peer, here

    def getpeername(self) -> tuple[str, int]:
        return self.peer, 40000

    def getsockname(self) -> tuple[str, int]:
        return self.here, 8471


def test_local_routes_answer_only_clients_on_this_host() -> None:
    server = health.serve("127.0.0.1", 0, {"/probes": lambda: (200, b"{}", "application/json"),
                                           "/healthz": lambda: (200, b"ok", "text/plain")}, local=("/probes",))
    try:
        assert get(server.server_address[1], "/probes") == (200, "{}", "application/json")
    finally:
        server.shutdown()
    on_this_host = health._on_this_host
    assert on_this_host(_Sock("127.0.0.5", "127.0.0.1"))  # type: ignore[arg-type]
    assert on_this_host(_Sock("::ffff:127.0.0.1", "::ffff:127.0.0.1"))  # type: ignore[arg-type]
    assert on_this_host(_Sock("192.168.56.11", "192.168.56.11"))  # type: ignore[arg-type]  # the node's own address
    assert not on_this_host(_Sock("10.244.1.5", "10.244.1.1"))  # type: ignore[arg-type]  # a pod
    assert not on_this_host(_Sock("192.168.56.12", "192.168.56.11"))  # type: ignore[arg-type]  # another node
    assert not on_this_host(_Sock("::ffff:10.0.0.1", "::ffff:10.0.0.2"))  # type: ignore[arg-type]
