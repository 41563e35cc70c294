"""The Kubernetes subnet manager: leases from node pod CIDRs and flannel's node annotations.

One thread lists the nodes (in pages) and then watches them, keeping a small record a node, never
the node object. It turns the records into the other nodes' leases and reports which nodes'
leases changed; the daemon converges the kernel to them.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network, ip_network
from typing import Any, TypedDict

from .. import metrics
from ..kubeclient import ApiError, KubeClient
from ..lease import Lease, LeaseError
from ..log import V
from .annotations import AnnotationKeys

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = 100  # a page of kubelet-sized nodes is ~1.2 MB of JSON, ~3.4 MB once parsed
WATCH_TIMEOUT_RANGE = (300, 600)  # seconds, spread like client-go's reflector
MAX_BACKOFF = 30.0


@dataclass(slots=True)
class NodeInfo:
    """The few fields of a node that flannel uses."""

    name: str
    pod_cidr: str
    pod_cidrs: tuple[str, ...]  # empty when it only repeats pod_cidr
    annotations: dict[str, str]  # only the keys under the annotation prefix


def node_info(obj: dict[str, Any], prefix: str) -> NodeInfo:
    """Extract a NodeInfo from a node object as the API returns it.

    Thousands of these are kept, so the annotation keys (the same on every node) are interned.
    """
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    annotations = {sys.intern(k): v for k, v in (meta.get("annotations") or {}).items() if k.startswith(prefix)}
    pod_cidr = spec.get("podCIDR") or ""
    pod_cidrs = tuple(spec.get("podCIDRs") or ())
    return NodeInfo(meta.get("name", ""), pod_cidr, () if pod_cidrs == (pod_cidr,) else pod_cidrs, annotations)


class _Metadata(TypedDict, total=False):
    name: str
    annotations: dict[str, str]


class _Spec(TypedDict, total=False):
    podCIDR: str
    podCIDRs: list[str]


class _Node(TypedDict, total=False):
    metadata: _Metadata
    spec: _Spec


class _NodeList(TypedDict, total=False):
    metadata: dict[str, Any]
    items: list[_Node]


@functools.cache
def _node_list_decoder() -> Any:
    import msgspec  # only when a list has several pages: the import alone costs 11 ms of CPU

    return msgspec.json.Decoder(_NodeList)


def decode_node_list(raw: bytes) -> Any:
    """A node list page as ``json.loads`` would give it, less every field :func:`node_info` does not read.

    The status, labels and managed fields, nine tenths of a kubelet's node, are skipped rather than
    built: a 5,000-node list parses in a sixth of the CPU. A page of an unexpected shape is parsed whole.
    """
    try:
        return _node_list_decoder().decode(raw)
    except ValueError:  # not shaped like a node list, or not JSON: json.loads reads it or says why not
        return json.loads(raw)


_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(r"%s(?:\.%s){3}" % (_OCTET, _OCTET))
_DOTTED_CIDR = re.compile(r"(%s(?:\.%s){3})/(3[0-2]|[12]?[0-9])" % (_OCTET, _OCTET))


def _ipv4_address(text: str) -> IPv4Address:
    """``IPv4Address(text)``; a plain dotted quad skips ipaddress' parser, a third of a lease's CPU."""
    return IPv4Address(socket.inet_aton(text)) if _DOTTED_QUAD.fullmatch(text) else IPv4Address(text)


def _ipv4_network(cidr: str) -> IPv4Network:
    """``IPv4Network(cidr, strict=False)``, the same way."""
    m = _DOTTED_CIDR.fullmatch(cidr)
    return IPv4Network((socket.inet_aton(m[1]), int(m[2])), strict=False) if m else IPv4Network(cidr, strict=False)


def node_to_lease(node: NodeInfo, keys: AnnotationKeys) -> Lease:
    """The lease a node's annotations and pod CIDR describe; raises ValueError with flanneld's text."""
    try:
        public_ip = _ipv4_address(node.annotations.get(keys.backend_public_ip, ""))
    except ValueError:
        raise ValueError("Invalid IP address format") from None
    if log.isEnabledFor(V(2)):
        log.log(V(2), "Creating the node lease for IPv4. This is the n.Spec.PodCIDRs: [%s]",
                " ".join(node.pod_cidrs or (node.pod_cidr,)))
    cidr = node.pod_cidr
    if node.pod_cidrs:
        cidr = next((c for c in node.pod_cidrs if ":" not in c), "")
        if not cidr:
            raise ValueError("missing IPv4 address on n.Spec.PodCIDRs")
    if not cidr:
        raise ValueError("pod cidr not assigned")
    try:
        subnet = _ipv4_network(cidr)
    except ValueError:
        raise ValueError("invalid CIDR address: %s" % cidr) from None
    return Lease(subnet, public_ip, node.annotations.get(keys.backend_type, ""),
                 node.annotations.get(keys.backend_data, ""))


class KubeSubnetManager:
    """Leases from the Kubernetes API (flannel's ``subnet/kube``)."""

    def __init__(self, client: KubeClient, node_name: str, keys: AnnotationKeys, prefix: str,
                 network: IPv4Network, on_change: Callable[[set[str]], None]) -> None:
        self.client = client
        self.node_name = node_name
        self.keys = keys
        self.prefix = prefix
        self.network = network
        self.on_change = on_change
        self.synced = threading.Event()
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeInfo] = {}
        self._leases: dict[str, Lease] = {}
        self._rv = ""

    @property
    def name(self) -> str:
        return "Kubernetes Subnet Manager - %s" % self.node_name

    # -- the node cache --------------------------------------------------------------------------

    def own_node(self) -> NodeInfo | None:
        """This node's record in the cache (flannel reads its node from the cache, never with GET)."""
        with self._lock:
            return self._nodes.get(self.node_name)

    def leases(self) -> dict[str, Lease]:
        """The other nodes' valid leases, by node name."""
        with self._lock:
            return dict(self._leases)

    def lease_of(self, name: str) -> Lease | None:
        """One node's valid lease."""
        with self._lock:
            return self._leases.get(name)

    def _lease(self, node: NodeInfo, old: NodeInfo | None) -> Lease | None:
        if node.annotations.get(self.keys.subnet_kube_managed) != "true":
            return None
        # Log a bad node once when it changes, not on every relist.
        quiet = old is not None and old.annotations == node.annotations and old.pod_cidrs == node.pod_cidrs \
            and old.pod_cidr == node.pod_cidr
        try:
            return node_to_lease(node, self.keys)
        except ValueError as exc:
            if not quiet:
                log.info("Error turning node \"%s\" to lease: %s", node.name, exc)
            return None

    def _update(self, node: NodeInfo) -> bool:
        """Store a node; True if its lease changed. Called with the lock held."""
        old = self._nodes.get(node.name)
        self._nodes[node.name] = node
        if node.name == self.node_name:
            return True
        lease = self._lease(node, old)
        if lease == self._leases.get(node.name):
            return False
        if lease is None:
            del self._leases[node.name]
            metrics.LEASE_EVENTS.labels("removed").inc()
        else:
            self._leases[node.name] = lease
            metrics.LEASE_EVENTS.labels("added").inc()
        return True

    def _delete(self, name: str) -> bool:
        self._nodes.pop(name, None)
        if self._leases.pop(name, None) is not None:
            metrics.LEASE_EVENTS.labels("removed").inc()
            return True
        return name == self.node_name

    # -- list and watch --------------------------------------------------------------------------

    def _list(self) -> None:
        """List every node in pages and replace the cache with the result."""
        # Parsed pages hold no reference cycles: the cycle collector's passes over thousands of
        # node dicts would only cost CPU while listing.
        gc.disable()
        try:
            self._list_pages()
        finally:
            gc.enable()

    def _list_pages(self) -> None:
        nodes: dict[str, NodeInfo] = {}
        cont = ""
        decode: Callable[[bytes], Any] = json.loads  # decode_node_list earns its import from the second page on
        while True:
            page = self.client.list_nodes(LIST_PAGE_SIZE, cont, decode=decode)
            for obj in page.get("items") or ():
                info = node_info(obj, self.prefix)
                nodes[info.name] = info
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                break
            decode = decode_node_list
        changed: set[str] = set()
        with self._lock:
            for name in list(self._nodes):
                if name not in nodes and self._delete(name):
                    changed.add(name)
            for info in nodes.values():
                if self._update(info):
                    changed.add(info.name)
            self._rv = meta.get("resourceVersion") or ""
            metrics.LEASES.set(len(self._leases))
        if changed:
            self.on_change(changed)

    def _watch(self, stop: threading.Event) -> None:
        """Apply watch events until the stream ends; raises ApiError(410) when the cache must be relisted."""
        timeout = random.randint(*WATCH_TIMEOUT_RANGE)
        for event in self.client.watch_nodes(self._rv, timeout):
            if stop.is_set():
                return
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                raise ApiError(int(obj.get("code") or 0), obj.get("message") or "watch error")
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            changed = False
            with self._lock:
                if kind in ("ADDED", "MODIFIED"):
                    changed = self._update(node_info(obj, self.prefix))
                elif kind == "DELETED":
                    changed = self._delete((obj.get("metadata") or {}).get("name", ""))
                if rv:
                    self._rv = rv
                metrics.LEASES.set(len(self._leases))
            if changed:
                self.on_change({(obj.get("metadata") or {}).get("name", "")})

    def run(self, stop: threading.Event) -> None:
        """List, then watch, until ``stop`` is set; re-list after 410 Gone, retry errors with backoff."""
        log.info("Starting kube subnet manager")
        backoff = 1.0
        need_list = True
        while not stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                    self.synced.set()
                started = time.monotonic()
                self._watch(stop)
                metrics.WATCH_RESTARTS.labels("timeout").inc()
                backoff = 1.0
                if time.monotonic() - started < 1:
                    stop.wait(1)  # a server that ends watches at once must not make us spin
                continue
            except ApiError as exc:
                if exc.status == 410:
                    log.info("Node watch expired (%s); listing the nodes again", exc)
                    metrics.WATCH_RESTARTS.labels("expired").inc()
                    need_list = True
                    continue
                metrics.API_ERRORS.inc()
                metrics.WATCH_RESTARTS.labels("error").inc()
                log.error("Failed to %s nodes: %s", "list" if need_list else "watch", exc)
            except Exception:
                metrics.WATCH_RESTARTS.labels("error").inc()
                log.exception("Unexpected error in the node watch")
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def fetch_own_node(self) -> None:
        """Read this node alone, so the lease need not wait for the whole node list.

        It is a list with a field selector, which the ``list nodes`` RBAC allows (flannel's
        manifests grant no ``get nodes``). The list and watch keep the record up to date afterwards.
        """
        try:
            page = self.client.list_nodes(1, field_selector="metadata.name=" + self.node_name)
        except ApiError as exc:
            metrics.API_ERRORS.inc()
            log.warning("Failed to read node %s, waiting for the node list: %s", self.node_name, exc)
            return
        with self._lock:
            if self.node_name not in self._nodes:  # the list may have been quicker
                for obj in page.get("items") or ():
                    self._nodes[self.node_name] = node_info(obj, self.prefix)

    def wait_synced(self, stop: threading.Event, timeout: float = 600.0) -> None:
        """Block until the first list is in the cache (flanneld waits up to 10 min)."""
        log.info("Waiting %dm%ds for node controller to sync", timeout // 60, timeout % 60)
        deadline = time.monotonic() + timeout
        while not self.synced.wait(0.2):
            if stop.is_set():
                return
            if time.monotonic() > deadline:
                raise LeaseError("error waiting for nodeController to sync state: timed out waiting for the condition")
        log.info("Node controller sync successful")

    # -- the own lease ---------------------------------------------------------------------------

    def acquire_lease(self, public_ip: IPv4Address, backend_type: str, backend_data: str) -> Lease:
        """Take this node's pod CIDR as its lease and publish the annotations when they differ.

        Raises LeaseError with flanneld's message when the node is missing, has no pod CIDR, or
        its pod CIDR is outside the network.
        """
        node = self.own_node()
        if node is None:
            raise LeaseError('node "%s" not found' % self.node_name)
        if len(node.pod_cidrs) > 2:
            raise LeaseError('node "%s" pod cidrs should be IPv4/IPv6 only or dualstack' % self.node_name)
        cidr = node.pod_cidr
        v4 = [c for c in node.pod_cidrs if ":" not in c]
        if v4:
            cidr = v4[-1]
        if not cidr:
            raise LeaseError('node "%s" pod cidr not assigned' % self.node_name)
        try:
            subnet = ip_network(cidr, strict=False)
        except ValueError:
            raise LeaseError("invalid CIDR address: %s" % cidr) from None
        if not isinstance(subnet, IPv4Network) or not subnet.subnet_of(self.network):
            raise LeaseError('subnet "%s" specified in the flannel net config doesn\'t contain "%s" PodCIDR of '
                             'the "%s" node' % (self.network, cidr, self.node_name))

        keys, ann = self.keys, node.annotations
        advertised = str(public_ip)
        overwrite = ann.get(keys.backend_public_ip_overwrite, "")
        if overwrite:
            log.info("Overriding public ip with '%s' from node annotation '%s'", overwrite,
                     keys.backend_public_ip_overwrite)
            advertised = overwrite
        wanted = {keys.backend_data: backend_data, keys.backend_type: backend_type,
                  keys.subnet_kube_managed: "true", keys.backend_public_ip: advertised}
        diff = {k: v for k, v in wanted.items() if ann.get(k) != v}
        if diff:
            try:
                self.client.patch_node_status(self.node_name, {"metadata": {"annotations": diff}})
            except ApiError as exc:
                metrics.API_ERRORS.inc()
                raise LeaseError(str(exc)) from exc
            with self._lock:  # the watch brings the same change; record it now so a retry sends nothing
                ann.update(diff)
        return Lease(subnet, IPv4Address(advertised), backend_type, backend_data)

    def complete_lease(self) -> None:
        """Set the node's NetworkUnavailable condition to False, once, as flanneld v0.20 does."""
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {"type": "NetworkUnavailable", "status": "False", "lastHeartbeatTime": now,
                     "lastTransitionTime": now, "reason": "FlannelIsUp",
                     "message": "Flannel is running on this node"}
        try:
            self.client.patch_node_status(self.node_name, {"status": {"conditions": [condition]}})
        except ApiError as exc:
            metrics.API_ERRORS.inc()
            log.error("CompleteLease execute error err: %s", exc)
