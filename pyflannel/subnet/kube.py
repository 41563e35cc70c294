"""The Kubernetes subnet manager: leases from node pod CIDRs and flannel's node annotations.

One thread lists the nodes (in pages) and then watches them, keeping a small record a node, never
the node object: this node's flannel annotations whole, and of every other node only its lease of
each family, parsed, or why it has none. Every node is untrusted input: the list pages and watch
events are decoded into the few fields read (msgspec skips the rest without building it), bounded
in size (kubeclient.MAX_BODY, MAX_LINE), and another node's lease annotation of more than
MAX_ANNOTATION bytes is refused. The manager turns the records into the other nodes' leases and
reports which nodes' leases changed; the daemon converges the kernel to them.

Each enabled family (IPv4, IPv6) has its own leases, validated alike: nothing from the API becomes
a lease unless its pod CIDR of that family is inside that family's Network, overlaps no other lease
and not this node's subnet or network (nodenet), and its public IP is a usable unicast address that
lies in no other node's pod CIDR. Of two nodes claiming one thing the one seen first (the older, at
a list) keeps it; the other waits and takes over when it is free. A bad node is skipped with one
warning, in that family only.
"""

from __future__ import annotations

import functools
import gc
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
from typing import Any, NamedTuple, TypedDict, TypeVar

from .. import heap, metrics
from ..family import FAMILIES, IPV4, IPV6, Family, IPAddress, IPNetwork
from ..kubeclient import (CONNECT_TIMEOUT, MAX_BODY, WATCH_READ_TIMEOUT, ApiError, KubeClient, TooLarge, Undecodable,
                          loads)
from ..lease import Lease, LeaseError
from ..log import V
from .annotations import AnnotationKeys
from .nodenet import NodeNetwork, last_address, public_ip_problem

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = 100  # a page of kubelet-sized nodes is ~1.2 MB of JSON, ~3.4 MB once parsed
# Bodies and watch lines up to this size are parsed by json.loads, which the daemon loads anyway;
# msgspec's import alone costs 10 ms of CPU (0.1 s of a start-up under the 100m limit), and it is
# loaded only for what is larger: a list page of several nodes, a node heavier than a kubelet's.
SMALL_JSON = 64 << 10
# The most bytes of one of another node's lease annotations (backend-type, public-ip, backend-data):
# flannel writes some tens of bytes there; the API server allows 256 KiB of annotations a node.
MAX_ANNOTATION = 1024
WATCH_TIMEOUT_RANGE = (300, 600)  # seconds, spread like client-go's reflector
INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 30.0  # also the longest Retry-After honoured
# The most seconds between two updates of KubeSubnetManager.progress while the watch works or
# retries: a read that times out, then the longest wait, then a connection attempt.
PROGRESS_BOUND = WATCH_READ_TIMEOUT + MAX_BACKOFF + CONNECT_TIMEOUT

T = TypeVar("T")


@dataclass(slots=True)
class NodeInfo:
    """The few fields of a node that flannel uses."""

    name: str
    pod_cidr: str
    pod_cidrs: tuple[str, ...]  # empty when it only repeats pod_cidr
    annotations: dict[str, str]  # only the keys under the annotation prefix


class _Fields(NamedTuple):
    """A node object's fields flannel reads, checked for their types."""

    name: str
    created: str
    annotations: dict[str, Any]  # all of them, strings unless the decoder was json.loads
    pod_cidr: str
    pod_cidrs: tuple[str, ...]  # empty when it only repeats pod_cidr


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError("%s is not a string" % what)
    return value


def _node_fields(obj: Any) -> _Fields:
    """The fields of a node object as the API returns it; ValueError naming a field of another type
    (the typed decoder lets none through, json.loads may)."""
    if not isinstance(obj, dict):
        raise ValueError("the node is not a JSON object")
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise ValueError("its metadata or spec is not a JSON object")
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):  # its values are checked where read: most are not
        raise ValueError("metadata.annotations is not a map of strings")
    cidrs = spec.get("podCIDRs") or []
    if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
        raise ValueError("spec.podCIDRs is not a list of strings")
    cidr = _text(spec.get("podCIDR"), "spec.podCIDR")
    return _Fields(_text(meta.get("name"), "metadata.name"), _text(meta.get("creationTimestamp"), "creationTimestamp"),
                   annotations, cidr, () if cidrs == [cidr] else tuple(cidrs))


