"""The Kubernetes subnet manager: leases from node pod CIDRs and flannel's node annotations.

One thread lists the nodes (in pages) and then watches them, keeping a small record a node, never
the node object. It turns the records into the other nodes' leases and reports which nodes'
leases changed; the daemon converges the kernel to them. Each enabled family (IPv4, IPv6) has its
own leases, validated alike: nothing from the API becomes a lease unless its pod CIDR of that
family is inside that family's Network and overlaps no other lease and not this node's subnet. A
bad node is skipped with one warning, in that family only.
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
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any, TypedDict

from .. import metrics
from ..family import FAMILIES, IPV4, IPV6, Family, IPAddress, IPNetwork
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
_V6_CIDR = re.compile(r"([0-9A-Fa-f:.]+)/(12[0-8]|1[01][0-9]|[1-9]?[0-9])")


def _ipv4_address(text: str) -> IPv4Address:
    """``IPv4Address(text)``; a plain dotted quad skips ipaddress' parser, a third of a lease's CPU."""
    return IPv4Address(socket.inet_aton(text)) if _DOTTED_QUAD.fullmatch(text) else IPv4Address(text)


def _ipv4_network(cidr: str) -> IPv4Network:
    """``IPv4Network(cidr, strict=False)``, the same way."""
    m = _DOTTED_CIDR.fullmatch(cidr)
    return IPv4Network((socket.inet_aton(m[1]), int(m[2])), strict=False) if m else IPv4Network(cidr, strict=False)


def _ipv6_packed(text: str) -> bytes:
    """The 16 bytes of an IPv6 address without a zone (Go's ``net.ParseIP``), from the C parser."""
    try:
        return socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        raise ValueError("not an IPv6 address: %r" % text) from None


def _ipv6_address(text: str) -> IPv6Address:
    """``IPv6Address(text)``, the same way."""
    return IPv6Address(_ipv6_packed(text))


def _ipv6_network(cidr: str) -> IPv6Network:
    """``IPv6Network(cidr, strict=False)``, the same way. (Given an IPv6Address rather than its bytes,
    IPv6Network would write it out as text and parse that.)"""
    m = _V6_CIDR.fullmatch(cidr)
    if m is None:
        raise ValueError("not an IPv6 network: %r" % cidr)
    return IPv6Network((_ipv6_packed(m[1]), int(m[2])), strict=False)


# The parsers of each family's annotation values and pod CIDRs (data, not branches).
_ADDRESS: dict[Family, Callable[[str], IPAddress]] = {IPV4: _ipv4_address, IPV6: _ipv6_address}
_NETWORK: dict[Family, Callable[[str], IPNetwork]] = {IPV4: _ipv4_network, IPV6: _ipv6_network}
# How flanneld names a family's pod CIDR in its containment error ("... IPv6 PodCIDR of the ...").
_PODCIDR_NAME = {IPV4: "PodCIDR", IPV6: "IPv6 PodCIDR"}
_NETWORK_KEY = {IPV4: "Network", IPV6: "IPv6Network"}  # the net-conf key of each family's Network
# Backends whose IPv4 annotations flanneld v0.20.2 writes even in an IPv6-only network (backend-data
# null, public-ip 0.0.0.0); the others write a family's annotations only when it is enabled.
_V4_ANNOTATIONS_ALWAYS = {"host-gw": "null"}


def pod_cidr(node: NodeInfo, family: Family) -> str:
    """The node's pod CIDR of ``family`` as flannel takes it, unparsed; "" when it has none.

    The first entry of that family in ``spec.podCIDRs``, or ``spec.podCIDR`` when the list is
    empty. It is what flanneld v0.20.2 routes to for another node (the API server allows one entry
    a family), so this node takes the same for itself.
    """
    want_colon = family.version == 6
    if node.pod_cidrs:
        return next((c for c in node.pod_cidrs if (":" in c) == want_colon), "")
    return node.pod_cidr if (":" in node.pod_cidr) == want_colon else ""


def ipv4_pod_cidr(node: NodeInfo) -> str:
    """The node's IPv4 pod CIDR (:func:`pod_cidr` of IPv4): the one pod-CIDR choice."""
    return pod_cidr(node, IPV4)


def pod_cidr_field(node: NodeInfo) -> str:
    """The node field pod_cidr() reads, for messages."""
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


def node_to_lease(node: NodeInfo, keys: AnnotationKeys, family: Family = IPV4) -> Lease:
    """The lease of ``family`` a node's annotations and pod CIDR describe; raises ValueError with flanneld's text."""
    try:
        public_ip = _ADDRESS[family](node.annotations.get(keys.public_ip(family), ""))
    except ValueError:
        raise ValueError("Invalid IP address format") from None
    if log.isEnabledFor(V(2)):
        log.log(V(2), "Creating the node lease for %s. This is the n.Spec.PodCIDRs: [%s]", family,
                " ".join(node.pod_cidrs or (node.pod_cidr,)))
    if not node.pod_cidr and not node.pod_cidrs:
        raise ValueError("pod cidr not assigned")
    cidr = pod_cidr(node, family)
    if not cidr:
        raise ValueError("missing %s address on n.Spec.PodCIDRs" % family)
    try:
        subnet = _NETWORK[family](cidr)
    except ValueError:
        raise ValueError("invalid CIDR address: %s" % cidr) from None
    return Lease(subnet, public_ip, node.annotations.get(keys.backend_type, ""),
                 node.annotations.get(keys.data(family), ""))


def _inside(subnet: IPNetwork, network: IPNetwork) -> bool:
    """``subnet`` is of ``network``'s family and inside it (``subnet_of``, in integers: it runs for every node)."""
    shift = network.max_prefixlen - network.prefixlen
    return (subnet.version == network.version and subnet.prefixlen >= network.prefixlen
            and int(subnet.network_address) >> shift == int(network.network_address) >> shift)


def _last(subnet: IPNetwork) -> int:
    """The subnet's last address as an integer, without ``broadcast_address``, which keeps two more
    objects on every lease's network."""
    return int(subnet.network_address) | ((1 << (subnet.max_prefixlen - subnet.prefixlen)) - 1)


def subnet_problem(subnet: IPNetwork, network: IPNetwork) -> str:
    """Why a node's pod CIDR cannot be a lease in ``network`` ("" when it can)."""
    if not _inside(subnet, network):
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

    def holder(self, subnet: IPNetwork) -> str | None:
        """The node holding a subnet that overlaps ``subnet``, if any."""
        # The held ranges are disjoint: only the last one starting at or before our end can overlap.
        i = bisect_right(self._firsts, _last(subnet)) - 1
        if i >= 0 and self._lasts[i] >= int(subnet.network_address):
            return self._names[i]
        return None

    def add(self, subnet: IPNetwork, name: str) -> None:
        first = int(subnet.network_address)
        i = bisect_left(self._firsts, first)
        self._firsts.insert(i, first)
        self._lasts.insert(i, _last(subnet))
        self._names.insert(i, name)

    def remove(self, subnet: IPNetwork) -> None:
        i = bisect_left(self._firsts, int(subnet.network_address))
        del self._firsts[i], self._lasts[i], self._names[i]


class _FamilyLeases:
    """The other nodes' valid leases of one family, and this node's subnet of it.

    Every method is called with the manager's lock held; ``nodes`` is the manager's node cache.
    """

    def __init__(self, family: Family, network: IPNetwork, node_name: str, keys: AnnotationKeys,
                 nodes: dict[str, NodeInfo], dual: bool) -> None:
        self.family = family
        self.network = network
        self.node_name = node_name
        self.keys = keys
        self.nodes = nodes
        self.leases: dict[str, Lease] = {}
        self.claims = _Claims()  # the subnets of leases and this node's own subnet
        self.own_subnet: IPNetwork | None = None
        self.waiting: dict[str, None] = {}  # nodes refused for an overlap, in the order they came
        # In dual-stack a node skipped in one family keeps its lease of the other: say which.
        self._only = " (skipped for %s only)" % family if dual else ""

    def candidate(self, node: NodeInfo, quiet: bool) -> Lease | None:
        """The lease a node describes if it is valid, before the overlap check; logs why not unless quiet."""
        try:
            lease = node_to_lease(node, self.keys, self.family)
        except ValueError as exc:
            if not quiet:
                log.info("Error turning node \"%s\" to lease: %s%s", node.name, exc, self._only)
            return None
        problem = subnet_problem(lease.subnet, self.network)
        if problem:
            if not quiet:
                log.warning('Ignoring node "%s": its pod CIDR %s (%s) %s%s', node.name, pod_cidr(node, self.family),
                            pod_cidr_field(node), problem, self._only)
            return None
        return lease

    def _overlap(self, node: NodeInfo, lease: Lease, quiet: bool) -> bool:
        """True (and a warning unless quiet) if another node holds part of the lease's subnet."""
        holder = self.claims.holder(lease.subnet)
        if holder is None:
            return False
        if not quiet:
            whose = "this node" if holder == self.node_name else 'node "%s", which held it first' % holder
            log.warning('Ignoring node "%s": its pod CIDR %s (%s) overlaps the pod CIDR of %s%s', node.name,
                        pod_cidr(node, self.family), pod_cidr_field(node), whose, self._only)
        return True

    def _grant(self, name: str, lease: Lease) -> None:
        self.leases[name] = lease
        self.claims.add(lease.subnet, name)
        self.waiting.pop(name, None)
        metrics.LEASE_EVENTS.labels("added").inc()

    def _revoke(self, name: str) -> IPNetwork:
        lease = self.leases.pop(name)
        self.claims.remove(lease.subnet)
        metrics.LEASE_EVENTS.labels("removed").inc()
        return lease.subnet

    def _retry_waiting(self) -> set[str]:
        """Give waiting nodes the subnets that are free now; the names that got a lease."""
        granted = set()
        for name in list(self.waiting):
            lease = self.candidate(self.nodes[name], quiet=True)
            if lease is None:
                del self.waiting[name]
            elif self.claims.holder(lease.subnet) is None:
                log.info('Node "%s" takes pod CIDR %s, which no other node claims now', name, lease.subnet)
                self._grant(name, lease)
                granted.add(name)
        return granted

    def update(self, node: NodeInfo, managed: bool, quiet: bool) -> set[str]:
        """Apply another node's new record; the names whose lease changed.

        ``managed``: the node carries ``kube-subnet-manager: "true"``; ``quiet``: its record is
        as before, so its problems were logged already.
        """
        lease = self.candidate(node, quiet) if managed else None
        current = self.leases.get(node.name)
        if lease == current:
            return set()
        changed = set()
        freed = None
        if current is not None:
            freed = self._revoke(node.name)
            changed.add(node.name)
        if lease is None:
            self.waiting.pop(node.name, None)
        elif self._overlap(node, lease, quiet and node.name in self.waiting):
            self.waiting[node.name] = None
        else:
            self._grant(node.name, lease)
            changed.add(node.name)
        if freed is not None and (lease is None or lease.subnet != freed):
            changed |= self._retry_waiting()
        return changed

    def update_own(self, node: NodeInfo) -> set[str]:
        """Reserve this node's subnet; a node holding part of it loses its lease."""
        try:
            subnet: IPNetwork | None = _NETWORK[self.family](pod_cidr(node, self.family))
        except ValueError:
            subnet = None
        if subnet is not None and not _inside(subnet, self.network):
            subnet = None
        if subnet == self.own_subnet:
            return set()
        changed = set()
        if self.own_subnet is not None:
            self.claims.remove(self.own_subnet)
        self.own_subnet = subnet
        if subnet is not None:
            while (holder := self.claims.holder(subnet)) is not None:
                held = self.nodes[holder]
                log.warning('Ignoring node "%s": its pod CIDR %s (%s) overlaps the pod CIDR of this node%s', holder,
                            pod_cidr(held, self.family), pod_cidr_field(held), self._only)
                self._revoke(holder)
                self.waiting[holder] = None
                changed.add(holder)
            self.claims.add(subnet, self.node_name)
        return changed | self._retry_waiting()

    def delete(self, name: str) -> set[str]:
        """Forget a node (already gone from ``nodes``); the names whose lease changed."""
        self.waiting.pop(name, None)
        if name == self.node_name:
            if self.own_subnet is None:
                return set()
            self.claims.remove(self.own_subnet)
            self.own_subnet = None
            return self._retry_waiting()
        if name not in self.leases:
            return set()
        self._revoke(name)
        return {name} | self._retry_waiting()


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
                 networks: dict[Family, IPNetwork], on_change: Callable[[set[str]], None]) -> None:
        self.client = client
        self.node_name = node_name
        self.keys = keys
        self.prefix = prefix
        self.networks = {f: networks[f] for f in FAMILIES if f in networks}
        self.on_change = on_change
        self.synced = threading.Event()
        self.progress = time.monotonic()
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeInfo] = {}
        dual = len(self.networks) > 1
        self._families = {f: _FamilyLeases(f, net, node_name, keys, self._nodes, dual)
                          for f, net in self.networks.items()}
        self._rv = ""
        self._bad_overwrite: dict[Family, str] = {}

    @property
    def name(self) -> str:
        return "Kubernetes Subnet Manager - %s" % self.node_name

    # -- the node cache --------------------------------------------------------------------------

    def own_node(self) -> NodeInfo | None:
        """This node's record in the cache (flannel reads its node from the cache, never with GET)."""
        with self._lock:
            return self._nodes.get(self.node_name)

    def leases(self, family: Family) -> dict[str, Lease]:
        """The other nodes' valid leases of ``family`` (an enabled one), by node name."""
        with self._lock:
            return dict(self._families[family].leases)

    def lease_of(self, name: str, family: Family) -> Lease | None:
        """One node's valid lease of ``family``."""
        with self._lock:
            return self._families[family].leases.get(name)

    def published_data(self, family: Family, public_ip: IPAddress) -> str:
        """The backend data this node's annotation of ``family`` holds ('' if none); ``public_ip`` is not needed."""
        own = self.own_node()
        return own.annotations.get(self.keys.data(family), "") if own else ""

    def _count(self) -> None:
        metrics.LEASES.set(sum(len(f.leases) for f in self._families.values()))

    def _update(self, node: NodeInfo) -> set[str]:
        """Store a node; the names whose lease changed in any family (this node's own name when it
        is the node). Called with the lock held."""
        old = self._nodes.get(node.name)
        self._nodes[node.name] = node
        changed: set[str] = set()
        if node.name == self.node_name:
            changed.add(node.name)
            for fam in self._families.values():
                changed |= fam.update_own(node)
            return changed
        # Log a bad node once when it changes, not on every relist.
        quiet = old is not None and old.annotations == node.annotations and old.pod_cidrs == node.pod_cidrs \
            and old.pod_cidr == node.pod_cidr
        managed = node.annotations.get(self.keys.subnet_kube_managed) == "true"
        for fam in self._families.values():
            changed |= fam.update(node, managed, quiet)
        return changed

    def _delete(self, name: str) -> set[str]:
        """Forget a node; the names whose lease changed. Lock held."""
        if self._nodes.pop(name, None) is None and name != self.node_name:
            return set()
        changed = {name} if name == self.node_name else set()
        for fam in self._families.values():
            changed |= fam.delete(name)
        return changed

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
            self._count()
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
                self._count()
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
        """Block until the first list is in the cache (flanneld waits up to 10 min); raises LeaseError with
        flannel v0.28.9's text (its error line names the real wait, not v0.28.9's misleading "1s")."""
        waiting = "%dm%ds" % (timeout // 60, timeout % 60)
        log.info("Waiting %s for node controller to sync", waiting)
        deadline = time.monotonic() + timeout
        while not self.synced.wait(0.2):
            if stop.is_set():
                return
            if time.monotonic() > deadline:
                log.error("Node controller sync not completed within %s: context deadline exceeded", waiting)
                raise LeaseError("error waiting for nodeController to sync state: context deadline exceeded")
        log.info("Node controller sync successful")

    # -- the own lease ---------------------------------------------------------------------------

    def _public_ip(self, family: Family, detected: IPAddress, overwrite: str) -> IPAddress:
        """The address to advertise: the ``public-ip(v6)-overwrite`` annotation when it is an address
        of ``family``, else the detected one."""
        if not overwrite:
            return detected
        key = self.keys.public_ip_overwrite(family)
        try:
            address = _ADDRESS[family](overwrite)
        except ValueError:
            if overwrite != self._bad_overwrite.get(family):  # once until the value changes
                log.warning('Ignoring annotation %s="%s" of this node: it is not an %s address; advertising %s',
                            key, overwrite, family, detected)
                self._bad_overwrite[family] = overwrite
            return detected
        if address != detected:
            # "Overriding public ip with ..." / "Overriding public ipv6 with ...", as flanneld says it
            log.info("Overriding %s with '%s' from node annotation '%s'",
                     family.public_ip_annotation.replace("-", " "), overwrite, key)
        return address

    def _missing_family(self, node: NodeInfo, family: Family) -> LeaseError:
        """The error for a node without a pod CIDR of an enabled family, with the fix."""
        cidrs = ",".join(str(net) for net in self.networks.values())
        if len(self.networks) > 1:
            other = 'set "Enable%s": false' % family
        else:
            other = "enable in the flannel net config the families the pod CIDRs have"
        return LeaseError(
            'node "%s" has no %s pod CIDR (%s: %s) but the flannel net config enables %s (%s %s): give the nodes '
            'a pod CIDR of each enabled family (kube-controller-manager --cluster-cidr=%s, kubeadm '
            '--pod-network-cidr=%s) or %s; waiting for it'
            % (self.node_name, family, pod_cidr_field(node), ",".join(node.pod_cidrs or (node.pod_cidr,)), family,
               _NETWORK_KEY[family], self.networks[family], cidrs, cidrs, other))

    def acquire_lease(self, public_ips: dict[Family, IPAddress], backend_type: str,
                      backend_data: dict[Family, str]) -> dict[Family, Lease]:
        """Take this node's pod CIDRs as its leases, one per enabled family, and publish the
        annotations (flanneld v0.20.2's keys and values) when they differ.

        ``public_ips`` and ``backend_data`` hold a value for each enabled family. Raises
        LeaseError with flanneld's message when the node is missing, has no pod CIDR, or a pod
        CIDR is outside its Network; and with the fix when an enabled family has no pod CIDR
        (flanneld v0.20.2 panics). A pod CIDR of a family that is not enabled is ignored.
        """
        node = self.own_node()
        if node is None:
            raise LeaseError('node "%s" not found' % self.node_name)
        if len(node.pod_cidrs) > 2:
            raise LeaseError('node "%s" pod cidrs should be IPv4/IPv6 only or dualstack' % self.node_name)
        if not node.pod_cidr:
            raise LeaseError('node "%s" pod cidr not assigned' % self.node_name)
        for cidr in node.pod_cidrs or (node.pod_cidr,):
            try:
                ip_network(cidr, strict=False)
            except ValueError:
                raise LeaseError("invalid CIDR address: %s" % cidr) from None
        subnets: dict[Family, IPNetwork] = {}
        for family, network in self.networks.items():
            cidr = pod_cidr(node, family)
            if not cidr:
                raise self._missing_family(node, family)
            subnet = family.network(cidr)
            if not _inside(subnet, network):
                raise LeaseError('subnet "%s" specified in the flannel net config doesn\'t contain "%s" %s of '
                                 'the "%s" node' % (network, cidr, _PODCIDR_NAME[family], self.node_name))
            subnets[family] = subnet

        keys, ann = self.keys, node.annotations
        advertised = {f: self._public_ip(f, public_ips[f], ann.get(keys.public_ip_overwrite(f), "")) for f in subnets}
        wanted = {keys.backend_type: backend_type, keys.subnet_kube_managed: "true"}
        if IPV4 not in subnets and backend_type in _V4_ANNOTATIONS_ALWAYS:
            wanted[keys.data(IPV4)] = _V4_ANNOTATIONS_ALWAYS[backend_type]
            wanted[keys.public_ip(IPV4)] = "0.0.0.0"
        for f, address in advertised.items():
            wanted[keys.data(f)] = backend_data[f]
            wanted[keys.public_ip(f)] = str(address)
        diff = {k: v for k, v in sorted(wanted.items()) if ann.get(k) != v}
        if diff:
            try:
                self.client.patch_node_status(self.node_name, {"metadata": {"annotations": diff}})
            except ApiError as exc:
                metrics.API_ERRORS.inc()
                raise LeaseError(str(exc)) from exc
            with self._lock:  # the watch brings the same change; record it now so a retry sends nothing
                ann.update(diff)
        return {f: Lease(subnets[f], advertised[f], backend_type, backend_data[f]) for f in subnets}

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
