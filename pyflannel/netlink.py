"""rtnetlink: one NETLINK_ROUTE socket, pyroute2's message classes to encode and decode.

pyroute2's message classes import in about 20 ms; its ``IPRoute`` brings an asyncio event loop
and costs several times that in CPU and memory, which the manifest's 100m CPU limit makes seconds
of start-up. Requests are sent in batches and their acknowledgements collected afterwards, so
programming thousands of neighbours, FDB entries and routes costs a few system calls, not one
round trip each.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ._pyroute2 import ifaddrmsg, ifinfmsg, ndmsg, rtmsg

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10  # set by the kernel on the messages of a dump that changes disturbed
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30

CREATE = NLM_F_CREATE | NLM_F_EXCL
REPLACE = NLM_F_CREATE | NLM_F_REPLACE

_HEADER = struct.Struct("=IHHII")
_SEND_CHUNK = 1 << 16  # bytes of requests per sendto, then their acknowledgements are read
DUMP_ATTEMPTS = 5  # a dump disturbed by concurrent changes is read again, up to this many times in all
SO_RCVBUFFORCE = 33  # Linux; not in Python's socket module. Ignores rmem_max, needs CAP_NET_ADMIN
MONITOR_RCVBUF = 1 << 22  # bytes; memory is taken only as notifications queue up

T = TypeVar("T")
Request = tuple[type, int, int, dict[str, Any], list[tuple[str, Any]]]
"""(message class, message type, extra flags, fixed fields, attributes), encoded by pyroute2."""


@dataclass(frozen=True, slots=True)
class Packed:
    """A request whose body is packed here: the neighbour, FDB and route messages, sent thousands
    at a time, where pyroute2's generic encoder costs some 40 µs each."""

    msg_type: int
    flags: int
    body: bytes


RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
_FAMILY_GROUPS: dict[int, int] = {socket.AF_INET: RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE,
                                   socket.AF_INET6: RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE}
IFF_UP = 0x1
IFLA_IFNAME = 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
RTN_UNICAST, RTN_BLACKHOLE = 1, 6
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
AF_BRIDGE = 7
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBi")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")
_IPV4_ATTR = struct.Struct("=HH4s")  # fixed-size attributes, packed in one call: thousands at start-up
_IPV6_ATTR = struct.Struct("=HH16s")
_MAC_ATTR = struct.Struct("=HH6s2x")  # 6 bytes, padded to 4-byte alignment
_U32_ATTR = struct.Struct("=HHI")

Deletion = tuple[str, int, str]
"""What the kernel deleted: ("neigh", ifindex, ip), ("fdb", ifindex, "mac dst"), ("route", table, "dst/len"),
("addr", ifindex, "ip/len"), ("link", ifindex, name); or ("down", ifindex, name): a link without IFF_UP;
or ("up", ifindex, name): a link with IFF_UP was created or changed (a re-created external interface).
Addresses of either family, IPv6 ones in their compressed form ("fd00:10:244:1::")."""


def parse_attrs(buf: bytes, off: int, end: int) -> dict[int, bytes]:
    """The rtattrs from ``off`` to ``end`` in ``buf``, by type."""
    out = {}
    while off + 4 <= end:
        length, kind = _RTATTR.unpack_from(buf, off)
        if length < 4:
            break
        out[kind & 0x3FFF] = buf[off + 4:off + length]
        off += (length + 3) & ~3
    return out


def _mac(b: bytes) -> str:
    return ":".join("%02x" % x for x in b)


def _address_attr(kind: int, address: str) -> bytes:
    """An attribute holding an IPv4 or IPv6 address given as text."""
    if ":" in address:
        return _IPV6_ATTR.pack(20, kind, socket.inet_pton(socket.AF_INET6, address))
    return _IPV4_ATTR.pack(8, kind, socket.inet_aton(address))