def _info(fields: _Fields, prefix: str) -> NodeInfo:
    # Thousands of these may be kept, so the annotation keys (the same on every node) are interned.
    kept = {sys.intern(k): v for k, v in fields.annotations.items() if k.startswith(prefix)}
    if not all(isinstance(v, str) for v in kept.values()):
        raise ValueError("metadata.annotations is not a map of strings")
    return NodeInfo(fields.name, fields.pod_cidr, fields.pod_cidrs, kept)


def node_info(obj: Any, prefix: str) -> NodeInfo:
    """A NodeInfo from a node object as the API returns it (``prefix`` selects the annotations kept);
    ValueError when a field flannel reads has the wrong type."""
    return _info(_node_fields(obj), prefix)


class _Metadata(TypedDict, total=False):
    name: str
    creationTimestamp: str
    resourceVersion: str
    annotations: dict[str, str]


class _Spec(TypedDict, total=False):
    podCIDR: str
    podCIDRs: list[str]


class _Node(TypedDict, total=False):
    """A node; or, in a watch's ERROR event, a Status (its code and message)."""

    metadata: _Metadata
    spec: _Spec
    code: int
    message: str


# "continue" is a Python keyword: only the functional form can name it
_NodeListMeta = TypedDict("_NodeListMeta", {"resourceVersion": str, "continue": str}, total=False)


class _NodeList(TypedDict, total=False):
    metadata: _NodeListMeta
    items: list[_Node]


class _NodeListHead(TypedDict, total=False):
    metadata: _NodeListMeta


class _WatchEvent(TypedDict, total=False):
    type: str
    object: _Node


@functools.cache
def _decoder(kind: type) -> Any:
    import msgspec  # only for what json.loads should not parse (see SMALL_JSON)

    return msgspec.json.Decoder(kind)


def _decode(raw: bytes | memoryview, kind: type) -> Any:
    """``raw`` as json.loads gives it when small; else decoded into ``kind``, a TypedDict of the fields
    flannel reads: the rest (status, labels, managed fields: nine tenths of a kubelet's node) is skipped,
    never built. Raises ValueError or RecursionError for what it cannot read."""
    if len(raw) <= SMALL_JSON:
        return loads(raw)
    return _decoder(kind).decode(raw)


def decode_node_list(raw: bytes) -> Any:
    """A node list page, as json.loads would give it, less every field flannel does not read."""
    return _decode(raw, _NodeList)


def decode_watch_event(raw: bytes | memoryview) -> Any:
    """A node watch event, as json.loads would give it, less every field flannel does not read.

    Of a large event only the node's metadata, less its managed fields, and its spec are read, when they
    give the node's name and spec: the API server writes a node's fields in their order in the Node type
    (metadata, whose managed fields come last, then spec, then status), and the managed fields and the
    status (a kubelet's images) are most of a node, which even skipping costs CPU to scan. A document
    of another shape does not decode once cut, or lacks the name or the spec, and is read whole."""
    if len(raw) > SMALL_JSON:
        event = _cut_event(raw)
        if event is not None:
            return event
    return _decode(raw, _WatchEvent)


# Where a node's managed fields, spec and status begin in a watch event as the API server writes it.
# None of these can appear inside a string (its quotes would be escaped), nor be faked by a node's own
# data: a cut at a wrong place leaves brackets unbalanced, and the cut event does not decode.
_MANAGED = b',"managedFields":['
_SPEC = b'},"spec":{'
_STATUS = b',"status":{'


def _cut_event(raw: bytes | memoryview) -> Any:
    """The event without its node's managed fields and status, decoded, or None (see decode_watch_event)."""
    data = bytes(raw)  # bytes.find is some ten times quicker than a regular expression
    managed = data.find(_MANAGED)  # each search starts where the last one ended: the event is scanned once
    spec = data.find(_SPEC, max(managed, 0))
    end = data.find(_STATUS, spec) if spec >= 0 else -1
    if end < 0:
        return None
    cut = data[:managed if managed >= 0 else spec] + data[spec:end]
    try:
        event = _decoder(_WatchEvent).decode(cut + b"}}")
    except ValueError:
        return None
    obj = event.get("object") if isinstance(event, dict) else None
    if isinstance(obj, dict) and "spec" in obj and (obj.get("metadata") or {}).get("name"):
        return event
    return None


