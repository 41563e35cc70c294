"""A netlink monitor of some devices' routes, neighbours and FDB entries, run inside a node's namespace.

    ip netns exec NS python -m bench.nlmon flannel.1 [flannel-v6.1 ...]

It subscribes to the link, neighbour and IPv4 and IPv6 route groups before printing ``ready``, then
prints one line per change of the devices' entries, of either family, stamped with ``time.time()``
when the message was read:

    <time> <+|-> r <dst>/<len> <gateway>   route in the main table, not the kernel's own
    <time> <+|-> n <ip> <mac>              neighbour
    <time> <+|-> f <mac> <remote ip>       FDB entry

``<time> reset <device>`` means the device went away (and its entries with it); ``<time> overflow``
that the kernel dropped messages, so the picture is no longer complete. It reads messages with pyflannel's
own small parsers, which keep up with thousands of messages a second.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
import time

from pyflannel.netlink import (AF_BRIDGE, RTM_DELLINK, RTM_DELNEIGH, RTM_DELROUTE, RTM_NEWLINK, RTM_NEWNEIGH,
                                RTM_NEWROUTE, RTMGRP_IPV4_ROUTE, RTMGRP_NEIGH, parse_attrs, parse_neighbour, parse_route)

RTMGRP_LINK = 0x1
RTMGRP_IPV6_ROUTE = 0x400
IFLA_IFNAME = 3
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2  # the kernel's own routes (an IPv6 device's address and fe80::/64 are in the main table)
SO_RCVBUFFORCE = 33
RCVBUF = 256 << 20  # charged only as used; a 5,000-node start-up sends ~15,000 messages at once

NLMSGHDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")


class Monitor:
    """Turns netlink messages about ``devices`` into output lines."""

    def __init__(self, *devices: str) -> None:
        self.devices = devices
        self.names: dict[int, str] = {}  # ifindex -> name, of the watched devices that exist

    def lines(self, data: bytes, stamp: str) -> list[str]:
        """The output lines for one datagram."""
        out = []
        offset = 0
        while offset + NLMSGHDR.size <= len(data):
            length, kind = NLMSGHDR.unpack_from(data, offset)[:2]
            if length < NLMSGHDR.size:
                break
            body, end = offset + NLMSGHDR.size, offset + length
            op = "+" if kind in (RTM_NEWROUTE, RTM_NEWNEIGH) else "-"
            if kind in (RTM_NEWLINK, RTM_DELLINK):
                index = IFINFOMSG.unpack_from(data, body)[2]
                name = parse_attrs(data, body + IFINFOMSG.size, end).get(IFLA_IFNAME, b"").rstrip(b"\0").decode()
                if kind == RTM_NEWLINK and name in self.devices:
                    self.names[index] = name
                elif kind == RTM_DELLINK and index in self.names:
                    out.append("%s reset %s" % (stamp, self.names.pop(index)))
            elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and data[body] in (socket.AF_INET, socket.AF_INET6):
                r = parse_route(data, body, end)
                if r.table == RT_TABLE_MAIN and r.proto != RTPROT_KERNEL and r.oif in self.names:
                    out.append("%s %s r %s %s" % (stamp, op, r.dst, r.gateway or "-"))
            elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
                n = parse_neighbour(data, body, end)
                if n.ifindex in self.names:
                    if n.family in (socket.AF_INET, socket.AF_INET6):
                        out.append("%s %s n %s %s" % (stamp, op, n.dst or "-", n.lladdr or "-"))
                    elif n.family == AF_BRIDGE:
                        out.append("%s %s f %s %s" % (stamp, op, n.lladdr or "-", n.dst or "-"))
            offset += (length + 3) & ~3
        return out


def main(argv: list[str]) -> int:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
    monitor = Monitor(*(argv or ["flannel.1"]))
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    buf = bytearray(1 << 20)
    while True:
        try:
            n = sock.recv_into(buf)
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            out.write("%.6f overflow\n" % time.time())
            out.flush()
            continue
        lines = monitor.lines(bytes(buf[:n]), "%.6f" % time.time())
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(0)