def neighbour_request(msg_type: int, flags: int, family: int, ifindex: int, state: int, ntf_flags: int,
                      dst: str, lladdr: str | None) -> Packed:
    """RTM_NEWNEIGH or RTM_DELNEIGH: a neighbour (AF_INET, AF_INET6) or an FDB entry (AF_BRIDGE, to an
    IPv4 or IPv6 remote). ``lladdr`` is an Ethernet MAC, as on every device flannel programs."""
    body = _NDMSG.pack(family, ifindex, state, ntf_flags, 0) + _address_attr(NDA_DST, dst)
    if lladdr is not None:
        body += _MAC_ATTR.pack(10, NDA_LLADDR, bytes.fromhex(lladdr.replace(":", "")))
    return Packed(msg_type, flags, body)


def route_request(msg_type: int, flags: int, dst: str, dst_len: int, gateway: str | None, oif: int | None,
                  table: int, proto: int, scope: int, rtype: int, rtm_flags: int, metric: int = 0) -> Packed:
    """RTM_NEWROUTE or RTM_DELROUTE for a route of the family of ``dst`` (an address's text); ``metric`` 0
    sends none (the kernel's default)."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    body = _RTMSG.pack(family, dst_len, 0, 0, table, proto, scope, rtype, rtm_flags) + _address_attr(RTA_DST, dst)
    if gateway is not None:
        body += _address_attr(RTA_GATEWAY, gateway)
    if oif is not None:
        body += _U32_ATTR.pack(8, RTA_OIF, oif)
    if metric:
        body += _U32_ATTR.pack(8, RTA_PRIORITY, metric)
    return Packed(msg_type, flags, body)


def _decode(cls: type, buf: bytes, off: int, length: int) -> Any:
    msg = cls(buf[off:off + length])
    msg.decode()
    return msg


def _ip(b: bytes | None) -> str | None:
    """An IPv4 or IPv6 address's text (IPv6 compressed, as ``ipaddress`` writes it), or None."""
    if b is None:
        return None
    if len(b) == 4:
        return socket.inet_ntoa(b)
    return socket.inet_ntop(socket.AF_INET6, b) if len(b) == 16 else None


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A neighbour or FDB entry: the fields the daemon reads."""

    family: int
    ifindex: int
    state: int
    dst: str | None
    lladdr: str | None


@dataclass(frozen=True, slots=True)
class Route:
    """A route: the fields the daemon reads."""

    dst: str  # "a.b.c.d/len" or "x:y::/len"
    gateway: str | None
    oif: int
    proto: int
    table: int
    type: int = RTN_UNICAST  # RTN_*: unicast, blackhole, ...
    metric: int = 0


def parse_neighbour(buf: bytes, body: int, end: int) -> Neighbour:
    """An ndmsg whose body runs from ``body`` to ``end`` in ``buf``."""
    family, ifindex, state, _, _ = _NDMSG.unpack_from(buf, body)
    a = parse_attrs(buf, body + _NDMSG.size, end)
    mac = a.get(NDA_LLADDR)
    return Neighbour(family, ifindex, state, _ip(a.get(NDA_DST)), _mac(mac) if mac else None)


def parse_route(buf: bytes, body: int, end: int) -> Route:
    """An rtmsg whose body runs from ``body`` to ``end`` in ``buf``."""
    family, dst_len, _, _, table, proto, _, rtype, _ = _RTMSG.unpack_from(buf, body)
    a = parse_attrs(buf, body + _RTMSG.size, end)
    if RTA_TABLE in a:
        table = struct.unpack("=I", a[RTA_TABLE])[0]
    oif = struct.unpack("=I", a[RTA_OIF])[0] if RTA_OIF in a else 0
    metric = struct.unpack("=I", a[RTA_PRIORITY])[0] if RTA_PRIORITY in a else 0
    dst = _ip(a.get(RTA_DST)) or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return Route("%s/%d" % (dst, dst_len), _ip(a.get(RTA_GATEWAY)), oif, proto, table, rtype, metric)


class NetlinkError(OSError):
    """The kernel refused a request."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code).lower())


class DumpInterrupted(NetlinkError):
    """The kernel's tables changed during a dump (NLM_F_DUMP_INTR): the answer may be inconsistent."""

    def __init__(self) -> None:
        super().__init__(errno.EINTR)


