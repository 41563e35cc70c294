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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._pyroute2 import ifaddrmsg, ifinfmsg, ndmsg, rtmsg

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
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

Request = tuple[type, int, int, dict[str, Any], list[tuple[str, Any]]]
"""(message class, message type, extra flags, fixed fields, attributes)."""


class NetlinkError(OSError):
    """The kernel refused a request."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code).lower())


def request(cls: type, msg_type: int, flags: int = 0, fields: dict[str, Any] | None = None,
            attrs: list[tuple[str, Any]] | None = None) -> Request:
    """Describe one request for :meth:`Netlink.batch` or :meth:`Netlink.call`."""
    return (cls, msg_type, flags, fields or {}, attrs or [])


class Netlink:
    """A NETLINK_ROUTE socket in the process's network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def _encode(self, req: Request, flags: int) -> tuple[int, bytes]:
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

    def _replies(self, until: int, cls: type | None) -> Iterable[tuple[int, int, Any]]:
        """(sequence, errno, decoded message or None) for every reply up to and including
        the acknowledgement (or dump end) of sequence ``until``."""
        while True:
            buf = self.sock.recv(1 << 20)
            off = 0
            while off < len(buf):
                length, msg_type, _, seq, _ = _HEADER.unpack_from(buf, off)
                if length < _HEADER.size:
                    raise NetlinkError(errno.EPROTO)
                if msg_type == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", buf, off + _HEADER.size)[0]
                    yield seq, code, None
                    if seq == until:
                        return
                elif msg_type == NLMSG_DONE:
                    if seq == until:
                        return
                elif cls is not None:
                    msg = cls(buf[off:off + length])
                    msg.decode()
                    yield seq, 0, msg
                off += (length + 3) & ~3

    def batch(self, requests: Sequence[Request]) -> list[int]:
        """Send every request with an acknowledgement asked for; the errno of each (0: done)."""
        results = [0] * len(requests)
        first = self._seq + 1
        i = 0
        while i < len(requests):
            chunk = bytearray()
            last = 0
            while i < len(requests) and len(chunk) < _SEND_CHUNK:
                last, data = self._encode(requests[i], NLM_F_ACK)
                chunk += data
                i += 1
            self.sock.send(chunk)
            for seq, code, _ in self._replies(last, None):
                if first <= seq <= last:
                    results[seq - first] = code
        return results

    def call(self, req: Request) -> list[Any]:
        """Send one request and wait for it; the messages it answered with. Raises NetlinkError."""
        seq, data = self._encode(req, NLM_F_ACK)
        self.sock.send(data)
        out = []
        for rseq, code, msg in self._replies(seq, req[0]):
            if rseq != seq:
                continue
            if code:
                raise NetlinkError(code)
            if msg is not None:
                out.append(msg)
        return out

    def dump(self, req: Request) -> list[Any]:
        """A dump request; every message of the answer."""
        seq, data = self._encode(req, NLM_F_DUMP)
        self.sock.send(data)
        out = []
        for rseq, code, msg in self._replies(seq, req[0]):
            if rseq == seq and code:
                raise NetlinkError(code)
            if rseq == seq and msg is not None:
                out.append(msg)
        return out

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

    def addresses(self, index: int = 0) -> list[Any]:
        """IPv4 addresses, of one link when ``index`` is given, in kernel order."""
        found = self.dump(request(ifaddrmsg, RTM_GETADDR, fields={"family": socket.AF_INET}))
        return [m for m in found if not index or m["index"] == index]

    def routes(self, table: int = 254) -> list[Any]:
        """IPv4 routes of a table."""
        found = self.dump(request(rtmsg, RTM_GETROUTE, fields={"family": socket.AF_INET}))
        return [m for m in found if (m.get_attr("RTA_TABLE") or m["table"]) == table]

    def route_get(self, dst: str) -> list[Any]:
        """The route the kernel would use to reach ``dst`` (``ip route get``)."""
        return self.call(request(rtmsg, RTM_GETROUTE, fields={"family": socket.AF_INET, "dst_len": 32},
                                 attrs=[("RTA_DST", dst)]))

    def neighbours(self, family: int, index: int) -> list[Any]:
        """Neighbour (AF_INET) or FDB (AF_BRIDGE) entries of one link."""
        found = self.dump(request(ndmsg, RTM_GETNEIGH, fields={"family": family}))
        return [m for m in found if m["ifindex"] == index]


RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_ROUTE = 0x40
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
_NDMSG = struct.Struct("=BxxxiHBB")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")

Deletion = tuple[str, int, str]
"""What the kernel deleted: ("neigh", ifindex, ip), ("fdb", ifindex, "mac dst") or ("route", table, "dst/len")."""


def _attrs(buf: bytes, off: int, end: int) -> dict[int, bytes]:
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


def deletions(buf: bytes) -> list[Deletion]:
    """The neighbour, FDB and IPv4 route deletions in a buffer of rtnetlink notifications.

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
            family, ifindex, _, _, _ = _NDMSG.unpack_from(buf, body)
            a = _attrs(buf, body + _NDMSG.size, end)
            dst = a.get(NDA_DST)
            if family == socket.AF_INET and dst and len(dst) == 4:
                out.append(("neigh", ifindex, socket.inet_ntoa(dst)))
            elif family == 7 and dst and len(dst) == 4 and NDA_LLADDR in a:  # AF_BRIDGE
                out.append(("fdb", ifindex, "%s %s" % (_mac(a[NDA_LLADDR]), socket.inet_ntoa(dst))))
        elif msg_type == RTM_DELROUTE:
            family, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(buf, body)
            a = _attrs(buf, body + _RTMSG.size, end)
            if RTA_TABLE in a:
                table = struct.unpack("=I", a[RTA_TABLE])[0]
            dst = a.get(RTA_DST, b"\0\0\0\0")
            if family == socket.AF_INET and len(dst) == 4:
                out.append(("route", table, "%s/%d" % (socket.inet_ntoa(dst), dst_len)))
        off += (length + 3) & ~3
    return out


class Monitor:
    """Neighbour and IPv4 route notifications from the kernel, for repairing deletions at once."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind((0, RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE))
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
            found = deletions(buf)
            if found:
                on_deleted(found)
        self.sock.close()
