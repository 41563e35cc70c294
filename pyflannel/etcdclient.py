"""The one adapter to etcd: its v3 API through the gRPC gateway's JSON over HTTP.

etcd serves its v3 API as gRPC and, on the same port, as JSON over HTTP (``/v3/kv/range``,
``/v3/kv/txn``, ``/v3/lease/grant``, a streaming ``/v3/watch``; keys and values in base64, 64-bit
numbers as strings). pyflannel speaks the JSON with the standard library's ``http.client``, which
the daemon loads anyway: a gRPC client (python-etcd3, or etcd3gw with requests) costs three times
the CPU and twice the memory to import (see docs/performance.md).

The connections are the Kubernetes client's, with its bounds: CONNECT_TIMEOUT for the TCP connect
and the TLS handshake, REQUEST_TIMEOUT between two reads of an answer, and TCP keepalive with a
user timeout, so a peer that vanished without a reset is noticed within USER_TIMEOUT seconds. A
watch waits WATCH_READ_TIMEOUT between two messages; an idle watch then ends and is opened again
from its revision (etcd 3.4 sends no progress on a quiet watch more often than every 10 minutes).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .log import loopback_host, redact_url

from .kubeclient import CONNECT_TIMEOUT, REQUEST_TIMEOUT, WATCH_READ_TIMEOUT, LineReader, TooLarge, read_body
from .kubeclient import _HTTPConnection as HTTPConnection
from .kubeclient import _HTTPSConnection as HTTPSConnection

log = logging.getLogger(__name__)

# gRPC status codes the gateway returns in its error body.
OUT_OF_RANGE = 11  # "mvcc: required revision has been compacted"
UNAUTHENTICATED = 16  # an expired or unknown auth token


class EtcdError(Exception):
    """A request that failed: the gRPC code (0 for a transport error) and etcd's message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Compacted(EtcdError):
    """A watch's start revision was compacted away: list again, then watch from the list's revision."""

    def __init__(self, revision: int) -> None:
        super().__init__(OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted")
        self.revision = revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd returns it (``value`` is empty for a deletion)."""

    key: str
    value: bytes
    mod_revision: int
    lease: int
    create_revision: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """A watch event: ``deleted`` is False for a put."""

    kv: KeyValue
    deleted: bool


def read_password_file(path: str) -> str:
    """The password in a file (``--etcd-password-file``), without its trailing newline; raises OSError."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read(4096).rstrip("\r\n")


def prefix_end(prefix: str) -> str:
    """The range end that makes ``prefix`` a prefix range (etcd's ``GetPrefixRangeEnd``)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return "\0"
    raw[-1] += 1
    return raw.decode("utf-8", errors="surrogateescape")


def _b64(text: str | bytes) -> str:
    data = text.encode("utf-8", errors="surrogateescape") if isinstance(text, str) else text
    return base64.b64encode(data).decode()


def _kv(obj: dict[str, Any]) -> KeyValue:
    return KeyValue(base64.b64decode(obj.get("key") or "").decode("utf-8", errors="replace"),
                    base64.b64decode(obj.get("value") or ""), int(obj.get("mod_revision") or 0),
                    int(obj.get("lease") or 0), int(obj.get("create_revision") or 0))


def _loads(raw: bytes) -> Any:
    """JSON from etcd; ValueError for what cannot be read, too deep included."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _revision(doc: dict[str, Any]) -> int:
    return int((doc.get("header") or {}).get("revision") or 0)


@dataclass(frozen=True)
class _Endpoint:
    url: str  # as given, its password masked: the form logged
    netloc: str  # host and port, without userinfo
    https: bool


class EtcdClient:
    """Requests to an etcd cluster, trying the endpoints in turn as flanneld's client does.

    ``--etcd-cafile`` verifies the server (the system's CAs without it), ``--etcd-certfile`` and
    ``--etcd-keyfile`` authenticate this client, and ``--etcd-username``/``--etcd-password`` get an
    auth token that is renewed when etcd no longer accepts it. The password is sent only in the
    authenticate request and never appears in an error or a log line. Userinfo in an endpoint URL is not
    used (as in flanneld's etcd client), and is masked wherever the URL is logged; a password sent over
    plain HTTP to another host than this one gets one warning.
    """

    def __init__(self, endpoints: str, keyfile: str = "", certfile: str = "", cafile: str = "",
                 username: str = "", password: str = "") -> None:
        self.endpoints: list[_Endpoint] = []
        for url in filter(None, (e.strip() for e in endpoints.split(","))):
            try:
                parts = urlsplit(url)
                valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            except ValueError:
                valid = False
            if not valid:
                raise EtcdError(0, "invalid etcd endpoint %r" % redact_url(url))
            if "@" in parts.netloc:
                log.warning("Ignoring the user and password in the etcd endpoint %s: give them with --etcd-username "
                            "and --etcd-password-file", redact_url(url))
            self.endpoints.append(_Endpoint(redact_url(url), parts.netloc.rpartition("@")[2],
                                            parts.scheme == "https"))
        if not self.endpoints:
            raise EtcdError(0, "no etcd endpoints given")
        clear = [e.url for e in self.endpoints if not e.https and not loopback_host(e.url)]
        if username and clear:
            log.warning("The etcd password of --etcd-username %s, and the token it gets, are sent unencrypted to %s: "
                        "use https:// endpoints (with --etcd-cafile)", username, ", ".join(clear))
        self._ctx: ssl.SSLContext | None = None
        if any(e.https for e in self.endpoints):
            try:
                self._ctx = ssl.create_default_context(cafile=cafile or None)
                if certfile or keyfile:
                    self._ctx.load_cert_chain(certfile, keyfile or None)
            except (OSError, ssl.SSLError) as exc:
                raise EtcdError(0, "failed to load the etcd TLS files: %s" % exc) from exc
        self._username = username
        self._password = password
        self._token = ""
        self._current = 0  # the endpoint that answered last
        self._idle: list[tuple[int, http.client.HTTPConnection]] = []
        self._lock = threading.Lock()

    # -- transport -----------------------------------------------------------------------------------

    def _new_connection(self, ep: _Endpoint, timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if ep.https:
            conn = HTTPSConnection(ep.netloc, timeout=timeout, context=self._ctx)
        else:
            conn = HTTPConnection(ep.netloc, timeout=timeout)
        conn.connect()
        return conn

    def _send(self, path: str, body: dict[str, Any], timeout: float,
              reuse: bool) -> tuple[int, http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send to the endpoints in turn, from the last one that answered; the first that answers wins."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = self._token
        errors = []
        n = len(self.endpoints)
        start = self._current
        for i in range(n):
            index = (start + i) % n
            ep = self.endpoints[index]
            conn = None
            if reuse:
                with self._lock:
                    found = [c for c in self._idle if c[0] == index]
                    if found:
                        self._idle.remove(found[0])
                        conn = found[0][1]
            for attempt in (0, 1):
                try:
                    if conn is None:
                        conn = self._new_connection(ep, timeout)
                    conn.request("POST", path, body=data, headers=headers)
                    resp = conn.getresponse()
                    self._current = index
                    return index, conn, resp
                except (OSError, http.client.HTTPException) as exc:
                    if conn is not None:
                        conn.close()
                    conn = None
                    # A kept-alive connection the server closed: once more on a new one.
                    if attempt or not isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                                       BrokenPipeError)):
                        errors.append("%s: %s" % (ep.url, exc))
                        break
        raise EtcdError(0, "%s: %s" % (path, "; ".join(errors)))

    @staticmethod
    def _error(status: int, raw: bytes) -> EtcdError:
        try:
            doc = _loads(raw)
            return EtcdError(int(doc.get("code") or 0), str(doc.get("message") or doc.get("error"))[:1000])
        except (ValueError, AttributeError, TypeError):
            return EtcdError(0, "HTTP %d: %s" % (status, raw[:200].decode(errors="replace")))

    def _call_once(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        index, conn, resp = self._send(path, body, REQUEST_TIMEOUT, reuse=True)
        try:
            raw = read_body(resp)
        except (OSError, http.client.HTTPException, TooLarge) as exc:
            conn.close()
            raise EtcdError(0, "%s: %s" % (path, exc)) from exc
        if resp.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append((index, conn))
        if resp.status != 200:
            raise self._error(resp.status, raw)
        try:
            doc = _loads(raw)
        except ValueError as exc:
            raise EtcdError(0, "%s: invalid JSON from etcd: %s" % (path, exc)) from exc
        if not isinstance(doc, dict):
            raise EtcdError(0, "%s: invalid JSON from etcd" % path)
        return doc

    def _authenticate(self) -> None:
        self._token = ""
        doc = self._call_once("/v3/auth/authenticate", {"name": self._username, "password": self._password})
        self._token = str(doc.get("token") or "")

    def _with_auth(self, request: Callable[[], Any]) -> Any:
        """Run a request with a token when a username is set; a token etcd refused is renewed once."""
        if self._username and not self._token:
            self._authenticate()
        try:
            return request()
        except EtcdError as exc:
            if not self._username or exc.code != UNAUTHENTICATED:
                raise
        self._authenticate()
        return request()

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._with_auth(lambda: self._call_once(path, body))
        return result

    # -- the requests pyflannel makes ------------------------------------------------------------------

    def get(self, key: str, prefix: bool = False) -> tuple[list[KeyValue], int]:
        """The key (or every key under the prefix) and the store's revision as of the read."""
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        doc = self._call("/v3/kv/range", body)
        return [_kv(kv) for kv in doc.get("kvs") or ()], _revision(doc)

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: its ID and granted TTL in seconds."""
        doc = self._call("/v3/lease/grant", {"TTL": ttl})
        return int(doc.get("ID") or 0), int(doc.get("TTL") or 0)

    def revoke(self, lease: int) -> None:
        """Revoke a lease, deleting the keys attached to it."""
        self._call("/v3/lease/revoke", {"ID": str(lease)})

    def create(self, key: str, value: bytes, lease: int) -> int:
        """Put the key only if it does not exist (a transaction on version 0): the revision written, 0 if it did."""
        doc = self._call("/v3/kv/txn", {
            "compare": [{"target": "VERSION", "key": _b64(key), "version": "0"}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}],
        })
        return _revision(doc) if doc.get("succeeded") else 0

    def put(self, key: str, value: bytes, lease: int) -> int:
        """Put the key, attached to ``lease``: the revision written."""
        return _revision(self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease)}))

    def delete(self, key: str) -> None:
        """Delete the key."""
        self._call("/v3/kv/deleterange", {"key": _b64(key)})

    def watch(self, prefix: str, start_revision: int) -> Iterator[list[Event]]:
        """The events under ``prefix`` from ``start_revision`` on, one list a watch message.

        The first (empty) list comes when etcd has created the watch. The iterator ends when the
        watch is idle for WATCH_READ_TIMEOUT or etcd ends it; raises Compacted when the start
        revision is gone, EtcdError when the connection fails.
        """
        body = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                   "start_revision": str(start_revision), "progress_notify": True}}

        def open_watch() -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
            _, conn, resp = self._send("/v3/watch", body, WATCH_READ_TIMEOUT, reuse=False)
            if resp.status != 200:
                try:
                    raw = read_body(resp)
                except (OSError, http.client.HTTPException, TooLarge) as exc:
                    raw = str(exc).encode()
                conn.close()
                raise self._error(resp.status, raw)
            return conn, resp

        conn, resp = self._with_auth(open_watch)
        lines = LineReader(resp)
        try:
            while True:
                try:
                    line = lines.next()
                except TimeoutError as exc:
                    if exc.errno is None:  # the read timeout of an idle watch, not a dead connection
                        return
                    raise EtcdError(0, "watch of %s: %s" % (prefix, exc)) from exc
                except (OSError, http.client.HTTPException, TooLarge) as exc:
                    raise EtcdError(0, "watch of %s: %s" % (prefix, exc)) from exc
                if line is None:
                    return
                raw = bytes(line)
                if not raw.strip():
                    continue
                try:
                    doc = _loads(raw)
                except ValueError as exc:
                    raise EtcdError(0, "invalid watch message: %s" % exc) from exc
                if not isinstance(doc, dict):
                    raise EtcdError(0, "invalid watch message: not a JSON object")
                if "error" in doc:
                    err = doc["error"] if isinstance(doc["error"], dict) else doc
                    raise EtcdError(int(err.get("code") or 0), str(err.get("message") or err.get("error")))
                result = doc.get("result") or {}
                if int(result.get("compact_revision") or 0):
                    raise Compacted(int(result["compact_revision"]))
                if result.get("canceled"):
                    raise EtcdError(0, "watch canceled: %s" % (result.get("cancel_reason") or "by etcd"))
                yield [Event(_kv(e.get("kv") or {}), e.get("type") == "DELETE") for e in result.get("events") or ()]
        finally:
            conn.close()  # a watch may be left mid-stream: its connection is never reused