def read_dump(read: Callable[[], T]) -> T:
    """``read()``, one reading of a dump, again while it raises DumpInterrupted: up to DUMP_ATTEMPTS
    times in all, the last one's DumpInterrupted raised."""
    for _ in range(DUMP_ATTEMPTS - 1):
        try:
            return read()
        except DumpInterrupted:
            continue
    return read()


def request(cls: type, msg_type: int, flags: int = 0, fields: dict[str, Any] | None = None,
            attrs: list[tuple[str, Any]] | None = None) -> Request:
    """Describe one request for :meth:`Netlink.batch` or :meth:`Netlink.call`."""
    return (cls, msg_type, flags, fields or {}, attrs or [])


class Netlink:
    """A NETLINK_ROUTE socket in the process's network namespace (or ``sock``, an already bound one)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            sock.bind((0, 0))
        self.sock = sock
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def _encode(self, req: Request | Packed, flags: int) -> tuple[int, bytes]:
        if isinstance(req, Packed):
            self._seq += 1
            header = _HEADER.pack(_HEADER.size + len(req.body), req.msg_type, NLM_F_REQUEST | flags | req.flags,
                                  self._seq, 0)
            return self._seq, header + req.body
        cls, msg_type, extra, fields, attrs = req
        msg = cls()
        for key, value in fields.items():
            msg[key] = value
        msg["attrs"] = attrs
        self._seq += 1
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = NLM_F_REQUEST | flags | extra
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        return self._seq, bytes(msg.data)

    def _replies(self, until: int) -> Iterable[tuple[int, int, int, bytes, int, int]]:
        """(sequence, errno, header flags, buffer, offset, length) for every reply up to and including
        the acknowledgement or dump end of sequence ``until``; errno is 0 for a data message, and
        length 0 for an acknowledgement or a dump's end."""
        while True:
            buf = self.sock.recv(1 << 20)
            off = 0
            while off < len(buf):
                length, msg_type, msg_flags, seq, _ = _HEADER.unpack_from(buf, off)
                if length < _HEADER.size:
                    raise NetlinkError(errno.EPROTO)
                if msg_type == NLMSG_ERROR:
                    yield seq, -struct.unpack_from("=i", buf, off + _HEADER.size)[0], msg_flags, buf, off, 0
                    if seq == until:
                        return
                elif msg_type == NLMSG_DONE:
                    yield seq, 0, msg_flags, buf, off, 0
                    if seq == until:
                        return
                else:
                    yield seq, 0, msg_flags, buf, off, length
                off += (length + 3) & ~3

    def _answer(self, req: Request | Packed, flags: int) -> Iterable[tuple[bytes, int, int]]:
        """Send one request; (buffer, offset, length) of each message of its answer. Raises
        NetlinkError, and DumpInterrupted once a disturbed dump has been read to its end."""
        seq, data = self._encode(req, flags)
        self.sock.send(data)
        interrupted = False
        for rseq, code, msg_flags, buf, off, length in self._replies(seq):
            if rseq != seq:
                continue
            if code:
                raise NetlinkError(code)
            interrupted = interrupted or bool(msg_flags & NLM_F_DUMP_INTR)
            if length:
                yield buf, off, length
        if interrupted:
            raise DumpInterrupted()

    def _dump(self, req: Request | Packed, parse: Callable[[bytes, int, int], T | None]) -> list[T]:
        """A dump request; ``parse(buffer, offset, length)`` of each message of the answer, those
        that are not None. A dump that changes disturbed is read again, not trusted."""
        return read_dump(lambda: list(self._each(req, parse)))

    def _each(self, req: Request | Packed, parse: Callable[[bytes, int, int], T | None]) -> Iterator[T]:
        """One reading of a dump, each message parsed as it arrives; DumpInterrupted at its end if a
        change disturbed it."""
        for buf, off, length in self._answer(req, NLM_F_DUMP):
            item = parse(buf, off, length)
            if item is not None:
                yield item

    def batch(self, requests: Sequence[Request | Packed]) -> list[int]:
        """Send every request; the errno of each (0: done).

        The kernel answers a request without NLM_F_ACK only when it fails, and acknowledging each of
        thousands about doubles its work. So only a chunk's last request asks for an acknowledgement:
        it comes after the errors of the chunk's others.
        """
        results = [0] * len(requests)
        first = self._seq + 1
        i = 0
        while i < len(requests):
            chunk = bytearray()
            last = start = 0
            while i < len(requests) and len(chunk) < _SEND_CHUNK:
                start = len(chunk)
                last, data = self._encode(requests[i], 0)
                chunk += data
                i += 1
            length, msg_type, flags, seq, pid = _HEADER.unpack_from(chunk, start)
            _HEADER.pack_into(chunk, start, length, msg_type, flags | NLM_F_ACK, seq, pid)
            self.sock.send(chunk)
            for seq, code, _, _, _, length in self._replies(last):
                if first <= seq <= last and not length:
                    results[seq - first] = code
        return results

    def call(self, req: Request) -> list[Any]:
        """Send one request and wait for it; its answer, decoded. Raises NetlinkError."""
        return [_decode(req[0], buf, off, length) for buf, off, length in self._answer(req, NLM_F_ACK)]

    def dump(self, req: Request) -> list[Any]:
        """A dump request; every message of the answer, decoded."""
        cls = req[0]
        return self._dump(req, lambda buf, off, length: _decode(cls, buf, off, length))

    def write_sysctl(self, key: str, value: str) -> None:
        """Write ``/proc/sys/<key>``, of the process's (and the socket's) network namespace."""
        with open("/proc/sys/" + key, "w") as f:
            f.write(value)

    # -- the look-ups the daemon makes ----------------------------------------------------------------

    def links(self) -> list[Any]:
        """Every link."""
        return self.dump(request(ifinfmsg, RTM_GETLINK))

    def link(self, name: str = "", index: int = 0) -> Any | None:
        """One link by name or index, or None."""
        try:
            found = self.call(request(ifinfmsg, RTM_GETLINK, fields={"index": index},
                                      attrs=[("IFLA_IFNAME", name)] if name else []))
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return found[0] if found else None

    def addresses(self, index: int = 0, family: int = socket.AF_INET) -> list[Any]:
        """The addresses of a family, of one link when ``index`` is given, in kernel order."""
        found = self.dump(request(ifaddrmsg, RTM_GETADDR, fields={"family": family}))
        return [m for m in found if not index or m["index"] == index]

    def routes(self, table: int = 254, family: int = socket.AF_INET, rtype: int = 0) -> list[Route]:
        """The routes of a family in a table (of one RTN_* type when ``rtype`` is given). Read with
        :func:`parse_route`, not decoded whole: a node's table holds a route for every other node, and
        this runs on every reconcile. A socket with :meth:`strict_dumps` has the kernel filter them."""
        return read_dump(lambda: list(self.iter_routes(table, family, rtype)))

    def strict_dumps(self) -> bool:
        """Ask the kernel (4.20+) to filter dumps by the request's fields (NETLINK_GET_STRICT_CHK); whether it will.
        Without it every route is sent and :meth:`routes` filters them."""
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        except OSError:
            return False
        return True

    def iter_routes(self, table: int = 254, family: int = socket.AF_INET, rtype: int = 0) -> Iterator[Route]:
        """:meth:`routes`, read as they arrive, never all held: one reading, which raises DumpInterrupted at
        its end if a change disturbed it (the caller reads it again)."""
        def parse(buf: bytes, off: int, length: int) -> Route | None:
            r = parse_route(buf, off + _HEADER.size, off + length)
            return r if r.table == table and (not rtype or r.type == rtype) else None
        fields = {"family": family, "table": table, "type": rtype} if rtype else {"family": family}
        return self._each(request(rtmsg, RTM_GETROUTE, fields=fields), parse)

    def iter_neighbours(self, family: int, index: int) -> Iterator[Neighbour]:
        """:meth:`neighbours`, read as they arrive, as :meth:`iter_routes` are."""
        def parse(buf: bytes, off: int, length: int) -> Neighbour | None:
            n = parse_neighbour(buf, off + _HEADER.size, off + length)
            return n if n.ifindex == index else None
        return self._each(request(ndmsg, RTM_GETNEIGH, fields={"family": family}), parse)

    def route_get(self, dst: str) -> list[Any]:
        """The route the kernel would use to reach ``dst``, an IPv4 or IPv6 address (``ip route get``)."""
        family, length = (socket.AF_INET6, 128) if ":" in dst else (socket.AF_INET, 32)
        return self.call(request(rtmsg, RTM_GETROUTE, fields={"family": family, "dst_len": length},
                                 attrs=[("RTA_DST", dst)]))

    def neighbours(self, family: int, index: int) -> list[Neighbour]:
        """Neighbour (AF_INET, AF_INET6) or FDB (AF_BRIDGE) entries of one link, read as :meth:`routes` are."""
        return read_dump(lambda: list(self.iter_neighbours(family, index)))