def _decode_list_head(raw: bytes) -> Any:
    """Only a node list page's metadata: its items are skipped, whatever their shape."""
    return _decoder(_NodeListHead).decode(raw)


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


def _list_records(client: KubeClient, convert: Callable[[_Fields], T], page_size: int = LIST_PAGE_SIZE,
                  on_page: Callable[[], None] | None = None) -> tuple[list[T], str]:
    """Every node, read in pages, as ``convert`` makes it of the node's fields, oldest first; and the
    list's resourceVersion.

    A page over kubeclient.MAX_BODY, or one that cannot be decoded, is read again in pages of a tenth
    of the nodes, down to one: a node that still cannot be decoded alone is skipped with a warning. A
    node of the wrong shape is skipped with a warning too. ``on_page`` is called after each page.
    """
    # Parsed pages hold no reference cycles: the cycle collector's passes over thousands of
    # node dicts would only cost CPU while listing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        records: list[tuple[str, T]] = []
        cont = ""
        limit = page_size
        while True:
            try:
                page = client.list_nodes(limit, cont, decode=decode_node_list)
            except (TooLarge, Undecodable) as exc:
                if limit > 1:
                    limit = max(1, limit // 10)
                    continue
                if isinstance(exc, TooLarge):
                    raise ApiError(0, "the node list holds a node of more than %d bytes: %s" % (MAX_BODY, exc)) \
                        from None
                page = client.list_nodes(1, cont, decode=_decode_list_head)
                log.warning("Skipping a node of the node list that cannot be read: %s", exc)
            limit = page_size
            items = page.get("items") or ()
            for obj in items if isinstance(items, list) else ():
                try:
                    fields = _node_fields(obj)
                    records.append((fields.created, convert(fields)))
                except ValueError as exc:
                    log.warning('Skipping node "%s" of the node list: %s', _name_of(obj), exc)
            if on_page is not None:
                on_page()
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                break
    finally:
        if was_enabled:
            gc.enable()
    # RFC 3339 in UTC sorts as text; the sort is stable and the API server lists by name, so of nodes
    # created in one second the first by name comes first, as on every node.
    records.sort(key=lambda r: r[0])
    return [record for _, record in records], meta.get("resourceVersion") or ""


def list_nodes(client: KubeClient, prefix: str, page_size: int = LIST_PAGE_SIZE,
               on_page: Callable[[], None] | None = None) -> tuple[list[NodeInfo], str]:
    """Every node, read in pages, as NodeInfo oldest first; and the list's resourceVersion.

    ``prefix`` selects the annotations kept; ``on_page`` is called after each page. See _list_records.
    """
    return _list_records(client, lambda fields: _info(fields, prefix), page_size, on_page)


def _name_of(obj: Any) -> str:
    """A node object's name for a message, as far as it has one."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name[:253] if isinstance(name, str) else "?"


def changed_at(obj: Any) -> float | None:
    """When the API server wrote a node last, as a UNIX time: the newest ``time`` of its managed fields
    (whole seconds); None when it has none. (The managed fields of a node too large to read whole are not
    read: its change counts from its arrival.)"""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    entries = meta.get("managedFields") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        return None
    # RFC 3339 in UTC, as the API server writes it, sorts as text
    newest = max((t for e in entries if isinstance(e, dict) and isinstance(t := e.get("time"), str)), default="")
    try:
        return datetime.fromisoformat(newest).timestamp() if newest else None
    except ValueError:
        return None


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
    return Lease(subnet, public_ip, sys.intern(node.annotations.get(keys.backend_type, "")),
                 node.annotations.get(keys.data(family), ""))


def _inside(subnet: IPNetwork, network: IPNetwork) -> bool:
    """``subnet`` is of ``network``'s family and inside it (``subnet_of``, in integers: it runs for every node)."""
    shift = network.max_prefixlen - network.prefixlen
    return (subnet.version == network.version and subnet.prefixlen >= network.prefixlen
            and int(subnet.network_address) >> shift == int(network.network_address) >> shift)


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
        self._sizes: list[int] = []  # host bits: small ints, which Python does not allocate
        self._names: list[str] = []

    def _holder(self, first: int, last: int) -> str | None:
        # The held ranges are disjoint: only the last one starting at or before our end can overlap.
        i = bisect_right(self._firsts, last) - 1
        if i >= 0 and self._firsts[i] | ((1 << self._sizes[i]) - 1) >= first:
            return self._names[i]
        return None

    def holder(self, subnet: IPNetwork) -> str | None:
        """The node holding a subnet that overlaps ``subnet``, if any."""
        return self._holder(int(subnet.network_address), last_address(subnet))

    def holder_of(self, address: IPAddress) -> str | None:
        """The node holding a subnet that contains ``address``, if any."""
        return self._holder(int(address), int(address))

    def add(self, subnet: IPNetwork, name: str) -> None:
        first = int(subnet.network_address)
        i = bisect_left(self._firsts, first)
        self._firsts.insert(i, first)
        self._sizes.insert(i, subnet.max_prefixlen - subnet.prefixlen)
        self._names.insert(i, name)

    def remove(self, subnet: IPNetwork) -> None:
        i = bisect_left(self._firsts, int(subnet.network_address))
        del self._firsts[i], self._sizes[i], self._names[i]


class _Addresses:
    """The public IPs of the leases, sorted; finds one inside a subnet by bisection. (Two nodes may
    advertise one address: their tunnels end at the same host, which takes nothing from either.)"""

    def __init__(self) -> None:
        self._values: list[int] = []  # sorted
        self._names: list[str] = []

    def inside(self, subnet: IPNetwork) -> str | None:
        """A node whose public IP lies in ``subnet``, if any."""
        i = bisect_left(self._values, int(subnet.network_address))
        return self._names[i] if i < len(self._values) and self._values[i] <= last_address(subnet) else None

    def add(self, address: IPAddress, name: str) -> None:
        i = bisect_right(self._values, int(address))
        self._values.insert(i, int(address))
        self._names.insert(i, name)

    def remove(self, address: IPAddress, name: str) -> None:
        i = bisect_left(self._values, int(address))
        while self._names[i] != name:
            i += 1
        del self._values[i], self._names[i]


@dataclass(frozen=True, slots=True)
class _Skip:
    """Why a node has no lease of a family: a refusal (a warning), or what flanneld reports at Info when it
    cannot turn a node into a lease (a node that is not set up yet)."""

    reason: str
    warn: bool


@dataclass(slots=True)
class _Peer:
    """Another node as the manager keeps it: per enabled family in the manager's order, its lease or why
    it has none. No annotation, nor its pod CIDRs' text, is kept: thousands of these may be."""

    name: str
    field: str  # the node field of its pod CIDRs, for messages: "spec.podCIDR" or "spec.podCIDRs"
    managed: bool  # it carries kube-subnet-manager: "true"
    leases: Lease | _Skip | tuple[Lease | _Skip, ...]  # the one family's, or each family's; () when not managed

    def lease(self, index: int) -> Lease | _Skip:
        """Its lease of the manager's ``index``-th family, or why it has none."""
        return self.leases[index] if isinstance(self.leases, tuple) else self.leases

    def pod_cidr(self, lease: Lease) -> str:
        """Its pod CIDR of ``lease``, as messages show it: ``10.244.2.0/24 (spec.podCIDR)``."""
        return "%s (%s)" % (lease.subnet, self.field)


def _peer_lease(info: NodeInfo, keys: AnnotationKeys, family: Family) -> Lease | _Skip:
    """Another node's lease of ``family``, or why it has none: its annotations bounded, parsed, its public IP
    a usable unicast address."""
    for key in (keys.backend_type, keys.public_ip(family), keys.data(family)):
        value = info.annotations.get(key, "")
        if not isinstance(value, str):
            return _Skip("its annotation %s is not a string" % key, True)
        size = len(value)
        if size > MAX_ANNOTATION:
            return _Skip("its annotation %s is %d bytes, more than the %d flannel allows" % (key, size, MAX_ANNOTATION),
                         True)
    try:
        lease = node_to_lease(info, keys, family)
    except ValueError as exc:
        return _Skip(str(exc), False)
    problem = public_ip_problem(lease.public_ip)
    if problem:
        return _Skip("its public IP %s (%s) %s" % (lease.public_ip, keys.public_ip(family), problem), True)
    return lease


class _FamilyLeases:
    """The other nodes' valid leases of one family, and this node's subnet of it.

    Every method is called with the manager's lock held; ``nodes`` is the manager's record of the other
    nodes, ``index`` this family's place in their ``leases``.
    """

    def __init__(self, family: Family, index: int, network: IPNetwork, node_name: str,
                 nodes: dict[str, _Peer], dual: bool) -> None:
        self.family = family
        self.index = index
        self.network = network
        self.node_name = node_name
        self.nodes = nodes
        self.host = NodeNetwork()  # this node's network, once the daemon knows its interface
        self.leases: dict[str, Lease] = {}
        self.claims = _Claims()  # the subnets of leases and this node's own subnet
        # The public IPs of leases that lie in the Network, the only ones a pod CIDR can contain: in most
        # clusters none, so that checking a lease against them costs nothing.
        self.addresses = _Addresses()
        self._shift = network.max_prefixlen - network.prefixlen
        self._prefix = int(network.network_address) >> self._shift
        self.own_subnet: IPNetwork | None = None
        self.waiting: dict[str, None] = {}  # nodes refused for what another holds, in the order they came
        # In dual-stack a node skipped in one family keeps its lease of the other: say which.
        self._only = " (skipped for %s only)" % family if dual else ""

    def candidate(self, node: _Peer, quiet: bool) -> Lease | None:
        """The lease a node describes if it is valid, before the checks against the other leases; logs why
        not unless quiet."""
        found = node.lease(self.index)
        if isinstance(found, _Skip):
            if quiet:
                pass
            elif found.warn:
                log.warning('Ignoring node "%s": %s%s', node.name, found.reason, self._only)
            else:
                log.info("Error turning node \"%s\" to lease: %s%s", node.name, found.reason, self._only)
            return None
        problem = subnet_problem(found.subnet, self.network) or self.host.subnet_problem(found.subnet)
        if problem:
            if not quiet:
                log.warning('Ignoring node "%s": its pod CIDR %s %s%s', node.name, node.pod_cidr(found), problem,
                            self._only)
            return None
        problem = self.host.address_problem(found.public_ip)
        if problem:
            if not quiet:
                log.warning('Ignoring node "%s": its public IP %s %s%s', node.name, found.public_ip, problem,
                            self._only)
            return None
        return found

    def _within(self, address: IPAddress) -> bool:
        """Whether ``address`` lies in the Network (where every pod CIDR lies)."""
        return address.version == self.network.version and int(address) >> self._shift == self._prefix

    def _whose(self, holder: str) -> str:
        return "this node" if holder == self.node_name else 'node "%s", which held it first' % holder

    def _conflict(self, node: _Peer, lease: Lease) -> str:
        """What of another node the lease would take ('' when nothing): part of its pod CIDR, or of the pod CIDR
        its public IP lies in, or another node's public IP inside its pod CIDR."""
        holder = self.claims.holder(lease.subnet)
        if holder is not None:
            return "its pod CIDR %s overlaps the pod CIDR of %s" % (node.pod_cidr(lease), self._whose(holder))
        holder = self.claims.holder_of(lease.public_ip) if self._within(lease.public_ip) else None
        if holder is not None:
            return "its public IP %s lies in the pod CIDR of %s" % (lease.public_ip, self._whose(holder))
        holder = self.addresses.inside(lease.subnet)
        if holder is not None:
            return "its pod CIDR %s contains the public IP of %s" % (node.pod_cidr(lease), self._whose(holder))
        return ""

    def _grant(self, name: str, lease: Lease) -> None:
        self.leases[name] = lease
        self.claims.add(lease.subnet, name)
        if self._within(lease.public_ip):
            self.addresses.add(lease.public_ip, name)
        self.waiting.pop(name, None)
        metrics.LEASE_EVENTS.labels("added").inc()

    def _revoke(self, name: str) -> None:
        lease = self.leases.pop(name)
        self.claims.remove(lease.subnet)
        if self._within(lease.public_ip):
            self.addresses.remove(lease.public_ip, name)
        metrics.LEASE_EVENTS.labels("removed").inc()

    def _retry_waiting(self) -> set[str]:
        """Give waiting nodes what is free now; the names that got a lease."""
        granted = set()
        for name in list(self.waiting):
            node = self.nodes[name]
            lease = self.candidate(node, quiet=True)
            if lease is None:
                del self.waiting[name]
            elif not self._conflict(node, lease):
                log.info('Node "%s" takes pod CIDR %s, which no other node claims now', name, lease.subnet)
                self._grant(name, lease)
                granted.add(name)
        return granted

    def update(self, node: _Peer, quiet: bool) -> set[str]:
        """Apply another node's new record; the names whose lease changed.

        ``quiet``: its record is as before, so its problems were logged already.
        """
        lease = self.candidate(node, quiet) if node.managed else None
        current = self.leases.get(node.name)
        if lease == current:
            return set()
        changed = set()
        if current is not None:
            self._revoke(node.name)
            changed.add(node.name)
        if lease is None:
            self.waiting.pop(node.name, None)
        else:
            conflict = self._conflict(node, lease)
            if not conflict:
                self._grant(node.name, lease)
                changed.add(node.name)
            else:
                if not (quiet and node.name in self.waiting):
                    log.warning('Ignoring node "%s": %s%s', node.name, conflict, self._only)
                self.waiting[node.name] = None
        if current is not None:
            changed |= self._retry_waiting()
        return changed

    def _evict(self, name: str, reason: str) -> None:
        """Take a node's lease away for something this node holds; it waits until that is free."""
        log.warning('Ignoring node "%s": %s%s', name, reason, self._only)
        self._revoke(name)
        self.waiting[name] = None

    def update_own(self, node: NodeInfo) -> set[str]:
        """Reserve this node's subnet; a node holding part of it, or advertising a public IP in it, loses its lease."""
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
                self._evict(holder, "its pod CIDR %s overlaps the pod CIDR of this node"
                            % self.nodes[holder].pod_cidr(self.leases[holder]))
                changed.add(holder)
            while (holder := self.addresses.inside(subnet)) is not None:
                self._evict(holder, "its public IP %s lies in the pod CIDR of this node"
                            % self.leases[holder].public_ip)
                changed.add(holder)
            self.claims.add(subnet, self.node_name)
        return changed | self._retry_waiting()

    def set_host(self, host: NodeNetwork) -> set[str]:
        """Refuse from now on what would point into this node's network; the leases that already do go."""
        self.host = host
        changed = {name for name in self.leases if self.candidate(self.nodes[name], quiet=False) is None}
        for name in changed:
            self._revoke(name)
        return changed | (self._retry_waiting() if changed else set())

    def delete(self, name: str) -> set[str]:
        """Forget a node (already gone from ``nodes`` unless it is this node); the names whose lease changed."""
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
                 networks: dict[Family, IPNetwork], on_change: Callable[[set[str], float | None], None]) -> None:
        self.client = client
        self.node_name = node_name
        self.keys = keys
        self.prefix = prefix
        self.networks = {f: networks[f] for f in FAMILIES if f in networks}
        self.on_change = on_change
        self.synced = threading.Event()
        self.progress = time.monotonic()
        self._lock = threading.Lock()
        self._own: NodeInfo | None = None  # this node, with its flannel annotations whole
        self._nodes: dict[str, _Peer] = {}  # the other nodes
        dual = len(self.networks) > 1
        self._families = {f: _FamilyLeases(f, i, net, node_name, self._nodes, dual)
                          for i, (f, net) in enumerate(self.networks.items())}
        self._rv = ""
        self._bad_overwrite: dict[Family, str] = {}

    @property
    def name(self) -> str:
        return "Kubernetes Subnet Manager - %s" % self.node_name

    # -- the node cache --------------------------------------------------------------------------

    def own_node(self) -> NodeInfo | None:
        """This node's record in the cache, with its flannel annotations whole (flannel reads its node
        from the cache, never with GET)."""
        with self._lock:
            return self._own

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

    def set_node_network(self, networks: dict[Family, NodeNetwork]) -> None:
        """Refuse from now on the leases that point into this node's network of each family (with the API
        server's address added); the leases that already do are taken away."""
        changed: set[str] = set()
        with self._lock:
            for family, fam in self._families.items():
                if family in networks:
                    changed |= fam.set_host(networks[family].with_servers([self.client.host]))
            self._count()
        if changed:
            self.on_change(changed, None)

    def _record(self, fields: _Fields) -> NodeInfo | _Peer:
        """What is kept of a node: this node's flannel annotations whole; another node's leases, parsed."""
        if fields.name == self.node_name:
            return _info(fields, self.prefix)
        ann = fields.annotations
        if ann.get(self.keys.subnet_kube_managed) != "true":
            return _Peer(fields.name, "", False, ())
        info = NodeInfo(fields.name, fields.pod_cidr, fields.pod_cidrs, ann)
        leases = [_peer_lease(info, self.keys, family) for family in self._families]
        return _Peer(fields.name, pod_cidr_field(info), True, leases[0] if len(leases) == 1 else tuple(leases))

    def _update(self, node: NodeInfo | _Peer) -> set[str]:
        """Store a node's record; the names whose lease changed in any family (this node's own name when
        it is the node). Called with the lock held."""
        changed: set[str] = set()
        if isinstance(node, NodeInfo):
            self._own = node
            changed.add(node.name)
            for fam in self._families.values():
                changed |= fam.update_own(node)
            return changed
        old = self._nodes.get(node.name)
        self._nodes[node.name] = node
        quiet = old == node  # log a bad node once when it changes, not on every relist
        for fam in self._families.values():
            changed |= fam.update(node, quiet)
        return changed

    def _delete(self, name: str) -> set[str]:
        """Forget a node; the names whose lease changed. Lock held."""
        if name == self.node_name:
            self._own = None
        elif self._nodes.pop(name, None) is None:
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
        nodes, rv = _list_records(self.client, self._record, LIST_PAGE_SIZE, self._made_progress)
        names = {info.name for info in nodes}
        changed: set[str] = set()
        with self._lock:
            for name in [*self._nodes, *([self.node_name] if self._own is not None else [])]:
                if name not in names:
                    changed |= self._delete(name)
            # This node's subnet is reserved first; the others come oldest first, so of two nodes
            # claiming one subnet the older keeps it, as it did for a daemon that saw both arrive.
            for info in sorted(nodes, key=lambda n: n.name != self.node_name):
                changed |= self._update(info)
            self._rv = rv
            self._count()
        heap.release(len(nodes))
        if changed:
            self.on_change(changed, None)

    def _watch(self, stop: threading.Event, backoff: _Backoff) -> None:
        """Apply watch events until the stream ends; raises ApiError(410) when the cache must be relisted."""
        timeout = random.randint(*WATCH_TIMEOUT_RANGE)
        for event in self.client.watch_nodes(self._rv, timeout, decode=decode_watch_event):
            self._made_progress()
            if stop.is_set():
                return
            kind = event.get("type")
            obj = event.get("object") or {}
            if not isinstance(obj, dict):
                raise Undecodable(0, "invalid watch event: its object is not a JSON object")
            if kind == "ERROR":
                code, message = obj.get("code"), obj.get("message")
                raise ApiError(code if isinstance(code, int) else 0,
                               message if isinstance(message, str) and message else "watch error")
            backoff.reset()
            try:
                fields = _node_fields(obj)
                record = self._record(fields) if kind in ("ADDED", "MODIFIED") else None
            except ValueError as exc:
                raise Undecodable(0, 'invalid watch event of node "%s": %s' % (_name_of(obj), exc)) from None
            changed: set[str] = set()
            with self._lock:
                if record is not None:
                    changed = self._update(record)
                elif kind == "DELETED":
                    changed = self._delete(fields.name)
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv and isinstance(rv, str):
                    self._rv = rv
                self._count()
            if changed:
                self.on_change(changed, changed_at(obj))

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
                if isinstance(exc, (TooLarge, Undecodable)) and not need_list:
                    log.warning("Skipping a node watch event that cannot be read (%s); listing the nodes again", exc)
                    metrics.WATCH_RESTARTS.labels("error").inc()
                    need_list = True
                elif exc.status == 410:
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
            page = self.client.list_nodes(1, field_selector="metadata.name=" + self.node_name,
                                          decode=decode_node_list)
            records = [self._record(_node_fields(obj)) for obj in page.get("items") or ()]
        except (ApiError, ValueError, TypeError) as exc:
            metrics.API_ERRORS.inc()
            log.warning("Failed to read node %s, waiting for the node list: %s", self.node_name, exc)
            return
        with self._lock:
            if self._own is None:  # the list may have been quicker
                for record in records:
                    if record.name == self.node_name:
                        self._update(record)

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
