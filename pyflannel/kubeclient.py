"""The one adapter to the Kubernetes API: node list and watch, node status patches, pod reads.

Requests go over the standard library's ``http.client``; responses are read as JSON (a watch line
by line) and only the fields the daemon uses are kept, never typed client objects. Nothing is read
without a bound: an answer may hold MAX_BODY bytes and a watch line MAX_LINE, and a document the
decoder cannot read (too deep, not JSON) is an ApiError, not an exception of the decoder. Importing the
kubernetes client alone costs more CPU than the whole start-up may use under the manifest's 100m
limit (see docs/performance.md), so it is loaded only to read a ``--kubeconfig-file``,
where its loader brings every kubeconfig auth method. In a pod (the DaemonSet) the in-cluster
service account is read directly, and its token is re-read whenever the kubelet rotates it.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from . import __version__
from .log import loopback_host, redact_url

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # the TCP connect and the TLS handshake
REQUEST_TIMEOUT = 30.0  # between two reads of an answer
# Between two lines of a watch: the API server sends a bookmark about once a minute on an idle watch.
WATCH_READ_TIMEOUT = 90.0
# A peer that stops acknowledging (a load balancer or NAT that lost the connection's state sends no
# RST) is noticed by the kernel: keepalive probes start after KEEPALIVE_IDLE s without traffic, and
# unacknowledged probes or data end the connection after USER_TIMEOUT s, idle or not.
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
USER_TIMEOUT = 30
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
USER_AGENT = "pyflannel/%s" % __version__
NODES_ACCESS = "list and watch on nodes"
# The most bytes read of one answer, and of one watch line (one event). etcd stores objects of at most
# 1.5 MiB by default (--max-request-bytes), so a line holds one node with room to spare; a node list
# page over MAX_BODY is asked for again in smaller pages (subnet.kube.list_nodes).
MAX_BODY = 8 << 20
MAX_LINE = 4 << 20
# Go's encoding/json, and so the API server, accepts 10,000 levels of nesting: every object it stores
# must decode here too. The daemon raises Python's recursion limit above this (daemon.main).
MAX_DEPTH = 10_000
THREAD_STACK = 16 << 20  # bytes of stack of each thread (address space: only the pages used take memory)


class ApiError(Exception):
    """An API request that failed: an HTTP status (0 for a transport error) and the server's message.

    ``retry_after`` is the seconds of a 429's or 503's ``Retry-After`` header (0 without one).
    """

    def __init__(self, status: int, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class TooLarge(ApiError):
    """An answer or a watch line longer than its bound (MAX_BODY, MAX_LINE); its connection was closed."""


class Undecodable(ApiError):
    """An answer or a watch event that is not JSON of the expected shape (or nests deeper than Python can
    follow); the watch lists the nodes again rather than resume after it."""


def allow_deep_json() -> None:
    """Let this process decode what the API server stores, MAX_DEPTH levels of nesting, in any thread
    started from now on. (Python stops at 1,000; json.loads needs some 2 MiB of stack for 10,000.)"""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), MAX_DEPTH + 1000))
    threading.stack_size(THREAD_STACK)


def read_body(resp: http.client.HTTPResponse, limit: int | None = None) -> bytes:
    """The whole body of an answer; TooLarge once it passes ``limit`` bytes (MAX_BODY by default; the
    caller closes the connection).

    A body of known length is read in one piece; a chunked one in pieces of a MiB, so that a body is in
    memory about once, not twice as a list of chunks and their join."""
    limit = MAX_BODY if limit is None else limit
    if resp.length is not None:
        if resp.length > limit:
            raise TooLarge(0, "the answer is %d bytes, more than %d" % (resp.length, limit))
        return resp.read()
    body = bytearray()
    while piece := resp.read(1 << 20):
        body += piece
        if len(body) > limit:
            raise TooLarge(0, "the answer is more than %d bytes" % limit)
    return bytes(body)


class LineReader:
    """The lines of a streamed answer (a watch), read a MiB at a time: http.client's readline reads 8 KiB
    at a time through Python code, twice the CPU of decoding a node of 1.5 MB. Each line is a memoryview
    into the reader's buffer, valid until the next call; a line over ``limit`` bytes (MAX_LINE by
    default) raises TooLarge."""

    def __init__(self, resp: http.client.HTTPResponse, limit: int | None = None) -> None:
        self._resp = resp
        self._limit = MAX_LINE if limit is None else limit
        self._buf = bytearray()
        self._start = 0  # where the next line begins in _buf
        self._line: memoryview | None = None

    def next(self) -> memoryview | None:
        """The next line with its newline (the last one may have none); None at the end of the answer.
        Raises TooLarge, and what reading raises (TimeoutError, OSError, http.client.HTTPException)."""
        if self._line is not None:
            self._line.release()  # the buffer cannot move while a view of it is out
            self._line = None
        buf = self._buf
        end = buf.find(b"\n", self._start)
        while end < 0:
            if len(buf) - self._start > self._limit:
                raise TooLarge(0, "a line of more than %d bytes" % self._limit)
            del buf[:self._start]
            self._start = 0
            scanned = len(buf)
            piece = self._resp.read1(1 << 20)
            if not piece:
                if not buf:
                    return None
                end = len(buf) - 1
                break
            buf += piece
            end = buf.find(b"\n", scanned)
        if end + 1 - self._start > self._limit:
            raise TooLarge(0, "a line of more than %d bytes" % self._limit)
        with memoryview(buf) as whole:
            self._line = whole[self._start:end + 1]
        self._start = end + 1
        return self._line


def loads(raw: bytes | memoryview) -> Any:
    """``json.loads`` of bytes or of a line a LineReader gave."""
    return json.loads(bytes(raw) if isinstance(raw, memoryview) else raw)


def decode_json(raw: bytes | memoryview, decode: Callable[[Any], Any] = loads) -> Any:
    """``decode(raw)``, with Undecodable for what it cannot read: not JSON, not of its shape, too deep."""
    try:
        return decode(raw)
    except (ValueError, RecursionError) as exc:  # msgspec's errors are ValueErrors
        raise Undecodable(0, "%s: %s" % (type(exc).__name__, str(exc)[:200])) from None


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value or 0))
    except ValueError:  # an HTTP date: the API server sends seconds
        return 0.0


def _open(conn: http.client.HTTPConnection, connect: Callable[[], None]) -> None:
    """Connect within CONNECT_TIMEOUT, then set keepalive and the connection's own read timeout."""
    read_timeout = conn.timeout
    conn.timeout = CONNECT_TIMEOUT
    try:
        connect()
    finally:
        conn.timeout = read_timeout
    sock = conn.sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT * 1000)
    sock.settimeout(read_timeout)


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        _open(self, super().connect)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        _open(self, super().connect)


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


