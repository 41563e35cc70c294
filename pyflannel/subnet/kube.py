"""The Kubernetes subnet manager: leases from node pod CIDRs and flannel's node annotations.

One thread lists the nodes (in pages) and then watches them, keeping a small record a node, never
the node object. It turns the records into the other nodes' leases and reports which nodes'
leases changed; the daemon converges the kernel to them. Nothing from the API becomes a lease
unless its pod CIDR is IPv4, inside the Network and overlaps no other lease and not this node's
subnet: a bad node is skipped with one warning.
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
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network, ip_network
from typing import Any, TypedDict

from .. import metrics
from ..kubeclient import CONNECT_TIMEOUT, WATCH_READ_TIMEOUT, ApiError, KubeClient
from ..lease import Lease, LeaseError
from ..log import V
from .annotations import AnnotationKeys

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = 100  # a page of kubelet-sized nodes is ~1.2 MB of JSON, ~3.4 MB once parsed
WATCH_TIMEOUT_RANGE = (300, 600)  # seconds, spread like client-go's reflector
INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 30.0  # also the longest Retry-After honoured
# The most seconds between two updates of KubeSubnetManager.progress while the watch works or
# retries: a read that times out, then the longest wait, then a connection attempt.
PROGRESS_BOUND = WATCH_READ_TIMEOUT + MAX_BACKOFF + CONNECT_TIMEOUT


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
    creationTimestamp: str
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


def ipv4_pod_cidr(node: NodeInfo) -> str:
    """The node's IPv4 pod CIDR as flannel takes it, unparsed; "" when it has none.

    The first IPv4 entry of ``spec.podCIDRs``, or ``spec.podCIDR`` when the list is empty. It is
    what flanneld v0.20.2 routes to for another node (the API server allows one IPv4 entry), so
    this node takes the same for itself.
    """
    if node.pod_cidrs:
        return next((c for c in node.pod_cidrs if ":" not in c), "")
    return "" if ":" in node.pod_cidr else node.pod_cidr


def pod_cidr_field(node: NodeInfo) -> str:
    """The node field ipv4_pod_cidr() reads, for messages."""
    return "spec.podCIDRs" if node.pod_cidrs else "spec.podCIDR"


def list_nodes(client: KubeClient, prefix: str, page_size: int = LIST_PAGE_SIZE,
               on_page: Callable[[], None] | None = None) -> tuple[list[NodeInfo], str]:
    """Every node, read in pages, as NodeInfo oldest first; and the list's resourceVersion.

    ``prefix`` selects the annotations kept; ``on_page`` is called after each page.
    """
    # Parsed pages hold no reference cycles: the cycle collector's passes over thousands of
    # node dicts would only cost CPU while listing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        nodes: list[tuple[str, NodeInfo]] = []
        cont = ""
        decode: Callable[[bytes], Any] = json.loads  # decode_node_list earns its import from the second page on
        while True:
            page = client.list_nodes(page_size, cont, decode=decode)
            for obj in page.get("items") or ():
                nodes.append(((obj.get("metadata") or {}).get("creationTimestamp") or "", node_info(obj, prefix)))
            if on_page is not None:
                on_page()
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                break
            decode = decode_node_list
    finally:
        if was_enabled:
            gc.enable()
    nodes.sort(key=lambda n: (n[0], n[1].name))  # RFC 3339 in UTC sorts as text
    return [info for _, info in nodes], meta.get("resourceVersion") or ""


def node_to_lease(node: NodeInfo, keys: AnnotationKeys) -> Lease:
    """The lease a node's annotations and pod CIDR describe; raises ValueError with flanneld's text."""
    try:
        public_ip = _ipv4_address(node.annotations.get(keys.backend_public_ip, ""))
    except ValueError:
        raise ValueError("Invalid IP address format") from None
    if log.isEnabledFor(V(2)):
        log.log(V(2), "Creating the node lease for IPv4. This is the n.Spec.PodCIDRs: [%s]",
                " ".join(node.pod_cidrs or (node.pod_cidr,)))
    if not node.pod_cidr and not node.pod_cidrs:
        raise ValueError("pod cidr not assigned")
    cidr = ipv4_pod_cidr(node)
    if not cidr:
        raise ValueError("missing IPv4 address on n.Spec.PodCIDRs")
    try:
        subnet = _ipv4_network(cidr)
    except ValueError:
        raise ValueError("invalid CIDR address: %s" % cidr) from None
    return Lease(subnet, public_ip, node.annotations.get(keys.backend_type, ""),
                 node.annotations.get(keys.backend_data, ""))


def subnet_problem(subnet: IPv4Network, network: IPv4Network) -> str:
    """Why a node's pod CIDR cannot be a lease in ``network`` ("" when it can)."""
    if not subnet.subnet_of(network):
        return "is outside the Network %s" % network
    if subnet.prefixlen == network.prefixlen:
        return "is the whole Network %s" % network
    return ""


