"""A small, real Kubernetes API server for tests, the demo and benchmarks.

It serves the node and pod endpoints flannel uses over plain HTTP with the apiserver's
semantics: paged lists, chunked watch streams that resume from a resourceVersion (or answer
410 Expired once the history is gone), bookmarks, strategic-merge patches of ``nodes/<name>/status``
and Status error bodies, over HTTP or HTTPS (``make_test_certs`` makes a test CA). Tests drive the
state and inject faults through ``FakeKubeAPI``.

Standard library only (and the ``openssl`` command for test certificates).
"""

from __future__ import annotations

import base64
import binascii
import collections
import copy
import hashlib
import json
import math
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import uuid
from bisect import bisect_left, insort
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid",
    429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
}
_PATCH_TYPES = ("application/strategic-merge-patch+json", "application/merge-patch+json")
# Lists that a strategic merge patch merges item by item (patchMergeKey in the Node type).
_MERGE_KEYS = {("status", "conditions"): "type", ("status", "addresses"): "type"}
# How often an idle watch checks whether its client has hung up.
_CLIENT_CHECK_INTERVAL = 1.0
_STOP_JOIN_TIMEOUT = 0.8


class _ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.retry_after = retry_after


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _status(code: int, message: str, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _managed_fields() -> list[dict[str, Any]]:
    """A node's managed fields after a write now: one entry, with the write's time (the API server keeps one
    entry a manager, each with the time of that manager's last write; the tests need only the newest)."""
    return [{"manager": "kubeapi", "operation": "Update", "apiVersion": "v1", "time": _now(),
             "fieldsType": "FieldsV1", "fieldsV1": {}}]


def _merge(target: Any, patch: Any, strategic: bool, path: tuple[str, ...] = ()) -> Any:
    """JSON merge patch (RFC 7386); with ``strategic``, the lists in _MERGE_KEYS merge by key.

    Returns a new value and never mutates ``target``; untouched subtrees are shared with it.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        sub = path + (key,)
        if value is None:
            result.pop(key, None)
        elif strategic and sub in _MERGE_KEYS and isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, _MERGE_KEYS[sub])
        else:
            result[key] = _merge(result.get(key), value, strategic, sub)
    return result


def _merge_list(current: Any, patch: list[Any], key: str) -> list[Any]:
    items = list(current) if isinstance(current, list) else []
    for entry in patch:
        index = next((i for i, item in enumerate(items) if isinstance(item, dict) and isinstance(entry, dict)
                      and key in entry and item.get(key) == entry[key]), None)
        if index is None:
            items.append(copy.deepcopy(entry))
        else:
            items[index] = _merge(items[index], entry, True)
    return items


def _hex(name: str, tag: str) -> str:
    return hashlib.sha256(("%s/%s" % (name, tag)).encode()).hexdigest()


def _uuid_from_hex(h: str) -> str:
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:32])


_IMAGE_REPOS = (
    "registry.k8s.io/kube-proxy", "docker.io/flannel/flannel", "docker.io/flannel/flannel-cni-plugin",
    "registry.k8s.io/pause", "registry.k8s.io/coredns/coredns", "quay.io/prometheus/node-exporter",
    "602401143452.dkr.ecr.us-east-1.amazonaws.com/eks/aws-ebs-csi-driver",
    "123456789012.dkr.ecr.us-east-1.amazonaws.com/payments/checkout-service",
    "registry.k8s.io/ingress-nginx/controller", "docker.io/grafana/promtail",
)


def _cidrs(pod_cidr: str | list[str]) -> list[str]:
    return [pod_cidr] if isinstance(pod_cidr, str) else list(pod_cidr)


def realistic_node(name: str, pod_cidr: str | list[str] | None, internal_ip: str, images: int = 40) -> dict[str, Any]:
    """A node as a kubelet reports it (about 11.6 KB of JSON with 40 images); deterministic per name."""
    seed = int(_hex(name, "seed")[:8], 16)
    beat = "2024-05-14T09:%02d:%02dZ" % (seed % 60, seed // 60 % 60)
    boot = "2024-05-02T07:%02d:%02dZ" % (seed // 3600 % 60, seed // 7 % 60)
    zone = "us-east-1" + "abc"[seed % 3]

    def condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
        return {"type": kind, "status": status, "lastHeartbeatTime": beat, "lastTransitionTime": boot,
                "reason": reason, "message": message}

    spec: dict[str, Any] = {"providerID": "aws:///%s/i-0%s" % (zone, _hex(name, "instance")[:16])}
    if pod_cidr:
        spec.update(podCIDR=_cidrs(pod_cidr)[0], podCIDRs=_cidrs(pod_cidr))
    volumes = [_hex(name, "volume%d" % i)[:16] for i in range(3)]
    image_list = []
    for i in range(images):
        repo = _IMAGE_REPOS[i % len(_IMAGE_REPOS)]
        digest = _hex(name, "image%d" % i)
        image_list.append({"names": ["%s@sha256:%s" % (repo, digest), "%s:v1.%d.%d-r%d" % (repo, i, seed % 10, i % 3)],
                           "sizeBytes": 10_000_000 + int(digest[:6], 16) * 16})
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "node-role.kubernetes.io/worker": "", "node.kubernetes.io/instance-type": "m5.2xlarge",
                "topology.kubernetes.io/region": "us-east-1", "topology.kubernetes.io/zone": zone,
                "failure-domain.beta.kubernetes.io/region": "us-east-1",
                "failure-domain.beta.kubernetes.io/zone": zone, "topology.ebs.csi.aws.com/zone": zone,
                "node.kubernetes.io/lifecycle": "normal", "workload-pool": "general-purpose",
            },
            "annotations": {
                "alpha.kubernetes.io/provided-node-ip": internal_ip,
                "csi.volume.kubernetes.io/nodeid": '{"ebs.csi.aws.com":"i-0%s"}' % _hex(name, "instance")[:16],
                "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///var/run/containerd/containerd.sock",
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": spec,
        "status": {
            "capacity": {"cpu": "8", "ephemeral-storage": "203070420Ki", "hugepages-1Gi": "0",
                         "hugepages-2Mi": "0", "memory": "32866300Ki", "pods": "110"},
            "allocatable": {"cpu": "8", "ephemeral-storage": "187149698763", "hugepages-1Gi": "0",
                            "hugepages-2Mi": "0", "memory": "32763900Ki", "pods": "110"},
            "conditions": [
                # The fifth condition comes from node-problem-detector, which many clusters run;
                # NetworkUnavailable is left for the network plugin to set.
                condition("KernelDeadlock", "False", "KernelHasNoDeadlock", "kernel has no deadlock"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory",
                          "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": internal_ip}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": _hex(name, "machine")[:32],
                "systemUUID": _uuid_from_hex(_hex(name, "system")).upper(),
                "bootID": _uuid_from_hex(_hex(name, "boot")),
                "kernelVersion": "6.1.0-21-cloud-amd64",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "containerRuntimeVersion": "containerd://1.7.16",
                "kubeletVersion": "v1.30.1",
                "kubeProxyVersion": "v1.30.1",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "images": image_list,
            "volumesInUse": ["kubernetes.io/csi/ebs.csi.aws.com^vol-0%s" % v for v in volumes],
            "volumesAttached": [{"name": "kubernetes.io/csi/ebs.csi.aws.com^vol-0%s" % v, "devicePath": ""}
                                for v in volumes],
            "runtimeHandlers": [{"name": "runc", "features": {"recursiveReadOnlyMounts": True}},
                                {"name": "", "features": {"recursiveReadOnlyMounts": True}}],
        },
    }


class _Watch:
    """One open watch stream, as drop_watches() and stop() see it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dropped = False


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _client_gone(sock: socket.socket) -> bool:
    try:
        # socket.socket's recv, also on a TLS socket: a peek at the raw stream
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(5)
            self.request.do_handshake()  # here, in the connection's thread, not in the accepting one
            self.request.settimeout(None)
        super().setup()
        # Each reply and each watch chunk is written whole; Nagle would only delay them.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.api._register(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.api._unregister(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        self.server.api._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def reply(self, code: int, body: bytes, retry_after: int | None = None) -> None:
        head = "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\n" % (
            code, self.responses.get(code, ("",))[0], len(body), self.date_time_string())
        if retry_after is not None:
            head += "Retry-After: %d\r\n" % retry_after
        if self.close_connection:
            head += "Connection: close\r\n"
        self.wfile.write(head.encode("latin-1") + b"\r\n" + body)

    def start_chunked(self) -> None:
        self.wfile.write(("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                          "Date: %s\r\n\r\n" % self.date_time_string()).encode("latin-1"))

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, sock: socket.socket, api: FakeKubeAPI, tls: ssl.SSLContext | None) -> None:
        # BaseServer, not HTTPServer: the socket is bound already and getfqdn() could stall on DNS.
        socketserver.BaseServer.__init__(self, sock.getsockname(), _Handler)
        self.socket = sock
        self.api = api
        self.tls = tls

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client hanging up is routine
            super().handle_error(request, client_address)


class FakeKubeAPI:
    """An in-process Kubernetes API server for nodes and pods; all methods are thread-safe."""

    def __init__(self, token: str | None = None, history: int = 10000, bookmark_interval: float = 10.0) -> None:
        self.token = token
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        self._history = history
        self._bookmark_interval = bookmark_interval
        self._cond = threading.Condition(threading.RLock())
        self._rv = 1
        self._nodes: dict[str, dict[str, Any]] = {}
        self._node_json: dict[str, bytes] = {}
        self._names: list[str] = []  # sorted
        self._pods: dict[tuple[str, str], bytes] = {}
        self._events: collections.deque[tuple[int, bytes]] = collections.deque()
        self._event_rv = 0  # RV of the newest node event
        self._compacted_rv = 0  # new watches may start from this RV or later
        self._lost_rv = 0  # RV of the newest event dropped from the history
        self._failures: list[list[Any]] = []
        self._watches: set[_Watch] = set()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._closing = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle

    def start(self, sock: socket.socket | None = None, host: str = "127.0.0.1", port: int = 0,
              tls: ssl.SSLContext | None = None) -> str:
        """Serve in a daemon thread on ``sock`` (bound already) or on host:port; returns the base URL.

        The URL names the address the socket is bound to; with ``tls`` (a server context) it is https.
        """
        self._closing = False
        if sock is None:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        self._server = _Server(sock, self, tls)
        self._server.server_activate()
        bound_host, bound_port = sock.getsockname()[:2]
        self.url = "%s://%s:%d" % ("https" if tls else "http","[%s]" % bound_host if ":" in bound_host else bound_host, bound_port)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="kubeapi", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Close the listener, every keep-alive connection and watch stream, and join the threads."""
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._cond:
            self._closing = True
            conns = dict(self._conns)
            self._cond.notify_all()
        for sock in conns:
            _shutdown(sock)
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT
        for thread in [self._thread, *conns.values()]:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._server = self._thread = None

    def _register(self, sock: socket.socket) -> None:
        with self._cond:
            self._conns[sock] = threading.current_thread()
            if self._closing:  # accepted while stop() ran
                _shutdown(sock)

    def _unregister(self, sock: socket.socket) -> None:
        with self._cond:
            self._conns.pop(sock, None)

    # ----- state, as tests drive it

    def add_node(self, name: str, pod_cidr: str | list[str] | None = None, annotations: dict[str, str] | None = None,
                 internal_ip: str | None = None, realistic: bool = False) -> dict[str, Any]:
        """Create a node (ValueError if it exists); ``realistic`` builds it with realistic_node().

        A list ``pod_cidr`` (a dual-stack node's, IPv4 first) is spec.podCIDRs; its first entry is spec.podCIDR.
        """
        if realistic:
            if internal_ip is None:
                h = int(_hex(name, "ip")[:6], 16)
                internal_ip = "10.%d.%d.%d" % (h >> 16, h >> 8 & 255, h & 255 or 1)
            node = realistic_node(name, pod_cidr, internal_ip)
        else:
            addresses = [{"type": "Hostname", "address": name}]
            if internal_ip:
                addresses.insert(0, {"type": "InternalIP", "address": internal_ip})
            spec = {"podCIDR": _cidrs(pod_cidr)[0], "podCIDRs": _cidrs(pod_cidr)} if pod_cidr else {}
            node = {"kind": "Node", "apiVersion": "v1",
                    "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                    "spec": spec, "status": {"addresses": addresses}}
        if annotations:
            node["metadata"]["annotations"] = {**node["metadata"].get("annotations", {}), **annotations}
        try:
            return json.loads(self._create(node))
        except _ApiError as exc:
            raise ValueError(str(exc)) from None

    def set_pod_cidr(self, name: str, cidr: str | list[str]) -> None:
        """Set spec.podCIDR and spec.podCIDRs=[cidr] (a list: podCIDRs, and its first entry as podCIDR)."""
        self.patch_node(name, {"spec": {"podCIDR": _cidrs(cidr)[0], "podCIDRs": _cidrs(cidr)}})

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Strategic-merge ``patch`` into the whole node (spec and status alike); returns the node.

        KeyError if the node is missing, ValueError if the patch is invalid.
        """
        with self._cond:
            try:
                return json.loads(self._patch(name, patch, strategic=True, keep=None))
            except _ApiError as exc:
                raise ValueError(str(exc)) from None

    def delete_node(self, name: str) -> None:
        """Delete a node (KeyError if missing)."""
        with self._cond:
            self._delete(name)

    def get_node(self, name: str) -> dict[str, Any]:
        """A deep copy of the node (KeyError if missing)."""
        with self._cond:
            return json.loads(self._node_json[name])

    def node_names(self) -> list[str]:
        """The node names, sorted."""
        with self._cond:
            return list(self._names)

    def add_pod(self, namespace: str, name: str, node_name: str) -> None:
        """Create or replace a running pod scheduled to ``node_name``."""
        with self._cond:
            self._rv += 1
            self._pods[(namespace, name)] = _dumps({
                "kind": "Pod", "apiVersion": "v1",
                "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                             "creationTimestamp": _now(), "resourceVersion": str(self._rv)},
                "spec": {"nodeName": node_name,
                         "containers": [{"name": name, "image": "registry.k8s.io/pause:3.9"}]},
                "status": {"phase": "Running"},
            })

    # ----- fault injection and accounting

    def fail_next(self, method: str, path_regex: str, status: int = 500, count: int = 1,
                  message: str = "injected failure", retry_after: int | None = None) -> None:
        """Answer the next ``count`` requests whose method matches and whose path with query matches
        ``path_regex`` (re.search) with ``status`` and a Status body with ``message`` (and a
        ``Retry-After`` header if given)."""
        with self._cond:
            self._failures.append([method.upper(), re.compile(path_regex), status, count, message, retry_after])

    def compact(self) -> None:
        """Forget the watch history: resuming from any older resourceVersion gets 410 Expired."""
        with self._cond:
            if self._events:
                self._lost_rv = self._events[-1][0]
            self._events.clear()
            self._compacted_rv = self._rv
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Abruptly close every open watch connection (no final chunk)."""
        with self._cond:
            for watch in self._watches:
                watch.dropped = True
                _shutdown(watch.sock)
            self._cond.notify_all()

    def count(self, method: str, path_prefix: str) -> int:
        """How many served requests had this method and a path (with query) starting with the prefix."""
        with self._cond:
            return sum(1 for m, p in self.requests if m == method and p.startswith(path_prefix))

    # ----- state transitions; callers of _commit, _update, _patch and _delete hold self._cond

    def _commit(self, node: dict[str, Any], event: bytes) -> bytes:
        """Give ``node`` the next RV, store it (unless DELETED) and emit the event; returns its JSON."""
        self._rv += 1
        node["metadata"] = {**node["metadata"], "resourceVersion": str(self._rv)}
        name = node["metadata"]["name"]
        data = _dumps(node)
        if event == b"DELETED":
            del self._nodes[name], self._node_json[name]
            self._names.pop(bisect_left(self._names, name))
        else:
            if name not in self._nodes:
                insort(self._names, name)
            self._nodes[name] = node
            self._node_json[name] = data
        self._emit(event, data)
        return data

    def _emit(self, event: bytes, data: bytes) -> None:
        """Send an event of the current RV to the watches and keep it in the history."""
        self._events.append((self._rv, b'{"type":"%s","object":%s}\n' % (event, data)))
        while len(self._events) > self._history:
            self._compacted_rv = self._lost_rv = self._events.popleft()[0]
        self._event_rv = self._rv
        self._cond.notify_all()

    def touch_node(self, name: str) -> None:
        """Send a node down the watches again, MODIFIED with a new resourceVersion and nothing else changed,
        as a kubelet's status heartbeat sends a whole node: for benchmarks, a heavy node's update at the cost
        of a copy of its JSON rather than of encoding it (KeyError if missing)."""
        with self._cond:
            node = self._nodes[name]
            old = b'"resourceVersion":%s' % _dumps(node["metadata"]["resourceVersion"])
            self._rv += 1
            node["metadata"] = {**node["metadata"], "resourceVersion": str(self._rv)}
            data = self._node_json[name].replace(old, b'"resourceVersion":"%d"' % self._rv, 1)
            self._node_json[name] = data
            self._emit(b"MODIFIED", data)

    def _create(self, node: dict[str, Any]) -> bytes:
        name = (node.get("metadata") or {}).get("name")
        if not name or not isinstance(name, str):
            raise _ApiError(422, "Node \"\" is invalid: metadata.name: Required value: name is required", "Invalid")
        with self._cond:
            if name in self._nodes:
                raise _ApiError(409, 'nodes "%s" already exists' % name, "AlreadyExists")
            meta = {**node["metadata"], "uid": str(uuid.uuid4()), "creationTimestamp": _now()}
            meta["managedFields"] = _managed_fields()
            return self._commit({**node, "kind": "Node", "apiVersion": "v1", "metadata": meta}, b"ADDED")

    def _update(self, name: str, new: dict[str, Any], keep: str | None) -> bytes:
        """Replace a node with ``new`` but keep its ``keep`` field ("spec", "status" or None for none).

        Like the apiserver's node strategies, a PUT or PATCH of the node keeps its status and one of
        nodes/<name>/status keeps its spec. Nothing changes, and no event is sent, if ``new`` equals
        the node.
        """
        old = self._nodes[name]
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            raise _ApiError(400, "metadata must be an object")
        if meta.get("resourceVersion") not in (None, "", old["metadata"]["resourceVersion"]):
            raise _ApiError(409, 'Operation cannot be fulfilled on nodes "%s": the object has been modified; '
                                 "please apply your changes to the latest version and try again" % name)
        new = {**new, "kind": "Node", "apiVersion": "v1",
               "metadata": {**meta, **{k: old["metadata"][k] for k in ("name", "uid", "creationTimestamp",
                                                                      "resourceVersion")}}}
        if keep is not None:
            if keep in old:
                new[keep] = old[keep]
            else:
                new.pop(keep, None)
        new["metadata"]["managedFields"] = old["metadata"].get("managedFields", [])
        if new == old:
            return self._node_json[name]
        new["metadata"]["managedFields"] = _managed_fields()
        return self._commit(new, b"MODIFIED")

    def _patch(self, name: str, patch: dict[str, Any], strategic: bool, keep: str | None) -> bytes:
        if name not in self._nodes:
            raise KeyError(name)
        return self._update(name, _merge(self._nodes[name], patch, strategic), keep)

    def _delete(self, name: str) -> None:
        self._commit(self._nodes[name], b"DELETED")

    def _events_after(self, rv: int) -> list[bytes]:
        lines = []
        for event_rv, line in reversed(self._events):
            if event_rv <= rv:
                break
            lines.append(line)
        lines.reverse()
        return lines

    # ----- HTTP

    def _handle(self, h: _Handler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        method = h.command
        try:
            with self._cond:
                self.requests.append((method, h.path))
                if self.token is not None and h.headers.get("Authorization") != "Bearer " + self.token:
                    raise _ApiError(401, "Unauthorized")
                for rule in self._failures:
                    if rule[0] == method and rule[1].search(h.path):
                        rule[3] -= 1
                        if not rule[3]:
                            self._failures.remove(rule)
                        raise _ApiError(rule[2], rule[4], retry_after=rule[5])
            url = urlsplit(h.path)
            query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if method == "GET" and parts == ["api", "v1", "nodes"] and query.get("watch") in ("true", "1"):
                self._watch(h, query)
                return
            code, body = self._route(method, parts, query, raw, h.headers.get("Content-Type", ""))
        except _ApiError as exc:
            h.reply(exc.code, _dumps(_status(exc.code, str(exc), exc.reason)), exc.retry_after)
            return
        h.reply(code, body)

    def _route(self, method: str, parts: list[str], query: dict[str, str], raw: bytes,
               content_type: str) -> tuple[int, bytes]:
        match parts:
            case ["api", "v1", "nodes"]:
                if method == "GET":
                    return 200, self._list(query)
                if method == "POST":
                    return 201, self._create(_json_object(raw))
            case ["api", "v1", "nodes", name]:
                if method in ("GET", "PUT", "PATCH", "DELETE"):
                    return 200, self._node_request(method, name, "status", raw, content_type)
            case ["api", "v1", "nodes", name, "status"]:
                if method in ("GET", "PUT", "PATCH"):
                    return 200, self._node_request(method, name, "spec", raw, content_type)
            case ["api", "v1", "namespaces", namespace, "pods", name]:
                if method == "GET":
                    with self._cond:
                        pod = self._pods.get((namespace, name))
                    if pod is None:
                        raise _ApiError(404, 'pods "%s" not found' % name)
                    return 200, pod
            case _:
                raise _ApiError(404, "the server could not find the requested resource")
        raise _ApiError(405, "the server does not allow this method on the requested resource")

    def _node_request(self, method: str, name: str, keep: str, raw: bytes, content_type: str) -> bytes:
        """GET, PUT, PATCH or DELETE of nodes/<name> (``keep`` "status") or nodes/<name>/status ("spec")."""
        media = content_type.split(";")[0].strip().lower()
        if method == "PATCH" and media not in _PATCH_TYPES:
            raise _ApiError(415, "the body of the request was in an unknown format - accepted media types "
                                 "include: %s" % ", ".join(_PATCH_TYPES))
        body = _json_object(raw) if method in ("PUT", "PATCH") else None
        with self._cond:
            node = self._nodes.get(name)
            if node is None:
                raise _ApiError(404, 'nodes "%s" not found' % name)
            if method == "GET":
                return self._node_json[name]
            if method == "PATCH":
                return self._patch(name, body, media == _PATCH_TYPES[0], keep)
            if method == "PUT":
                if (body.get("metadata") or {}).get("name") != name:
                    raise _ApiError(400, "the name of the object (%s) does not match the name on the URL (%s)"
                                    % ((body.get("metadata") or {}).get("name"), name))
                return self._update(name, body, keep)
            self._delete(name)
        return _dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                       "details": {"name": name, "kind": "nodes", "uid": node["metadata"]["uid"]}})

    def _list(self, query: dict[str, str]) -> bytes:
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            raise _ApiError(400, "invalid limit: %r" % query["limit"]) from None
        token = query.get("continue")
        selector = query.get("fieldSelector") or ""
        if selector and not selector.startswith("metadata.name="):
            raise _ApiError(400, "field label not supported: %s" % selector.split("=", 1)[0])
        with self._cond:
            if token:
                rv, start = _decode_continue(token)
            else:
                rv, start = self._rv, ""
            if selector:
                wanted = selector.split("=", 1)[1]
                first, pool = 0, [wanted] if wanted in self._node_json else []
            else:
                first, pool = bisect_left(self._names, start), self._names
            names = pool[first:first + limit] if limit > 0 else pool[first:]
            items = b",".join([self._node_json[n] for n in names])
            remaining = len(pool) - first - len(names)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if remaining > 0:
            # Like the apiserver, every page reports the first page's RV. Later pages show the
            # current nodes, though, not a snapshot: the next page starts after the last name returned.
            meta["continue"] = _encode_continue(rv, names[-1] + "\x00")
            meta["remainingItemCount"] = remaining
        return b'{"kind":"NodeList","apiVersion":"v1","metadata":%s,"items":[%s]}' % (_dumps(meta), items)

    def _watch(self, h: _Handler, query: dict[str, str]) -> None:
        """Stream node events after the query's resourceVersion (all nodes as ADDED if unset or 0)."""
        try:
            timeout = float(query.get("timeoutSeconds") or 0)
            since = int(query.get("resourceVersion") or 0)
        except ValueError as exc:
            raise _ApiError(400, "invalid watch parameter: %s" % exc) from None
        watch = _Watch(h.connection)
        with self._cond:
            last: int | None
            if since == 0:
                first = [b'{"type":"ADDED","object":%s}\n' % self._node_json[n] for n in self._names]
                last = self._rv
            elif since < self._compacted_rv:
                first, last = [self._expired_line(since)], None
            else:
                first, last = self._events_after(since), max(since, self._rv)
            self._watches.add(watch)
        try:
            h.start_chunked()
            if first:
                h.write_chunk(b"".join(first))
            if last is None or self._follow(h, watch, last, timeout, query.get("allowWatchBookmarks") in ("true", "1")):
                h.end_chunked()
            else:
                h.close_connection = True
        except OSError:
            h.close_connection = True
        finally:
            with self._cond:
                self._watches.discard(watch)

    def _follow(self, h: _Handler, watch: _Watch, last: int, timeout: float, bookmarks: bool) -> bool:
        """Send live events after RV ``last``; True when the stream may end cleanly, False when cut."""
        now = time.monotonic()
        deadline = now + timeout if timeout > 0 else math.inf
        next_bookmark = now + self._bookmark_interval if bookmarks else math.inf
        while True:
            with self._cond:
                wake = min(deadline, next_bookmark, now + _CLIENT_CHECK_INTERVAL)
                self._cond.wait_for(lambda: self._closing or watch.dropped or self._event_rv > last
                                    or last < self._lost_rv, wake - time.monotonic())
                if self._closing or watch.dropped:
                    return False
                expired = last < self._lost_rv
                if expired:
                    lines = [self._expired_line(last)]
                else:
                    lines = self._events_after(last)
                    last = max(last, self._rv)
            if lines:
                h.write_chunk(b"".join(lines))
            now = time.monotonic()
            if expired or now >= deadline:
                return True
            if now >= next_bookmark:
                h.write_chunk(b'{"type":"BOOKMARK","object":{"kind":"Node","apiVersion":"v1",'
                              b'"metadata":{"resourceVersion":"%d"}}}\n' % last)
                next_bookmark = now + self._bookmark_interval
            elif not lines and _client_gone(watch.sock):
                return False

    def _expired_line(self, rv: int) -> bytes:
        status = _status(410, "too old resource version: %d (%d)" % (rv, self._compacted_rv), "Expired")
        return _dumps({"type": "ERROR", "object": status}) + b"\n"


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _ApiError(400, "invalid JSON in the request body: %s" % exc) from None
    if not isinstance(body, dict):
        raise _ApiError(400, "the request body must be a JSON object")
    return body


def _encode_continue(rv: int, start: str) -> str:
    token = _dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start})
    return base64.urlsafe_b64encode(token).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return int(data["rv"]), str(data["start"])
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise _ApiError(400, "continue key is not valid: %s" % exc) from None


def make_test_certs(directory: str, ip: str = "127.0.0.1") -> tuple[str, str, str]:
    """A test CA and a server certificate for ``ip`` signed by it, made with ``openssl`` in ``directory``.

    Returns the paths of the CA certificate, the server certificate and its key.
    """
    ca_key, ca, key, csr, cert = (os.path.join(directory, n) for n in ("ca.key", "ca.crt", "server.key",
                                                                       "server.csr", "server.crt"))
    ext = os.path.join(directory, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n" % ip)
    for cmd in (
        ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", ca_key,
         "-out", ca, "-days", "2", "-subj", "/CN=kubeapi-test-ca"],
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
         "-out", csr, "-subj", "/CN=kube-apiserver"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):
        subprocess.run(["openssl", *cmd], check=True, capture_output=True)
    return ca, cert, key


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context for ``FakeKubeAPI.start(tls=...)``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx
