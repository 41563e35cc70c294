"""A test double of the netlink boundary: the object the daemon and the VXLAN backend are given as
``nl`` (:class:`pyflannel.netlink.Netlink`'s interface), with the kernel state in memory.

It answers with pyroute2's real message classes (encoded and decoded, as the kernel's answers
are) and the parsed :class:`~pyflannel.netlink.Route` and :class:`~pyflannel.netlink.Neighbour`,
of both IP families, and applies the kernel's rules that matter to flannel: a link created down
(a VXLAN link with the MTU the kernel allows over its family); a link set down loses its routes
(IPv6 ones with a notification), its neighbours and its IPv6 addresses but keeps its FDB entries
and IPv4 addresses; a link's last IPv4 address removed takes its routes and neighbours with it; an
IPv6 address has a kernel route (``/128`` ones too); a deleted link takes everything; a request
naming a missing link gets ENODEV, an onlink route through a down link ENETDOWN.

Every request that changes state is recorded in :attr:`FakeNetlink.writes`, and every
notification the daemon's Monitor would report (:func:`pyflannel.netlink.deletions`) in
:attr:`FakeNetlink.events`. The ``ip_*`` and ``bridge_*`` methods are what an admin or another
agent does behind the daemon's back.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_interface, ip_network
from typing import Any

from pyflannel._pyroute2 import ifaddrmsg, ifinfmsg, rtmsg
from pyflannel.netlink import (AF_BRIDGE, IFF_UP, RTM_DELADDR, RTM_DELLINK, RTM_DELNEIGH, RTM_DELROUTE, RTM_NEWADDR,
                               RTM_NEWLINK, RTM_NEWNEIGH, RTM_NEWROUTE, Deletion, Neighbour, NetlinkError, Packed,
                               Request, Route, parse_neighbour, parse_route)

NLM_F_CREATE, NLM_F_EXCL = 0x400, 0x200
MAIN_TABLE = 254
RTPROT_KERNEL = 2
RTPROT_BOOT = 3
DEFAULT_TXQLEN = 1000  # what the kernel gives an Ethernet-like link created without IFLA_TXQLEN
DEFAULT_VXLAN_PORT = 8472
VXLAN_OVERHEAD = {"IFLA_VXLAN_LOCAL6": 70}  # the kernel's headroom over an IPv6 underlay; 50 otherwise


@dataclass
class Link:
    """A link as the fake kernel holds it."""

    index: int
    name: str
    kind: str
    mac: str
    mtu: int
    flags: int = 0
    txqlen: int = DEFAULT_TXQLEN
    data: dict[str, Any] = field(default_factory=dict)  # IFLA_VXLAN_* of a vxlan link

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


def _message(cls: type, fields: dict[str, Any], attrs: list[tuple[str, Any]]) -> Any:
    """A message as read from the kernel: encoded by pyroute2, then decoded from the bytes."""
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg.encode()
    out = cls(bytes(msg.data))
    out.decode()
    return out


def _random_mac() -> str:
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join("%02x" % x for x in b)


class FakeNetlink:
    """The kernel's links, addresses, neighbours, FDB entries and main-table routes, in memory."""

    def __init__(self) -> None:
        self.link_table: dict[int, Link] = {}
        self.addr_table: list[tuple[int, Any]] = []  # (ifindex, IPv4Interface or IPv6Interface), in kernel order
        self.neigh_table: dict[tuple[int, str], str] = {}  # (ifindex, ip) -> MAC, all permanent
        self.fdb_table: dict[tuple[int, str], str] = {}  # (ifindex, MAC) -> remote IP
        self.route_table: dict[str, Route] = {}  # "dst/len" -> route, main table only
        self.sysctls: dict[str, str] = {}
        self.writes: list[str] = []
        self.events: list[Deletion] = []
        self._next_index = 1
        self.ip_link_add("lo", kind="loopback", mtu=65536, up=True)

    # -- Netlink's interface ----------------------------------------------------------------------

    def close(self) -> None:
        pass

    def links(self) -> list[Any]:
        return [self._link_message(link) for link in self.link_table.values()]

    def link(self, name: str = "", index: int = 0) -> Any | None:
        found = self._find(name) if name else self.link_table.get(index)
        return self._link_message(found) if found is not None else None

    def addresses(self, index: int = 0, family: int = socket.AF_INET) -> list[Any]:
        return [_message(ifaddrmsg, {"family": family, "prefixlen": a.network.prefixlen, "index": i},
                         [("IFA_ADDRESS", str(a.ip)), ("IFA_LOCAL", str(a.ip)),
                          ("IFA_LABEL", self.link_table[i].name)])
                for i, a in self.addr_table if (not index or i == index) and _af(a) == family]

    def routes(self, table: int = MAIN_TABLE, family: int = socket.AF_INET) -> list[Route]:
        if table != MAIN_TABLE:
            return []
        # The kernel's route of each address: its subnet's (IPv4: none for a /32), on an up link
        connected = [Route(str(a.network), None, i, RTPROT_KERNEL, MAIN_TABLE) for i, a in self.addr_table
                     if _af(a) == family and self.link_table[i].up and (a.version == 6 or a.network.prefixlen < 32)]
        return connected + [r for r in self.route_table.values() if _af(ip_network(r.dst)) == family]

    def route_get(self, dst: str) -> list[Any]:
        target = ip_address(dst)
        family = _af(target)
        best: tuple[int, int, str | None] | None = None  # (prefix length, oif, gateway)
        for r in self.routes(family=family):
            net = ip_network(r.dst)
            if target in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, r.oif, r.gateway)
        if best is None:
            raise NetlinkError(errno.ENETUNREACH)
        _, oif, gateway = best
        attrs: list[tuple[str, Any]] = [("RTA_DST", dst), ("RTA_OIF", oif)]
        src = [a.ip for i, a in self.addr_table if i == oif and _af(a) == family]
        if src:
            attrs.append(("RTA_PREFSRC", str(src[0])))
        if gateway:
            attrs.append(("RTA_GATEWAY", gateway))
        return [_message(rtmsg, {"family": family, "dst_len": target.max_prefixlen, "table": MAIN_TABLE}, attrs)]

    def neighbours(self, family: int, index: int) -> list[Neighbour]:
        if family == AF_BRIDGE:
            return [Neighbour(AF_BRIDGE, i, 0x80, dst, mac) for (i, mac), dst in self.fdb_table.items() if i == index]
        return [Neighbour(family, i, 0x80, ip, mac) for (i, ip), mac in self.neigh_table.items()
                if i == index and _af(ip_address(ip)) == family]

    def iter_routes(self, table: int = MAIN_TABLE, family: int = socket.AF_INET) -> Iterator[Route]:
        return iter(self.routes(table, family))

    def iter_neighbours(self, family: int, index: int) -> Iterator[Neighbour]:
        return iter(self.neighbours(family, index))

    def batch(self, requests: Sequence[Request | Packed]) -> list[int]:
        codes = []
        for req in requests:
            try:
                if isinstance(req, Packed):
                    self._packed(req)
                else:
                    self._request(req)
                codes.append(0)
            except NetlinkError as exc:
                codes.append(exc.errno or errno.EIO)
        return codes

    def call(self, req: Request) -> list[Any]:
        self._request(req)
        return []

    def write_sysctl(self, key: str, value: str) -> None:
        self.sysctls[key] = value

    # -- what an admin or another agent does ------------------------------------------------------

    def ip_link_add(self, name: str, kind: str = "veth", mtu: int = 1500, up: bool = True, mac: str = "",
                    data: dict[str, Any] | None = None) -> Link:
        """``ip link add`` (and ``up``); a vxlan link's ``data`` holds its IFLA_VXLAN_* attributes."""
        if self._find(name) is not None:
            raise NetlinkError(errno.EEXIST)
        link = Link(self._next_index, name, kind, mac or _random_mac(), mtu, data=dict(data or {}))
        self._next_index += 1
        self.link_table[link.index] = link
        self._notify_link(link)
        if up:
            self._set_up(link, True)
        return link

    def ip_addr_add(self, name: str, address: str) -> None:
        self._add_address(self._need(name).index, ip_interface(address))

    def ip_route_add(self, dst: str, gateway: str, name: str) -> None:
        """``ip route add <dst> via <gateway> dev <name>``, e.g. a default route (``0.0.0.0/0``, ``::/0``)."""
        self.route_table[dst] = Route(dst, gateway, self._need(name).index, RTPROT_BOOT, MAIN_TABLE)

    def ip_link_del(self, name: str) -> None:
        self._delete_link(self._need(name))

    def ip_link_set_down(self, name: str) -> None:
        self._set_up(self._need(name), False)

    def ip_link_set_up(self, name: str) -> None:
        self._set_up(self._need(name), True)

    def ip_addr_flush(self, name: str) -> None:
        link = self._need(name)
        for i, a in [(i, a) for i, a in self.addr_table if i == link.index]:
            self._delete_address(i, a)

    def ip_route_del(self, dst: str) -> None:
        del self.route_table[dst]
        self.events.append(("route", MAIN_TABLE, dst))

    def ip_neigh_del(self, ip: str, name: str) -> None:
        index = self._need(name).index
        del self.neigh_table[(index, ip)]
        self.events.append(("neigh", index, ip))

    def bridge_fdb_del(self, mac: str, name: str) -> None:
        index = self._need(name).index
        dst = self.fdb_table.pop((index, mac))
        self.events.append(("fdb", index, "%s %s" % (mac, dst)))

    # -- for assertions ---------------------------------------------------------------------------

    def find(self, name: str) -> Link | None:
        """The link called ``name``, or None."""
        return self._find(name)

    def take_events(self) -> list[Deletion]:
        """The notifications the Monitor would have reported since the last call."""
        events, self.events = self.events, []
        return events

    def take_writes(self) -> list[str]:
        """The requests that changed state since the last call."""
        writes, self.writes = self.writes, []
        return writes

    def datapath(self, name: str) -> dict[str, set[tuple[str, str | None]]]:
        """A link's routes (dst, gateway), neighbours (ip, MAC) and FDB entries (MAC, remote), as
        ``ip route``, ``ip neigh`` and ``bridge fdb`` show them."""
        link = self._need(name)
        return {
            "routes": {(r.dst, r.gateway) for r in self.route_table.values() if r.oif == link.index},
            "neigh": {(ip, mac) for (i, ip), mac in self.neigh_table.items() if i == link.index},
            "fdb": {(mac, dst) for (i, mac), dst in self.fdb_table.items() if i == link.index},
        }

    def addresses_of(self, name: str) -> list[str]:
        """A link's addresses, "ip/len", in kernel order."""
        index = self._need(name).index
        return [str(a) for i, a in self.addr_table if i == index]

    # -- the kernel's rules -----------------------------------------------------------------------

    def _find(self, name: str) -> Link | None:
        for link in self.link_table.values():
            if link.name == name:
                return link
        return None

    def _need(self, name: str) -> Link:
        link = self._find(name)
        if link is None:
            raise NetlinkError(errno.ENODEV)
        return link

    def _link_index(self, index: int) -> Link:
        link = self.link_table.get(index)
        if link is None:
            raise NetlinkError(errno.ENODEV)
        return link

    def _link_message(self, link: Link) -> Any:
        attrs: list[tuple[str, Any]] = [("IFLA_IFNAME", link.name), ("IFLA_ADDRESS", link.mac),
                                        ("IFLA_MTU", link.mtu), ("IFLA_TXQLEN", link.txqlen)]
        if link.kind not in ("", "loopback"):
            info: list[tuple[str, Any]] = [("IFLA_INFO_KIND", link.kind)]
            if link.kind == "vxlan":
                info.append(("IFLA_INFO_DATA", {"attrs": list(link.data.items())}))
            attrs.append(("IFLA_LINKINFO", {"attrs": info}))
        return _message(ifinfmsg, {"index": link.index, "flags": link.flags, "change": 0}, attrs)

    def _notify_link(self, link: Link) -> None:
        # what netlink.deletions() reports of an RTM_NEWLINK
        self.events.append(("up" if link.up else "down", link.index, link.name))

    def _set_up(self, link: Link, up: bool) -> None:
        if up == link.up:
            return
        link.flags = link.flags | IFF_UP if up else link.flags & ~IFF_UP
        self._notify_link(link)
        if not up:
            self._flush_routes_and_neighbours(link.index, (socket.AF_INET, socket.AF_INET6))
            for i, a in [(i, a) for i, a in self.addr_table if i == link.index and a.version == 6]:
                self._delete_address(i, a)

    def _flush_routes_and_neighbours(self, index: int, families: tuple[int, ...]) -> None:
        """What a link set down, or left without IPv4 addresses, loses: its routes of the families
        (IPv4 sends no notification for these, IPv6 does) and their neighbours, permanent ones too."""
        for dst in [d for d, r in self.route_table.items() if r.oif == index and _af(ip_network(d)) in families]:
            del self.route_table[dst]
            if ":" in dst:
                self.events.append(("route", MAIN_TABLE, dst))
        for key in [k for k in self.neigh_table if k[0] == index and _af(ip_address(k[1])) in families]:
            del self.neigh_table[key]
            self.events.append(("neigh", index, key[1]))

    def _delete_link(self, link: Link) -> None:
        self._set_up(link, False)
        self._flush_routes_and_neighbours(link.index, (socket.AF_INET, socket.AF_INET6))
        for key in [k for k in self.fdb_table if k[0] == link.index]:
            self.events.append(("fdb", link.index, "%s %s" % (key[1], self.fdb_table.pop(key))))
        for i, a in [(i, a) for i, a in self.addr_table if i == link.index]:
            self.addr_table.remove((i, a))
            self.events.append(("addr", i, str(a)))
        del self.link_table[link.index]
        self.events.append(("link", link.index, link.name))

    def _add_address(self, index: int, addr: Any) -> None:
        self._link_index(index)
        if (index, addr) in self.addr_table:
            raise NetlinkError(errno.EEXIST)
        # The kernel lists a link's IPv6 addresses newest first, its IPv4 ones oldest first.
        self.addr_table.insert(0 if addr.version == 6 else len(self.addr_table), (index, addr))

    def _delete_address(self, index: int, addr: Any) -> None:
        if (index, addr) not in self.addr_table:
            raise NetlinkError(errno.EADDRNOTAVAIL)
        self.addr_table.remove((index, addr))
        self.events.append(("addr", index, str(addr)))
        if addr.version == 4 and not any(i == index and a.version == 4 for i, a in self.addr_table):
            self._flush_routes_and_neighbours(index, (socket.AF_INET,))

    def _request(self, req: Request) -> None:
        """A request pyroute2 would encode: links and addresses."""
        _, msg_type, flags, fields, attrs = req
        a = dict(attrs)
        if msg_type == RTM_NEWLINK and flags & NLM_F_CREATE:
            info = dict(a["IFLA_LINKINFO"]["attrs"])
            data = dict(info.get("IFLA_INFO_DATA", {"attrs": []})["attrs"])
            lower = self._link_index(data["IFLA_VXLAN_LINK"]) if data.get("IFLA_VXLAN_LINK") else None
            data.setdefault("IFLA_VXLAN_PORT", DEFAULT_VXLAN_PORT)
            self.writes.append("RTM_NEWLINK create %s" % a["IFLA_IFNAME"])
            overhead = max([VXLAN_OVERHEAD.get(key, 50) for key in data] + [50])
            allowed = (lower.mtu if lower is not None else 1500) - overhead  # the kernel clamps a larger request
            link = self.ip_link_add(a["IFLA_IFNAME"], kind=info["IFLA_INFO_KIND"], up=False, mac=a.get("IFLA_ADDRESS", ""),
                                    mtu=min(a.get("IFLA_MTU") or allowed, allowed), data=data)
            link.txqlen = a.get("IFLA_TXQLEN", DEFAULT_TXQLEN)
        elif msg_type == RTM_NEWLINK:
            link = self._link_index(fields["index"])
            self.writes.append("RTM_NEWLINK %s %s" % (link.name, sorted(fields.items()) + sorted(a.items())))
            if "IFLA_ADDRESS" in a:
                link.mac = a["IFLA_ADDRESS"]
                self._notify_link(link)
            change = fields.get("change", 0)
            if change & IFF_UP:
                self._set_up(link, bool(fields.get("flags", 0) & IFF_UP))
        elif msg_type == RTM_DELLINK:
            link = self._link_index(fields["index"])
            self.writes.append("RTM_DELLINK %s" % link.name)
            self._delete_link(link)
        elif msg_type in (RTM_NEWADDR, RTM_DELADDR):
            addr = ip_interface((a["IFA_LOCAL"], fields["prefixlen"]))
            self.writes.append("%s %s index %d" % ("RTM_NEWADDR" if msg_type == RTM_NEWADDR else "RTM_DELADDR", addr,
                                                   fields["index"]))
            if msg_type == RTM_NEWADDR:
                self._add_address(fields["index"], addr)
            else:
                self._delete_address(fields["index"], addr)
        else:
            raise NotImplementedError("request type %d" % msg_type)

    def _packed(self, req: Packed) -> None:
        """A request netlink.py packs itself: neighbours, FDB entries and routes."""
        body = req.body
        exclusive = req.msg_type in (RTM_NEWNEIGH, RTM_NEWROUTE) and bool(req.flags & NLM_F_EXCL)
        if req.msg_type in (RTM_NEWNEIGH, RTM_DELNEIGH):
            n = parse_neighbour(body, 0, len(body))
            self.writes.append("%s %s dev %d %s %s" % ("RTM_NEWNEIGH" if req.msg_type == RTM_NEWNEIGH else "RTM_DELNEIGH",
                                                      "fdb" if n.family == AF_BRIDGE else "neigh", n.ifindex, n.dst,
                                                      n.lladdr))
            self._link_index(n.ifindex)
            assert n.dst is not None and n.lladdr is not None
            table: dict[Any, str] = self.fdb_table if n.family == AF_BRIDGE else self.neigh_table
            if exclusive and ((n.ifindex, n.lladdr) if n.family == AF_BRIDGE else (n.ifindex, n.dst)) in table:
                raise NetlinkError(errno.EEXIST)  # the kernel's answer to an exclusive create of an entry in place
            if n.family == AF_BRIDGE:
                if req.msg_type == RTM_NEWNEIGH:
                    self.fdb_table[(n.ifindex, n.lladdr)] = n.dst
                elif self.fdb_table.get((n.ifindex, n.lladdr)) == n.dst:
                    del self.fdb_table[(n.ifindex, n.lladdr)]
                else:
                    raise NetlinkError(errno.ENOENT)
            elif req.msg_type == RTM_NEWNEIGH:
                self.neigh_table[(n.ifindex, n.dst)] = n.lladdr
            elif self.neigh_table.pop((n.ifindex, n.dst), None) is None:
                raise NetlinkError(errno.ENOENT)
        elif req.msg_type in (RTM_NEWROUTE, RTM_DELROUTE):
            r = parse_route(body, 0, len(body))
            self.writes.append("%s %s via %s dev %s" % ("RTM_NEWROUTE" if req.msg_type == RTM_NEWROUTE else "RTM_DELROUTE",
                                                       r.dst, r.gateway, r.oif or "-"))
            if req.msg_type == RTM_DELROUTE:
                have = self.route_table.get(r.dst)
                if have is None or (r.gateway and have.gateway != r.gateway) or (r.oif and have.oif != r.oif):
                    raise NetlinkError(errno.ESRCH)
                del self.route_table[r.dst]
                return
            if exclusive and r.dst in self.route_table:
                raise NetlinkError(errno.EEXIST)
            oif = r.oif
            if oif:
                if not self._link_index(oif).up:
                    raise NetlinkError(errno.ENETDOWN)
            else:  # a route via a gateway on a connected subnet
                assert r.gateway is not None
                gateway = ip_address(r.gateway)
                on = [i for i, a in self.addr_table
                      if a.version == gateway.version and gateway in a.network and self.link_table[i].up]
                if not on:
                    raise NetlinkError(errno.ENETUNREACH)
                oif = on[0]
            self.route_table[r.dst] = Route(r.dst, r.gateway, oif, r.proto, MAIN_TABLE)
        else:
            raise NotImplementedError("request type %d" % req.msg_type)


def _af(a: Any) -> int:
    """The address family of an ipaddress address, interface or network."""
    return socket.AF_INET6 if a.version == 6 else socket.AF_INET