class _Claims:
    """Subnets held by nodes, none overlapping another; finds the holder of an overlap by bisection."""

    def __init__(self) -> None:
        self._firsts: list[int] = []  # sorted
        self._lasts: list[int] = []
        self._names: list[str] = []

    def holder(self, subnet: IPv4Network) -> str | None:
        """The node holding a subnet that overlaps ``subnet``, if any."""
        # The held ranges are disjoint: only the last one starting at or before our end can overlap.
        i = bisect_right(self._firsts, int(subnet.broadcast_address)) - 1
        if i >= 0 and self._lasts[i] >= int(subnet.network_address):
            return self._names[i]
        return None

    def add(self, subnet: IPv4Network, name: str) -> None:
        first = int(subnet.network_address)
        i = bisect_left(self._firsts, first)
        self._firsts.insert(i, first)
        self._lasts.insert(i, int(subnet.broadcast_address))
        self._names.insert(i, name)

    def remove(self, subnet: IPv4Network) -> None:
        i = bisect_left(self._firsts, int(subnet.network_address))
        del self._firsts[i], self._lasts[i], self._names[i]


class _Backoff:
    """Exponential backoff with full jitter, so that many daemons do not retry in the same second."""

    def __init__(self) -> None:
        self._cap = INITIAL_BACKOFF

    def next(self) -> float:
        """The seconds to wait before the next attempt: at random below a cap that doubles each time."""
        delay = random.uniform(0, min(self._cap, MAX_BACKOFF))
        self._cap = min(self._cap * 2, MAX_BACKOFF)
        return delay

    def reset(self) -> None:
        self._cap = INITIAL_BACKOFF