def _in_cluster(service_account: str) -> tuple[str, ssl.SSLContext, _TokenFile]:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST", ""), os.environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ApiError(0, "unable to load in-cluster configuration, KUBERNETES_SERVICE_HOST and "
                          "KUBERNETES_SERVICE_PORT must be defined")
    if ":" in host:
        host = "[%s]" % host
    token = _TokenFile(os.path.join(service_account, "token"))
    try:
        token()
        ctx = ssl.create_default_context(cafile=os.path.join(service_account, "ca.crt"))
    except OSError as exc:
        raise ApiError(0, "unable to load in-cluster configuration: %s" % exc) from exc
    return "https://%s:%s" % (host, port), ctx, token


def _kubeconfig(path: str) -> tuple[str, ssl.SSLContext | None, Callable[[], str]]:
    try:
        from kubernetes.client.configuration import Configuration
        from kubernetes.config.kube_config import load_kube_config
    except ImportError:
        # The image leaves the kubernetes client out: a pod uses its service account.
        raise ImportError("--kubeconfig-file needs the kubernetes package, which is not installed "
                          "(pip install 'pyflannel[kubeconfig]'; in a pod, omit it to use the service account)") from None

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
    """Node and pod requests against the API server, configured as flanneld configures client-go.

    ``service_account`` is the directory of the in-cluster token and CA (tests point it elsewhere).
    """

    def __init__(self, kube_api_url: str = "", kubeconfig_file: str = "",
                 service_account: str = SERVICE_ACCOUNT) -> None:
        server, ctx = "", None
        auth: Callable[[], str] | None = None
        # Who the API server sees, and what it refused on a 401: said in the errors.
        self.identity = "the user of --kube-api-url (no credentials)"
        self._credentials = "this client sent no credentials; give it a --kubeconfig-file"
        try:
            if kubeconfig_file:
                server, ctx, auth = _kubeconfig(kubeconfig_file)
                self.identity = "the user of %s" % kubeconfig_file
                self._credentials = "the credentials in %s were refused" % kubeconfig_file
            elif not kube_api_url:
                log.warning("Neither --kubeconfig nor --master was specified.  Using the inClusterConfig.  "
                            "This might not work.")
                server, ctx, token = _in_cluster(service_account)
                auth = token
                self.identity = "the service account"
                self._credentials = "the token at %s was refused" % token.path
        except Exception as exc:  # the loaders raise ConfigException, OSError, YAML and SSL errors
            raise ApiError(0, "fail to create kubernetes config: %s" % exc) from exc
        if kube_api_url:
            server = kube_api_url
        try:
            url = urlsplit(server.rstrip("/"))
            valid = url.scheme in ("http", "https") and bool(url.hostname)
        except ValueError:
            valid = False
        if not valid:
            raise ApiError(0, "fail to create kubernetes config: invalid API server URL %r" % redact_url(server))
        self.host = redact_url(server)
        if "@" in url.netloc:
            log.warning("Ignoring the user and password in the API server URL %s: the credentials come from the "
                        "kubeconfig or the service account", self.host)
        if url.scheme == "http" and auth is not None and not loopback_host(server):
            log.warning("The credentials of %s are sent unencrypted to %s: use an https:// API server URL",
                        self.identity, self.host)
        self._https = url.scheme == "https"
        self._netloc = url.netloc.rpartition("@")[2]
        self._base = url.path
        self._ctx = ctx if ctx is not None or not self._https else ssl.create_default_context()
        self._auth = auth
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connect(self, timeout: float, fresh: bool) -> http.client.HTTPConnection:
        conn = None
        if not fresh:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
        if conn is None:
            if self._https:
                conn = _HTTPSConnection(self._netloc, timeout=timeout, context=self._ctx)
            else:
                conn = _HTTPConnection(self._netloc, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop_idle(self) -> None:
        """Close the kept-alive connections: after a transport error they are likely dead too."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _error(self, resp: http.client.HTTPResponse, raw: bytes, needs: str) -> ApiError:
        """The ApiError for a non-2xx answer; 401 and 403 say which token or permission is wrong."""
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None
        message = (doc.get("message") if isinstance(doc, dict) else None) or "%d %s" % (resp.status, resp.reason)
        if not isinstance(message, str):
            message = "%d %s" % (resp.status, resp.reason)
        if resp.status == 401:
            message = "%s: %s" % (message, self._credentials)
        elif resp.status == 403:
            message = "%s: forbidden: %s needs %s (ClusterRole flannel)" % (message, self.identity, needs)
        return ApiError(resp.status, message, _retry_after(resp.getheader("Retry-After")))

    def _request(self, method: str, path: str, query: dict[str, Any] | None, body: bytes | None,
                 content_type: str | None, timeout: float,
                 fresh: bool = False) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
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
                conn = self._connect(timeout, fresh)
                try:
                    conn.request(method, url, body=body, headers=headers)
                    return conn, conn.getresponse()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    conn.close()
                    if attempt:  # a kept-alive connection the server had closed: retry once on a new one
                        raise
            raise AssertionError("unreachable")
        except (OSError, http.client.HTTPException) as exc:
            self._drop_idle()
            raise ApiError(0, "%s %s%s: %s" % (method, self.host, url, exc)) from exc

    def _call(self, method: str, path: str, needs: str, query: dict[str, Any] | None = None, body: Any = None,
              content_type: str | None = None, decode: Callable[[bytes], Any] | None = json.loads) -> Any:
        """The decoded answer (None when ``decode`` is None: the answer is read and dropped)."""
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        conn, resp = self._request(method, path, query, data, content_type, REQUEST_TIMEOUT)
        try:
            raw = read_body(resp)
        except TooLarge as exc:
            conn.close()
            raise TooLarge(0, "%s %s: %s" % (method, path, exc)) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._drop_idle()
            raise ApiError(0, "%s %s: %s" % (method, path, exc)) from exc
        if resp.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        if not 200 <= resp.status < 300:
            raise self._error(resp, raw, needs)
        if decode is None:
            return None
        try:
            doc = decode_json(raw, decode)
        except Undecodable as exc:
            raise Undecodable(resp.status, "invalid JSON from the API server for %s %s: %s" % (method, path, exc)) \
                from None
        if not isinstance(doc, dict):
            raise Undecodable(resp.status, "invalid JSON from the API server for %s %s" % (method, path))
        return doc

    def list_nodes(self, limit: int, cont: str = "", field_selector: str = "",
                   decode: Callable[[bytes], Any] = json.loads) -> dict[str, Any]:
        """One page of the node list, parsed by ``decode`` (which may skip the fields it does not need).

        Raises TooLarge for a page of more than MAX_BODY bytes, Undecodable for one ``decode`` cannot read."""
        query: dict[str, Any] = {"limit": limit}
        if cont:
            query["continue"] = cont
        if field_selector:
            query["fieldSelector"] = field_selector
        page: dict[str, Any] = self._call("GET", "/api/v1/nodes", NODES_ACCESS, query, decode=decode)
        return page

    def watch_nodes(self, resource_version: str, timeout_seconds: int,
                    decode: Callable[[bytes | memoryview], Any] = loads) -> Iterator[dict[str, Any]]:
        """The watch events after ``resource_version``, each parsed by ``decode``, until the server ends the stream.

        Each watch has a connection of its own. A read times out after WATCH_READ_TIMEOUT without
        a line (bookmarks included), and the kernel ends a connection whose peer went silent
        within KEEPALIVE_IDLE + USER_TIMEOUT, so a dead connection cannot hang the watch. A line of
        more than MAX_LINE bytes raises TooLarge, an event ``decode`` cannot read Undecodable.
        """
        query = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": timeout_seconds}
        conn, resp = self._request("GET", "/api/v1/nodes", query, None, None, WATCH_READ_TIMEOUT, fresh=True)
        try:
            if resp.status != 200:
                try:
                    raw = read_body(resp)
                except (OSError, http.client.HTTPException, TooLarge):
                    raw = b""
                raise self._error(resp, raw, NODES_ACCESS)
            lines = LineReader(resp)
            while True:
                try:
                    line = lines.next()
                except TimeoutError as exc:
                    self._drop_idle()
                    raise ApiError(0, "watch of nodes: no event or bookmark for %ds" % WATCH_READ_TIMEOUT) from exc
                except (OSError, http.client.HTTPException) as exc:
                    self._drop_idle()
                    raise ApiError(0, "watch of nodes: %s" % exc) from exc
                if line is None:
                    return
                if len(line) > 2 or bytes(line).strip():
                    try:
                        event = decode_json(line, decode)
                    except Undecodable as exc:
                        raise Undecodable(0, "invalid watch event: %s" % exc) from None
                    if not isinstance(event, dict):
                        raise Undecodable(0, "invalid watch event: not a JSON object")
                    yield event
        finally:
            conn.close()  # a watch may be left mid-stream: its connection is never reused

    def patch_node_status(self, name: str, patch: dict[str, Any]) -> None:
        """A strategic-merge patch of ``nodes/<name>/status``."""
        self._call("PATCH", "/api/v1/nodes/%s/status" % name, "patch on nodes/status", body=patch,
                   content_type="application/strategic-merge-patch+json", decode=None)

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The pod object."""
        pod: dict[str, Any] = self._call("GET", "/api/v1/namespaces/%s/pods/%s" % (namespace, name),
                                         "get on pods in namespace %s" % namespace)
        return pod