def deletions(buf: bytes, families: frozenset[int] = frozenset((socket.AF_INET,))) -> list[Deletion]:
    """The neighbour, route and address deletions of the address ``families``, the FDB and link
    deletions, and the links' news (with or without IFF_UP), in a buffer of rtnetlink notifications.

    Only the few fields needed are read, so the many notifications a busy node sends cost little.
    """
    out: list[Deletion] = []
    off = 0
    while off + _HEADER.size <= len(buf):
        length, msg_type, _, _, _ = _HEADER.unpack_from(buf, off)
        if length < _HEADER.size:
            break
        body, end = off + _HEADER.size, off + length
        if msg_type == RTM_DELNEIGH:
            n = parse_neighbour(buf, body, end)
            if n.family in families and n.dst:
                out.append(("neigh", n.ifindex, n.dst))
            elif n.family == AF_BRIDGE and n.dst and n.lladdr:
                out.append(("fdb", n.ifindex, "%s %s" % (n.lladdr, n.dst)))
        elif msg_type == RTM_DELROUTE and buf[body] in families:
            r = parse_route(buf, body, end)
            out.append(("route", r.table, r.dst))
        elif msg_type == RTM_DELADDR and buf[body] in families:
            _, prefixlen, _, _, index = _IFADDRMSG.unpack_from(buf, body)
            a = parse_attrs(buf, body + _IFADDRMSG.size, end)
            out.append(("addr", index, "%s/%d" % (_ip(a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)), prefixlen)))
        elif msg_type in (RTM_DELLINK, RTM_NEWLINK):
            _, index, link_flags, _ = _IFINFOMSG.unpack_from(buf, body)[1:]
            name = parse_attrs(buf, body + _IFINFOMSG.size, end).get(IFLA_IFNAME, b"").rstrip(b"\0").decode()
            kind = "link" if msg_type == RTM_DELLINK else "up" if link_flags & IFF_UP else "down"
            out.append((kind, index, name))
        off += (length + 3) & ~3
    return out


class Monitor:
    """Link, neighbour, and the address and route notifications of the address ``families``
    (AF_INET, AF_INET6) from the kernel, for repairing deletions at once.

    The receive buffer is raised with SO_RCVBUFFORCE, which plain SO_RCVBUF's cap (rmem_max,
    208 KiB by default) does not limit; without CAP_NET_ADMIN it is SO_RCVBUF's best.
    """

    def __init__(self, rcvbuf: int = MONITOR_RCVBUF, families: Iterable[int] = (socket.AF_INET,)) -> None:
        self.families = frozenset(families)
        groups = RTMGRP_LINK | RTMGRP_NEIGH
        for af in self.families:
            groups |= _FAMILY_GROUPS[af]
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, groups))
        self.sock.settimeout(1.0)

    def run(self, stop: threading.Event, on_deleted: Callable[[list[Deletion]], None]) -> None:
        """Report deletions until ``stop`` is set. A lost notification (ENOBUFS) reports ``[]``:
        the caller should then compare everything."""
        while not stop.is_set():
            try:
                buf = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                on_deleted([])
                continue
            found = deletions(buf, self.families)
            if found:
                on_deleted(found)
        self.sock.close()