class KubeSubnetManager:
    """Leases from the Kubernetes API (flannel's ``subnet/kube``).

    ``progress`` is the ``time.monotonic()`` of the node watch's last sign of progress (a list
    page, a watch line, a connection attempt); it advances at least every PROGRESS_BOUND seconds
    while the watch works or retries.
    """

    def __init__(self, client: KubeClient, node_name: str, keys: AnnotationKeys, prefix: str,
                 network: IPv4Network, on_change: Callable[[set[str]], None]) -> None:
        self.client = client
        self.node_name = node_name
        self.keys = keys
        self.prefix = prefix
        self.network = network
        self.on_change = on_change
        self.synced = threading.Event()
        self.progress = time.monotonic()
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeInfo] = {}
        self._leases: dict[str, Lease] = {}
        self._claims = _Claims()  # the subnets of _leases and this node's own subnet
        self._own_subnet: IPv4Network | None = None
        self._waiting: dict[str, None] = {}  # nodes refused for an overlap, in the order they came
        self._rv = ""
        self._bad_overwrite = ""

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

    def _candidate(self, node: NodeInfo, quiet: bool) -> Lease | None:
        """The lease a node describes if it is valid, before the overlap check; logs why not unless quiet."""
        if node.annotations.get(self.keys.subnet_kube_managed) != "true":
            return None
        try:
            lease = node_to_lease(node, self.keys)
        except ValueError as exc:
            if not quiet:
                log.info("Error turning node \"%s\" to lease: %s", node.name, exc)
            return None
        problem = subnet_problem(lease.subnet, self.network)
        if problem:
            if not quiet:
                log.warning('Ignoring node "%s": its pod CIDR %s (%s) %s', node.name, ipv4_pod_cidr(node),
                            pod_cidr_field(node), problem)
            return None
        return lease

    def _overlap(self, node: NodeInfo, lease: Lease, quiet: bool) -> bool:
        """True (and a warning unless quiet) if another node holds part of the lease's subnet."""
        holder = self._claims.holder(lease.subnet)
        if holder is None:
            return False
        if not quiet:
            whose = "this node" if holder == self.node_name else 'node "%s", which held it first' % holder
            log.warning('Ignoring node "%s": its pod CIDR %s (%s) overlaps the pod CIDR of %s', node.name,
                        ipv4_pod_cidr(node), pod_cidr_field(node), whose)
        return True

    def _grant(self, name: str, lease: Lease) -> None:
        self._leases[name] = lease
        self._claims.add(lease.subnet, name)
        self._waiting.pop(name, None)
        metrics.LEASE_EVENTS.labels("added").inc()

    def _revoke(self, name: str) -> IPv4Network:
        lease = self._leases.pop(name)
        self._claims.remove(lease.subnet)
        metrics.LEASE_EVENTS.labels("removed").inc()
        return lease.subnet

    def _retry_waiting(self) -> set[str]:
        """Give waiting nodes the subnets that are free now; the names that got a lease."""
        granted = set()
        for name in list(self._waiting):
            node = self._nodes[name]
            lease = self._candidate(node, quiet=True)
            if lease is None:
                del self._waiting[name]
            elif self._claims.holder(lease.subnet) is None:
                log.info('Node "%s" takes pod CIDR %s, which no other node claims now', name, lease.subnet)
                self._grant(name, lease)
                granted.add(name)
        return granted

    def _update(self, node: NodeInfo) -> set[str]:
        """Store a node; the names whose lease changed (this node's own name when it is the node).

        Called with the lock held.
        """
        old = self._nodes.get(node.name)
        self._nodes[node.name] = node
        if node.name == self.node_name:
            return {node.name} | self._update_own(node)
        # Log a bad node once when it changes, not on every relist.
        quiet = old is not None and old.annotations == node.annotations and old.pod_cidrs == node.pod_cidrs \
            and old.pod_cidr == node.pod_cidr
        lease = self._candidate(node, quiet)
        current = self._leases.get(node.name)
        if lease == current:
            return set()
        changed = set()
        freed = None
        if current is not None:
            freed = self._revoke(node.name)
            changed.add(node.name)
        if lease is None:
            self._waiting.pop(node.name, None)
        elif self._overlap(node, lease, quiet and node.name in self._waiting):
            self._waiting[node.name] = None
        else:
            self._grant(node.name, lease)
            changed.add(node.name)
        if freed is not None and (lease is None or lease.subnet != freed):
            changed |= self._retry_waiting()
        return changed

    def _update_own(self, node: NodeInfo) -> set[str]:
        """Reserve this node's subnet; a node holding part of it loses its lease. Lock held."""
        try:
            subnet: IPv4Network | None = IPv4Network(ipv4_pod_cidr(node), strict=False)
        except ValueError:
            subnet = None
        if subnet is not None and not subnet.subnet_of(self.network):
            subnet = None
        if subnet == self._own_subnet:
            return set()
        changed = set()
        if self._own_subnet is not None:
            self._claims.remove(self._own_subnet)
        self._own_subnet = subnet
        if subnet is not None:
            while (holder := self._claims.holder(subnet)) is not None:
                log.warning('Ignoring node "%s": its pod CIDR %s (%s) overlaps the pod CIDR of this node', holder,
                            ipv4_pod_cidr(self._nodes[holder]), pod_cidr_field(self._nodes[holder]))
                self._revoke(holder)
                self._waiting[holder] = None
                changed.add(holder)
            self._claims.add(subnet, self.node_name)
        return changed | self._retry_waiting()

    def _delete(self, name: str) -> set[str]:
        """Forget a node; the names whose lease changed. Lock held."""
        node = self._nodes.pop(name, None)
        self._waiting.pop(name, None)
        if name == self.node_name:
            changed = {name}
            if self._own_subnet is not None:
                self._claims.remove(self._own_subnet)
                self._own_subnet = None
                changed |= self._retry_waiting()
            return changed
        if node is None or name not in self._leases:
            return set()
        self._revoke(name)
        return {name} | self._retry_waiting()

    # -- list and watch --------------------------------------------------------------------------

    def _made_progress(self) -> None:
        self.progress = time.monotonic()

    def _list(self) -> None:
        """List every node in pages and replace the cache with the result."""
        nodes, rv = list_nodes(self.client, self.prefix, LIST_PAGE_SIZE, self._made_progress)
        names = {info.name for info in nodes}
        changed: set[str] = set()
        with self._lock:
            for name in list(self._nodes):
                if name not in names:
                    changed |= self._delete(name)
            # This node's subnet is reserved first; the others come oldest first, so of two nodes
            # claiming one subnet the older keeps it, as it did for a daemon that saw both arrive.
            for info in sorted(nodes, key=lambda n: n.name != self.node_name):
                changed |= self._update(info)
            self._rv = rv
            metrics.LEASES.set(len(self._leases))
        if changed:
            self.on_change(changed)

    def _watch(self, stop: threading.Event, backoff: _Backoff) -> None:
        """Apply watch events until the stream ends; raises ApiError(410) when the cache must be relisted."""
        timeout = random.randint(*WATCH_TIMEOUT_RANGE)
        for event in self.client.watch_nodes(self._rv, timeout):
            self._made_progress()
            if stop.is_set():
                return
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                raise ApiError(int(obj.get("code") or 0), obj.get("message") or "watch error")
            backoff.reset()
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            changed: set[str] = set()
            with self._lock:
                if kind in ("ADDED", "MODIFIED"):
                    changed = self._update(node_info(obj, self.prefix))
                elif kind == "DELETED":
                    changed = self._delete((obj.get("metadata") or {}).get("name", ""))
                if rv:
                    self._rv = rv
                metrics.LEASES.set(len(self._leases))
            if changed:
                self.on_change(changed)

    def run(self, stop: threading.Event) -> None:
        """List, then watch, until ``stop`` is set.

        Re-lists after 410 Gone and retries errors after a jittered exponential backoff (at least
        a 429's Retry-After); an authorization error is logged once until it changes. Any other
        exception is a bug and propagates: the daemon's supervisor logs it and restarts the watch.
        """
        log.info("Starting kube subnet manager")
        backoff = _Backoff()
        need_list = True
        auth_error = ""
        while not stop.is_set():
            self._made_progress()
            try:
                if need_list:
                    self._list()
                    need_list = False
                    auth_error = ""
                    self.synced.set()
                started = time.monotonic()
                self._watch(stop, backoff)
                auth_error = ""
                metrics.WATCH_RESTARTS.labels("timeout").inc()
                if time.monotonic() - started < 1:
                    stop.wait(1)  # a server that ends watches at once must not make us spin
                continue
            except ApiError as exc:
                delay = backoff.next()
                if exc.status == 410:
                    log.info("Node watch expired (%s); listing the nodes again in %.1fs", exc, delay)
                    metrics.WATCH_RESTARTS.labels("expired").inc()
                    need_list = True
                else:
                    metrics.API_ERRORS.inc()
                    metrics.WATCH_RESTARTS.labels("error").inc()
                    delay = max(delay, min(exc.retry_after, MAX_BACKOFF))
                    message = "Failed to %s nodes: %s" % ("list" if need_list else "watch", exc)
                    if exc.status not in (401, 403):
                        log.error("%s", message)
                    elif message != auth_error:
                        log.error("%s", message)
                        auth_error = message
            stop.wait(delay)

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
                    self._update(node_info(obj, self.prefix))

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

    def _public_ip(self, detected: IPv4Address, overwrite: str) -> IPv4Address:
        """The address to advertise: ``public-ip-overwrite`` when it is an IPv4 address, else the detected one."""
        if not overwrite:
            return detected
        try:
            address = IPv4Address(overwrite)
        except ValueError:
            if overwrite != self._bad_overwrite:  # once until the value changes
                log.warning('Ignoring annotation %s="%s" of this node: it is not an IPv4 address; advertising %s',
                            self.keys.backend_public_ip_overwrite, overwrite, detected)
                self._bad_overwrite = overwrite
            return detected
        log.info("Overriding public ip with '%s' from node annotation '%s'", overwrite,
                 self.keys.backend_public_ip_overwrite)
        return address

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
        if not node.pod_cidr:
            raise LeaseError('node "%s" pod cidr not assigned' % self.node_name)
        cidr = ipv4_pod_cidr(node) or node.pod_cidr
        try:
            subnet = ip_network(cidr, strict=False)
        except ValueError:
            raise LeaseError("invalid CIDR address: %s" % cidr) from None
        if not isinstance(subnet, IPv4Network) or not subnet.subnet_of(self.network):
            raise LeaseError('subnet "%s" specified in the flannel net config doesn\'t contain "%s" PodCIDR of '
                             'the "%s" node' % (self.network, cidr, self.node_name))

        keys, ann = self.keys, node.annotations
        advertised = self._public_ip(public_ip, ann.get(keys.backend_public_ip_overwrite, ""))
        wanted = {keys.backend_data: backend_data, keys.backend_type: backend_type,
                  keys.subnet_kube_managed: "true", keys.backend_public_ip: str(advertised)}
        diff = {k: v for k, v in wanted.items() if ann.get(k) != v}
        if diff:
            try:
                self.client.patch_node_status(self.node_name, {"metadata": {"annotations": diff}})
            except ApiError as exc:
                metrics.API_ERRORS.inc()
                raise LeaseError(str(exc)) from exc
            with self._lock:  # the watch brings the same change; record it now so a retry sends nothing
                ann.update(diff)
        return Lease(subnet, advertised, backend_type, backend_data)

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
