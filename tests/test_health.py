"""/healthz, /readyz and /metrics over real HTTP."""

from __future__ import annotations

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
    server = health.serve("127.0.0.1", 0, health.health_routes(lambda: ready[0]))
    port = server.server_address[1]
    try:
        assert get(port, "/healthz") == (200, "flanneld is running", "text/plain; charset=utf-8")
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
