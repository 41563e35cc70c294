"""The VXLAN backend: the ``flannel.<VNI>`` device and, for every other node, its neighbour, FDB
entry and route (flannel's ``backend/vxlan``).

The kernel is converged to the leases: a change to one node programs that node's entries, and a
periodic full reconcile compares the whole kernel state with the leases and repairs any drift
(entries deleted by hand, entries left by nodes deleted while the daemon was down).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from .. import metrics
from ..config import VXLANConfig
from ..ip import ExternalInterface
from ..lease import Lease
from ..log import V

log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
RTPROT_BOOT = 3
MAIN_TABLE = 254
AF_BRIDGE = 7
OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14


class DeviceError(Exception):
    """The device could not be created or configured; the message is flanneld's."""


@dataclass(frozen=True)
class Device:
    """The VXLAN device as configured."""

    name: str
    index: int
    mac: str


@dataclass(frozen=True, slots=True)
class Entry:
    """The kernel entries for one remote node: via the tunnel, or direct when ``direct_gw`` is set."""

    subnet: IPv4Network
    mac: str
    public_ip: IPv4Address
    direct_gw: IPv4Address | None


def random_mac() -> str:
    """A random locally administered unicast MAC."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join("%02x" % x for x in b)


def backend_data(vni: int, mac: str) -> str:
    """The ``backend-data`` annotation: compact JSON, VNI then VtepMAC, as flanneld writes it."""
    return json.dumps({"VNI": vni, "VtepMAC": mac}, separators=(",", ":"))


def _vxlan_data(link: Any) -> tuple[str, dict[str, Any]]:
    info = link.get_attr("IFLA_LINKINFO")
    if info is None:
        return "", {}
    data = info.get_attr("IFLA_INFO_DATA")
    attrs = dict(data["attrs"]) if data is not None else {}
    return info.get_attr("IFLA_INFO_KIND") or "", attrs


class VXLANBackend:
    """The device and the per-node kernel entries."""

    def __init__(self, ipr: Any, cfg: VXLANConfig, ext: ExternalInterface, network: IPv4Network) -> None:
        self.ipr = ipr
        self.cfg = cfg
        self.ext = ext
        self.network = network
        self.name = "flannel.%d" % cfg.vni
        self.device: Device | None = None
        self.own_subnet: IPv4Network | None = None
        self.applied: dict[str, Entry] = {}  # node name -> what the kernel holds for it
        self._rejected: dict[str, Lease] = {}  # leases already reported as unusable
        log.info("VXLAN config: VNI=%d Port=%d GBP=%s Learning=%s DirectRouting=%s", cfg.vni, cfg.port,
                 str(cfg.gbp).lower(), str(cfg.learning).lower(), str(cfg.direct_routing).lower())

    @property
    def mtu(self) -> int:
        """The MTU pods get: the external interface's less the VXLAN overhead."""
        return self.ext.mtu - OVERHEAD

    # -- the device --------------------------------------------------------------------------------

    def _incompatibility(self, link: Any) -> str:
        kind, d = _vxlan_data(link)
        if kind != "vxlan":
            return "link type: %s vs vxlan" % kind
        if d.get("IFLA_VXLAN_ID") != self.cfg.vni:
            return "vni: %s vs %d" % (d.get("IFLA_VXLAN_ID"), self.cfg.vni)
        if d.get("IFLA_VXLAN_LINK") and d.get("IFLA_VXLAN_LINK") != self.ext.index:
            return "vtep (external) interface: %s vs %d" % (d.get("IFLA_VXLAN_LINK"), self.ext.index)
        local = d.get("IFLA_VXLAN_LOCAL")
        if local and IPv4Address(local) != self.ext.iface_addr:
            return "vtep (external) IP: %s vs %s" % (local, self.ext.iface_addr)
        if d.get("IFLA_VXLAN_GROUP"):
            return "vtep group: %s vs <nil>" % d.get("IFLA_VXLAN_GROUP")
        if d.get("IFLA_VXLAN_L2MISS"):
            return "l2miss: true vs false"
        port = d.get("IFLA_VXLAN_PORT") or 0
        if self.cfg.port and port and port != self.cfg.port:
            return "port: %d vs %d" % (port, self.cfg.port)
        if ("IFLA_VXLAN_GBP" in d) != self.cfg.gbp:
            return "gbp: %s vs %s" % (str("IFLA_VXLAN_GBP" in d).lower(), str(self.cfg.gbp).lower())
        return ""

    def create_device(self, mac_hint: str = "") -> Device:
        """Create ``flannel.<VNI>``, or reuse a compatible existing one with its MAC.

        A new device takes ``mac_hint`` (the MAC this node last advertised), so a device lost to a
        reboot comes back with the MAC the other nodes already know.
        """
        found = self.ipr.link_lookup(ifname=self.name)
        if found:
            link = self.ipr.get_links(found[0])[0]
            reason = self._incompatibility(link)
            if not reason:
                log.log(V(1), "VXLAN device already exists")
                self.device = Device(self.name, found[0], link.get_attr("IFLA_ADDRESS"))
                return self.device
            log.warning('"%s" already exists with incompatible configuration: %s; recreating device', self.name, reason)
            self.ipr.link("del", index=found[0])
        attrs: dict[str, Any] = dict(
            ifname=self.name, kind="vxlan", vxlan_id=self.cfg.vni, vxlan_link=self.ext.index,
            vxlan_local=str(self.ext.iface_addr), vxlan_ttl=0, vxlan_tos=0, vxlan_learning=int(self.cfg.learning),
            vxlan_proxy=0, vxlan_rsc=0, vxlan_l2miss=0, vxlan_l3miss=0,
            vxlan_udp_zero_csum6_tx=0, vxlan_udp_zero_csum6_rx=0, address=mac_hint or random_mac(),
        )
        if self.cfg.port > 0:
            attrs["vxlan_port"] = self.cfg.port
        if self.cfg.gbp:
            attrs["vxlan_gbp"] = True
        try:
            self.ipr.link("add", **attrs)
        except Exception as exc:
            raise DeviceError(_errstr(exc)) from exc
        index = self.ipr.link_lookup(ifname=self.name)[0]
        try:
            with open("/proc/sys/net/ipv6/conf/%s/accept_ra" % self.name, "w") as f:
                f.write("0")
        except OSError:
            pass
        self.device = Device(self.name, index, self.ipr.get_links(index)[0].get_attr("IFLA_ADDRESS"))
        return self.device

    def configure_device(self, subnet: IPv4Network) -> None:
        """Give the device ``<subnet network address>/32`` (and no other address in the network), and bring it up."""
        assert self.device is not None
        self.own_subnet = subnet
        want = IPv4Interface((subnet.network_address, 32))
        try:
            present = False
            for m in self.ipr.get_addr(family=socket.AF_INET, index=self.device.index):
                addr = IPv4Interface((m.get_attr("IFA_ADDRESS"), m["prefixlen"]))
                if addr == want:
                    present = True
                elif addr.ip in self.network:
                    self.ipr.addr("del", index=self.device.index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
                    log.info("removed IP address %s from %s", addr, self.name)
            if not present:
                self.ipr.addr("add", index=self.device.index, address=str(want.ip), prefixlen=32)
        except Exception as exc:
            raise DeviceError("failed to configure interface %s: failed to ensure address of interface %s: %s"
                              % (self.name, self.name, _errstr(exc))) from exc
        try:
            self.ipr.link("set", index=self.device.index, state="up")
        except Exception as exc:
            raise DeviceError("failed to configure interface %s: failed to set interface %s to UP state: %s"
                              % (self.name, self.name, _errstr(exc))) from exc

    # -- per-node entries -------------------------------------------------------------------------

    def _entry(self, name: str, lease: Lease | None) -> Entry | None:
        """The entries a lease asks for, or None; an unusable lease is logged once."""
        if lease is None or lease.subnet == self.own_subnet:
            return None
        if self._rejected.get(name) == lease:
            return None
        self._rejected.pop(name, None)
        if lease.backend_type != "vxlan":
            log.warning("ignoring non-vxlan v4Subnet(%s) v6Subnet(<nil>): type=%s", lease.subnet, lease.backend_type)
            self._rejected[name] = lease
            return None
        try:
            data = json.loads(lease.backend_data)
            mac = str(data["VtepMAC"]).lower()
            if len(bytes.fromhex(mac.replace(":", ""))) != 6 or mac.count(":") != 5:
                raise ValueError("invalid MAC address %r" % data["VtepMAC"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("error decoding subnet lease JSON: %s (node %s)", exc, name)
            self._rejected[name] = lease
            return None
        direct = self._direct_gateway(lease.public_ip) if self.cfg.direct_routing else None
        return Entry(lease.subnet, mac, lease.public_ip, direct)

    def _direct_gateway(self, public_ip: IPv4Address) -> IPv4Address | None:
        """The public IP when it is on a directly connected subnet (one route, no gateway)."""
        try:
            routes = self.ipr.route("get", dst=str(public_ip))
        except Exception:
            return None
        if len(routes) == 1 and not routes[0].get_attr("RTA_GATEWAY"):
            return public_ip
        return None

    def _add(self, e: Entry) -> bool:
        assert self.device is not None
        idx = self.device.index
        log.log(V(2), "adding subnet: %s PublicIP: %s VtepMAC: %s", e.subnet, e.public_ip, e.mac)
        gw = str(e.subnet.network_address)
        if e.direct_gw is not None:
            return self._netlink("failed to add direct route (%s -> %s)" % (e.subnet, e.direct_gw),
                                 self.ipr.route, "replace", dst=str(e.subnet), gateway=str(e.direct_gw),
                                 table=MAIN_TABLE, proto=RTPROT_BOOT)
        if not self._netlink("AddARP failed", self.ipr.neigh, "replace", ifindex=idx, family=socket.AF_INET,
                             dst=gw, lladdr=e.mac, state=NUD_PERMANENT):
            return False
        if not self._netlink("AddFDB failed", self.ipr.neigh, "replace", ifindex=idx, family=AF_BRIDGE,
                             lladdr=e.mac, dst=str(e.public_ip), state=NUD_PERMANENT, flags=NTF_SELF):
            self._netlink("DelARP failed", self.ipr.neigh, "del", ifindex=idx, family=socket.AF_INET, dst=gw,
                          lladdr=e.mac)
            return False
        if not self._netlink("failed to add vxlanRoute (%s -> %s)" % (e.subnet, gw), self.ipr.route, "replace",
                             dst=str(e.subnet), gateway=gw, oif=idx, flags=RTNH_F_ONLINK, table=MAIN_TABLE,
                             proto=RTPROT_BOOT):
            self._del_neigh(gw, e.mac)
            self._del_fdb(e.mac, str(e.public_ip))
            return False
        return True

    def _del_neigh(self, ip: str, mac: str) -> None:
        assert self.device is not None
        self._netlink("DelARP failed", self.ipr.neigh, "del", ifindex=self.device.index, family=socket.AF_INET,
                      dst=ip, lladdr=mac)

    def _del_fdb(self, mac: str, dst: str) -> None:
        assert self.device is not None
        self._netlink("DelFDB failed", self.ipr.neigh, "del", ifindex=self.device.index, family=AF_BRIDGE,
                      lladdr=mac, dst=dst, state=NUD_PERMANENT, flags=NTF_SELF)

    def _del_route(self, dst: str, gateway: str, oif: int | None) -> None:
        kw: dict[str, Any] = dict(dst=dst, gateway=gateway, table=MAIN_TABLE)
        if oif is not None:
            kw["oif"] = oif
        self._netlink("failed to delete vxlanRoute (%s -> %s)" % (dst, gateway), self.ipr.route, "del", **kw)

    def _remove(self, e: Entry, keep: Entry | None = None) -> None:
        """Delete an entry's kernel state, except the parts ``keep`` (its replacement) overwrites."""
        assert self.device is not None
        log.log(V(2), "removing subnet: %s PublicIP: %s VtepMAC: %s", e.subnet, e.public_ip, e.mac)
        if e.direct_gw is not None:
            if keep is None or keep.subnet != e.subnet:
                self._del_route(str(e.subnet), str(e.direct_gw), None)
            return
        gw = str(e.subnet.network_address)
        if keep is None or keep.direct_gw is not None or keep.subnet != e.subnet:
            self._del_neigh(gw, e.mac)
            self._del_route(str(e.subnet), gw, self.device.index)
        if keep is None or keep.direct_gw is not None or (keep.mac, keep.public_ip) != (e.mac, e.public_ip):
            self._del_fdb(e.mac, str(e.public_ip))

    def _netlink(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:
            if args and args[0] == "del" and _errno(exc) in (2, 3):  # ENOENT, ESRCH: already gone
                return True
            metrics.NETLINK_ERRORS.inc()
            log.error("%s: %s", what, _errstr(exc))
            return False

    def update(self, name: str, lease: Lease | None) -> bool:
        """Converge one node's kernel entries to its lease (None: the node is gone). True if anything changed."""
        new = self._entry(name, lease)
        old = self.applied.get(name)
        if new == old:
            return False
        if old is not None:
            self._remove(old, keep=new)
            del self.applied[name]
        if new is not None and self._add(new):
            self.applied[name] = new
        return True

    def reconcile(self, leases: dict[str, Lease]) -> int:
        """Converge every node's entries to ``leases`` and repair whatever the kernel lost or gained.

        Returns how many kernel entries were added, changed or removed because they had drifted.
        """
        assert self.device is not None
        metrics.RECONCILES.inc()
        for name in set(self.applied) - set(leases):
            self.update(name, None)
        for name, lease in leases.items():
            self.update(name, lease)
        repairs = self._repair()
        if repairs:
            metrics.REPAIRS.inc(repairs)
            log.info("Reconcile repaired %d kernel entries on %s", repairs, self.name)
        return repairs

    def _repair(self) -> int:
        assert self.device is not None
        idx = self.device.index
        tunnel = [e for e in self.applied.values() if e.direct_gw is None]
        want_neigh = {str(e.subnet.network_address): e.mac for e in tunnel}
        want_fdb = {(e.mac, str(e.public_ip)) for e in tunnel}
        want_routes = {str(e.subnet): (str(e.direct_gw or e.subnet.network_address), e.direct_gw is None)
                       for e in self.applied.values()}
        repairs = 0
        have_neigh: dict[str, str] = {}
        for m in self.ipr.get_neighbours(family=socket.AF_INET, ifindex=idx):
            ip, mac = m.get_attr("NDA_DST"), m.get_attr("NDA_LLADDR")
            if want_neigh.get(ip) == mac and m["state"] & NUD_PERMANENT:
                have_neigh[ip] = mac
            elif ip not in want_neigh and m["state"] & NUD_PERMANENT:
                self._del_neigh(ip, mac)
                repairs += 1
        have_fdb: set[tuple[str, str]] = set()
        for m in self.ipr.get_neighbours(family=AF_BRIDGE, ifindex=idx):
            key = (m.get_attr("NDA_LLADDR"), m.get_attr("NDA_DST"))
            if m["ifindex"] != idx or key[1] is None:
                continue
            if key in want_fdb:
                have_fdb.add(key)
            else:
                self._del_fdb(*key)
                repairs += 1
        have_routes: set[str] = set()
        for r in self.ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            oif, gw = r.get_attr("RTA_OIF"), r.get_attr("RTA_GATEWAY")
            dst = "%s/%d" % (r.get_attr("RTA_DST") or "0.0.0.0", r["dst_len"])
            ours = oif == idx or (gw is not None and r["proto"] == RTPROT_BOOT and oif == self.ext.index
                                  and IPv4Network(dst).subnet_of(self.network))
            if not ours:
                continue
            if want_routes.get(dst) == (gw, oif == idx):
                have_routes.add(dst)
            elif dst != str(self.own_subnet):
                self._del_route(dst, gw, oif)
                repairs += 1
        for name, e in list(self.applied.items()):
            gw = str(e.subnet.network_address)
            missing = str(e.subnet) not in have_routes
            if e.direct_gw is None:
                missing = missing or gw not in have_neigh or (e.mac, str(e.public_ip)) not in have_fdb
            if missing:
                repairs += 1
                if not self._add(e):
                    del self.applied[name]
        return repairs


def _errno(exc: Exception) -> int:
    return int(getattr(exc, "code", 0) or getattr(exc, "errno", 0) or 0)


def _errstr(exc: Exception) -> str:
    code = _errno(exc)
    return os.strerror(code).lower() if code else str(exc)
