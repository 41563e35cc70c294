"""The one adapter to the Kubernetes API: node list and watch, node status patches, pod reads.

Requests go over the standard library's ``http.client``; responses are read as JSON (a watch line
by line) and only the fields the daemon uses are kept, never typed client objects. Importing the
kubernetes client alone costs more CPU than the whole start-up may use under the manifest's 100m
limit (see the README's Performance section), so it is loaded only to read a ``--kubeconfig-file``,
where its loader brings every kubeconfig auth method. In a pod (the DaemonSet) the in-cluster
service account is read directly, and its token is re-read whenever the kubelet rotates it.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from . import __version__

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
USER_AGENT = "pyflannel/%s" % __version__


class ApiError(Exception):
    """An API request that failed: an HTTP status (0 for a transport error) and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _TokenFile:
    """A bearer token read from a file, re-read when the file changes (service-account rotation)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._value = ""

    def __call__(self) -> str:
        st = os.stat(self.path)
        if (st.st_mtime, st.st_ino) != self._stamp:
            with open(self.path) as f:
                self._value = "Bearer " + f.read().strip()
            self._stamp = (st.st_mtime, st.st_ino)
        return self._value


def _in_cluster() -> tuple[str, ssl.SSLContext, Callable[[], str]]:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST", ""), os.environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ApiError(0, "unable to load in-cluster configuration, KUBERNETES_SERVICE_HOST and "
                          "KUBERNETES_SERVICE_PORT must be defined")
    if ":" in host:
        host = "[%s]" % host
    token = _TokenFile(os.path.join(SERVICE_ACCOUNT, "token"))
    try:
        token()
        ctx = ssl.create_default_context(cafile=os.path.join(SERVICE_ACCOUNT, "ca.crt"))
    except OSError as exc:
        raise ApiError(0, "unable to load in-cluster configuration: %s" % exc) from exc
    return "https://%s:%s" % (host, port), ctx, token


def _kubeconfig(path: str) -> tuple[str, ssl.SSLContext | None, Callable[[], str]]:
    from kubernetes.client.configuration import Configuration
    from kubernetes.config.kube_config import load_kube_config

    cfg = Configuration()
    load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)  # type: ignore[no-untyped-call]
    ctx = None
    if cfg.host.startswith("https"):
        ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if not cfg.verify_ssl:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)

    def auth() -> str:
        # The client's refresh hook renews expiring tokens (exec plugins, OIDC) on this call.
        settings: dict[str, Any] = dict(cfg.auth_settings())
        return str((settings.get("BearerToken") or {}).get("value") or "")

    return cfg.host, ctx, auth


class KubeClient:
    """Node and pod requests against the API server, configured as flanneld configures client-go."""

    def __init__(self, kube_api_url: str = "", kubeconfig_file: str = "") -> None:
        server, ctx, auth = "", None, None
        try:
            if kubeconfig_file:
                server, ctx, auth = _kubeconfig(kubeconfig_file)
            elif not kube_api_url:
                log.warning("Neither --kubeconfig nor --master was specified.  Using the inClusterConfig.  "
                            "This might not work.")
                server, ctx, auth = _in_cluster()
        except Exception as exc:  # the loaders raise ConfigException, OSError, YAML and SSL errors
            raise ApiError(0, "fail to create kubernetes config: %s" % exc) from exc
        if kube_api_url:
            server = kube_api_url
        url = urlsplit(server.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ApiError(0, "fail to create kubernetes config: invalid API server URL %r" % server)
        self.host = server
        self._https = url.scheme == "https"
        self._netloc = url.netloc
        self._base = url.path
        self._ctx = ctx if ctx is not None or not self._https else ssl.create_default_context()
        self._auth = auth
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(self._netloc, timeout=CONNECT_TIMEOUT, context=self._ctx)
            else:
                conn = http.client.HTTPConnection(self._netloc, timeout=CONNECT_TIMEOUT)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _request(self, method: str, path: str, query: dict[str, Any] | None, body: bytes | None,
                 content_type: str | None, timeout: float) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        url = self._base + path + ("?" + urlencode(query) if query else "")
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            if self._auth is not None:
                token = self._auth()
                if token:
                    headers["Authorization"] = token
            for attempt in (0, 1):
                conn = self._connect(timeout)
                try:
                    conn.request(method, url, body=body, headers=headers)
                    return conn, conn.getresponse()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    conn.close()
                    if attempt:  # a kept-alive connection the server had closed: retry once on a new one
                        raise
            raise AssertionError("unreachable")
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(0, "%s %s%s: %s" % (method, self.host, url, exc)) from exc

    def _call(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
              content_type: str | None = None, decode: Callable[[bytes], Any] = json.loads) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        conn, resp = self._request(method, path, query, data, content_type, REQUEST_TIMEOUT)
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ApiError(0, "%s %s: %s" % (method, path, exc)) from exc
        if resp.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        try:
            doc = decode(raw) if 200 <= resp.status < 300 else json.loads(raw)
        except ValueError:
            doc = None
        if not 200 <= resp.status < 300:
            message = doc.get("message") if isinstance(doc, dict) else None
            raise ApiError(resp.status, message or "%d %s" % (resp.status, resp.reason))
        if not isinstance(doc, dict):
            raise ApiError(resp.status, "invalid JSON from the API server for %s %s" % (method, path))
        return doc

    def list_nodes(self, limit: int, cont: str = "", field_selector: str = "",
                   decode: Callable[[bytes], Any] = json.loads) -> dict[str, Any]:
        """One page of the node list, parsed by ``decode`` (which may skip the fields it does not need)."""
        query: dict[str, Any] = {"limit": limit}
        if cont:
            query["continue"] = cont
        if field_selector:
            query["fieldSelector"] = field_selector
        return self._call("GET", "/api/v1/nodes", query, decode=decode)

    def watch_nodes(self, resource_version: str, timeout_seconds: int) -> Iterator[dict[str, Any]]:
        """The watch events after ``resource_version``, one dict each, until the server ends the stream.

        The read timeout exceeds the server-side timeout, so a dead connection cannot hang the watch.
        """
        query = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": timeout_seconds}
        conn, resp = self._request("GET", "/api/v1/nodes", query, None, None, timeout_seconds + 30)
        try:
            if resp.status != 200:
                try:
                    message = json.loads(resp.read()).get("message")
                except (ValueError, AttributeError, OSError, http.client.HTTPException):
                    message = None
                raise ApiError(resp.status, message or "%d %s" % (resp.status, resp.reason))
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise ApiError(0, "watch of nodes: %s" % exc) from exc
                if not line:
                    return
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as exc:
                        raise ApiError(0, "invalid watch event: %s" % exc) from exc
        finally:
            conn.close()  # a watch may be left mid-stream: its connection is never reused

    def patch_node_status(self, name: str, patch: dict[str, Any]) -> None:
        """A strategic-merge patch of ``nodes/<name>/status``."""
        self._call("PATCH", "/api/v1/nodes/%s/status" % name, body=patch,
                   content_type="application/strategic-merge-patch+json")

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The pod object."""
        return self._call("GET", "/api/v1/namespaces/%s/pods/%s" % (namespace, name))
