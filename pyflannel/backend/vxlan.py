"""The VXLAN backend: per IP family, the ``flannel.<VNI>`` or ``flannel-v6.<VNI>`` device and, for
every other node, its neighbour, FDB entry and route (flannel's ``backend/vxlan``).

The kernel is converged to the leases: a change to one node programs that node's entries, and a
periodic full reconcile compares the whole kernel state with the leases and repairs any drift
(entries deleted by hand, entries left by nodes deleted while the daemon was down).

The kernel keys an FDB entry by MAC, so a lease advertising another node's VtepMAC would re-point that
node's tunnel to itself. VtepMACs are claimed as pod CIDRs are: a usable one (unicast, not zero) goes to
the first node seen with it (the oldest, at start-up), never to a node copying this node's own, and a
node refused for it waits, with one warning naming both nodes, until the holder lets it go.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from dataclasses import dataclass, field, replace
from ipaddress import ip_address, ip_interface
from itertools import islice
from typing import Any

from .. import ip, metrics
from ..config import VXLANConfig
from ..family import IPV4, Family, IPAddress, IPNetwork, family_of
from ..ip import ExternalInterface
from ..lease import Lease
from ..log import V
from ..netlink import (CREATE, IFF_UP, NLM_F_EXCL, REPLACE, RTM_DELADDR, RTM_DELLINK, RTM_DELNEIGH, RTM_DELROUTE,
                       RTM_NEWADDR, RTM_NEWLINK, RTM_NEWNEIGH, RTM_NEWROUTE, AF_BRIDGE, Deletion, Netlink, Packed,
                       neighbour_request, read_dump, request, route_request)
from .._pyroute2 import ifaddrmsg, ifinfmsg

log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
RTPROT_KERNEL = 2  # the routes the kernel adds for an address (an IPv6 device's /128, fe80::/64)
RTPROT_BOOT = 3
RT_SCOPE_NOWHERE = 255
RTN_UNICAST = 1
MAIN_TABLE = 254
DEFAULT_PORT = 8472  # the kernel's VXLAN port when none is given (flannel's Port 0)
PROGRAM_NODES = 1000  # nodes whose requests are built and sent at a time
_DEVICE_NEWS = ("link", "down", "addr")  # the notifications about a link, among netlink.deletions()
_NO_DEVICE = (errno.ENODEV, errno.ENETDOWN)  # a request refused because the device is gone or down
_ROUTE, _NEIGH, _FDB = 1, 2, 4  # a node's entries found in the kernel by a comparison


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

    dst: str  # the node's subnet, "10.244.1.0/24" or "fd00:10:244:1::/64"
    gw: str  # its network address, the neighbour's IP and the tunnel route's gateway
    mac: str
    remote: IPAddress  # its public IP: the lease's own object, written out only when used (public_ip)
    direct_gw: str | None
    lease: Lease = field(compare=False)  # what it was built from

    @property
    def public_ip(self) -> str:
        """The node's public IP, as the kernel writes it (inet_ntop: str() of ipaddress objects costs more)."""
        return socket.inet_ntop(socket.AF_INET if self.remote.version == 4 else socket.AF_INET6, self.remote.packed)


def parse_mac(value: object) -> bytes:
    """The six bytes of a MAC written as the kernel writes them (``0a:58:0a:f4:01:01``), in either case;
    ValueError for any other value (a VtepMAC's JSON may hold anything)."""
    text = str(value).lower()
    try:
        raw = bytes.fromhex(text.replace(":", ""))
    except ValueError:
        raw = b""
    if len(raw) != 6 or raw.hex(":") != text:
        raise ValueError("invalid MAC address %.60r" % value)
    return raw


def mac_problem(raw: bytes) -> str:
    """Why a MAC's bytes are not a usable VtepMAC ('' when they are): it must be unicast, and not all zeros."""
    if raw[0] & 1:
        return "is a multicast address"
    if not any(raw):
        return "is all zeros"
    return ""


def random_mac() -> str:
    """A random locally administered unicast MAC."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join("%02x" % x for x in b)


def backend_data(vni: int, mac: str) -> str:
    """The ``backend-data`` annotation: compact JSON, VNI then VtepMAC, as flanneld writes it."""
    return json.dumps({"VNI": vni, "VtepMAC": mac}, separators=(",", ":"))


@dataclass(frozen=True)
class VXLANLink:
    """A link as the kernel reports it, with the fields flannel compares and ``diagnose`` shows."""

    name: str
    index: int
    mac: str
    up: bool
    mtu: int
    kind: str  # "vxlan", another link type, or "" when the kernel reports none
    data: dict[str, Any]  # the IFLA_VXLAN_* attributes

    @property
    def port(self) -> int:
        """The UDP port: the kernel reports it always; a device made without one has 8472."""
        return int(self.data.get("IFLA_VXLAN_PORT") or DEFAULT_PORT)


def device_name(vni: int, family: Family = IPV4) -> str:
    """The VXLAN device's name: ``flannel.<VNI>``, ``flannel-v6.<VNI>``."""
    return family.vxlan_device % vni


def read_link(link: Any) -> VXLANLink:
    """The fields of a link message (pyroute2's ``ifinfmsg``) that describe a VXLAN device."""
    info = link.get_attr("IFLA_LINKINFO")
    kind, data = "", {}
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND") or ""
        found = info.get_attr("IFLA_INFO_DATA")
        data = dict(found["attrs"]) if found is not None else {}
    return VXLANLink(link.get_attr("IFLA_IFNAME") or "", int(link["index"]), link.get_attr("IFLA_ADDRESS") or "",
                     bool(link["flags"] & IFF_UP), int(link.get_attr("IFLA_MTU") or 0), kind, data)


def device_attributes(cfg: VXLANConfig, ext: ExternalInterface, family: Family = IPV4) -> list[tuple[str, Any]]:
    """The IFLA_VXLAN_* attributes flanneld gives a new device: the interface's address of the family as
    the local end, no group, no ageing, the port only when set, GBP only when on. (The device's MTU is a
    link attribute.)

    The local end is the interface's address, as in flanneld v0.20.2 to v0.27.3. v0.27.4 and later
    take the advertised public IP, which behind NAT is not an address of the node at all."""
    data: list[tuple[str, Any]] = [
        ("IFLA_VXLAN_ID", cfg.vni), ("IFLA_VXLAN_LINK", ext.index),
        (family.vxlan_local, str(ext.addrs[family].iface_addr)), ("IFLA_VXLAN_TTL", 0), ("IFLA_VXLAN_TOS", 0),
        ("IFLA_VXLAN_LEARNING", int(cfg.learning)), ("IFLA_VXLAN_PROXY", 0), ("IFLA_VXLAN_RSC", 0),
        ("IFLA_VXLAN_L2MISS", 0), ("IFLA_VXLAN_L3MISS", 0), ("IFLA_VXLAN_UDP_ZERO_CSUM6_TX", 0),
        ("IFLA_VXLAN_UDP_ZERO_CSUM6_RX", 0),
    ]
    if cfg.port > 0:
        data.append(("IFLA_VXLAN_PORT", cfg.port))
    if cfg.gbp:
        data.append(("IFLA_VXLAN_GBP", True))
    return data


def incompatibility(link: VXLANLink, cfg: VXLANConfig, ext: ExternalInterface, family: Family = IPV4) -> str:
    """Why an existing device cannot be reused, in flanneld's words (``vni: 2 vs 1``), or '' when it
    can. Learning, MAC and MTU are not compared, as in flanneld. A local end that is the advertised
    public IP, when that is an address of this node, is taken as well: flanneld v0.27.4+ makes it so."""
    d = link.data
    if link.kind != "vxlan":
        return "link type: %s vs vxlan" % link.kind
    if d.get("IFLA_VXLAN_ID") != cfg.vni:
        return "vni: %s vs %d" % (d.get("IFLA_VXLAN_ID"), cfg.vni)
    if d.get("IFLA_VXLAN_LINK") and d.get("IFLA_VXLAN_LINK") != ext.index:
        return "vtep (external) interface: %s vs %d" % (d.get("IFLA_VXLAN_LINK"), ext.index)
    local = d.get(family.vxlan_local)
    addr = ext.addrs[family]
    if local and ip_address(local) != addr.iface_addr and not (addr.ext_local and ip_address(local) == addr.ext_addr):
        return "vtep (external) IP: %s vs %s" % (local, addr.iface_addr)
    if d.get("IFLA_VXLAN_GROUP"):
        return "vtep group: %s vs <nil>" % d.get("IFLA_VXLAN_GROUP")
    if d.get("IFLA_VXLAN_L2MISS"):
        return "l2miss: true vs false"
    port = d.get("IFLA_VXLAN_PORT") or 0
    if cfg.port and port and port != cfg.port:
        return "port: %d vs %d" % (port, cfg.port)
    if ("IFLA_VXLAN_GBP" in d) != cfg.gbp:
        return "gbp: %s vs %s" % (str("IFLA_VXLAN_GBP" in d).lower(), str(cfg.gbp).lower())
    return ""


def log_config(cfg: VXLANConfig, ext: ExternalInterface) -> None:
    """flanneld's ``VXLAN config:`` line (once per process, whatever the number of families), and a
    warning when net-conf's MTU is more than the external interface allows."""
    log.info("VXLAN config: VNI=%d Port=%d GBP=%s Learning=%s DirectRouting=%s", cfg.vni, cfg.port,
             str(cfg.gbp).lower(), str(cfg.learning).lower(), str(cfg.direct_routing).lower())
    if cfg.mtu > ext.mtu:
        log.warning("MTU %d in net-conf.json's Backend is more than %s's MTU %d allows; the device and the pods "
                    "get %d", cfg.mtu, ext.name, ext.mtu, cfg.device_mtu(ext.mtu))


class VXLANNetwork:
    """The VXLAN network of one IP family: its device and the per-node kernel entries.

    The device is watched as the entries are: a notification that it went, went down or lost its
    address, a full reconcile, or a request refused for want of it, looks at it first and restores
    it (with the MAC this node advertises, so the other nodes need not change anything), then every
    entry on it. While it cannot be restored :attr:`device_ok` is False and no entry is sent.
    """

    def __init__(self, nl: Netlink, cfg: VXLANConfig, family: Family, ext: ExternalInterface,
                 network: IPNetwork) -> None:
        self.nl = nl
        self.cfg = cfg
        self.family = family
        self.ext = ext
        self.network = network
        self.name = device_name(cfg.vni, family)
        self.device: Device | None = None
        self.device_ok = False  # the device is there, up and configured (from configure_device on)
        self._device_error = ""  # the last failure to restore the device, logged once
        self.own_subnet: IPNetwork | None = None
        self.applied: dict[str, Entry] = {}  # node name -> what the kernel holds for it
        self._keys: dict[str, str] = {}  # each route and neighbour of `applied`, named as in _keys() -> its node
        # node name -> what its lease asks for, or the lease itself when it asks for nothing (no tuple a node)
        self._built: dict[str, Entry | Lease] = {}
        self._macs: dict[str, str] = {}  # VtepMAC -> the node whose entries use it (of the leases in _built)
        self._mac_waiting: dict[str, Entry] = {}  # nodes refused for a VtepMAC another holds -> what they ask for
        self._taken: set[str] = set()  # waiting nodes that got their VtepMAC since the last sync or reconcile
        self._failing: dict[str, set[str]] = {}  # node name -> the request failures logged for it
        # flanneld's log texts of this family: "adding v6 subnet", "AddV6ARP failed", "removing v6subnet" (sic)
        self._v6 = family.v6
        self._v6_ = (family.v6 + " ").lstrip()
        self._V6 = family.v6.upper()

    @property
    def mtu(self) -> int:
        """The pods' MTU (``FLANNEL_MTU``): net-conf's MTU (default: the external interface's) less 50, in
        every family as in flanneld."""
        return self.cfg.device_mtu(self.ext.mtu)

    @property
    def device_mtu(self) -> int:
        """The device's MTU: the pods', at most what the kernel allows over this family (1430 for IPv6 on a
        1500 link, 20 less than the pods', as flanneld's)."""
        return min(self.mtu, self.ext.mtu - self.family.tunnel_overhead)

    def backend_data(self) -> str:
        """This family's ``backend-data`` / ``backend-v6-data`` annotation."""
        assert self.device is not None
        return backend_data(self.cfg.vni, self.device.mac)

    # -- the device --------------------------------------------------------------------------------

    def create_device(self, mac_hint: str = "") -> Device:
        """Create the device, or reuse a compatible existing one with its MAC.

        A new device takes ``mac_hint`` (the MAC this node last advertised), so a device lost to a
        reboot comes back with the MAC the other nodes already know; a hint that is not a usable MAC is
        ignored with a warning, for a random one.
        """
        hint = mac_hint.lower()
        if hint:
            try:
                problem = mac_problem(parse_mac(hint))
            except ValueError:
                problem = "is not a MAC address"
            if problem:
                log.warning("Ignoring the VtepMAC %.40r this node advertised: it %s; a new %s gets a random MAC",
                            mac_hint, problem, self.name)
                hint = ""
        try:
            link = self.nl.link(name=self.name)
            if link is not None:
                found = read_link(link)
                reason = incompatibility(found, self.cfg, self.ext, self.family)
                if not reason:
                    log.log(V(1), "VXLAN device already exists")
                    self.device = Device(self.name, found.index, found.mac)
                    return self.device
                log.warning('"%s" already exists with incompatible configuration: %s; recreating device',
                            self.name, reason)
                self.nl.call(request(ifinfmsg, RTM_DELLINK, fields={"index": found.index}))
            self.device = self._create(hint or random_mac())
            log.info("Interface %s mac address set to: %s", self.name, self.device.mac)
        except OSError as exc:
            raise DeviceError(_errstr(exc)) from exc
        return self.device

    def _create(self, mac: str) -> Device:
        """Add the device as flanneld does, with flanneld's transmit queue length of 0 too, and the MTU
        of flannel v0.21.3's MTU key (the external interface's by default)."""
        data = device_attributes(self.cfg, self.ext, self.family)
        self.nl.call(request(ifinfmsg, RTM_NEWLINK, CREATE, attrs=[
            ("IFLA_IFNAME", self.name), ("IFLA_TXQLEN", 0), ("IFLA_ADDRESS", mac), ("IFLA_MTU", self.device_mtu),
            ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "vxlan"), ("IFLA_INFO_DATA", {"attrs": data})]}),
        ]))
        link = self.nl.link(name=self.name)
        if link is None:
            raise DeviceError("%s vanished right after it was created" % self.name)
        try:
            self.nl.write_sysctl("net/ipv6/conf/%s/accept_ra" % self.name, "0")
        except OSError:
            pass
        return Device(self.name, link["index"], link.get_attr("IFLA_ADDRESS"))

    def _addresses(self, idx: int) -> list[Any]:
        """The device's addresses of this family, as ip_interface objects, in kernel order."""
        return [ip_interface((m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"), m["prefixlen"]))
                for m in self.nl.addresses(idx, self.family.af)]

    def configure_device(self, subnet: IPNetwork) -> None:
        """Give the device ``<subnet network address>/32`` (``/128`` for IPv6) and no other address in the
        network, and bring it up."""
        assert self.device is not None
        idx = self.device.index
        self.own_subnet = subnet
        want = _device_address(subnet)
        try:
            present = False
            for addr in self._addresses(idx):
                if addr == want:
                    present = True
                elif addr.ip in self.network:
                    self.nl.call(request(ifaddrmsg, RTM_DELADDR, fields=_addr_fields(idx, addr),
                                         attrs=[("IFA_LOCAL", str(addr.ip))]))
                    log.info("removed IP address %s from %s", addr, self.name)
            if not present:
                self.nl.call(request(ifaddrmsg, RTM_NEWADDR, CREATE, fields=_addr_fields(idx, want),
                                     attrs=[("IFA_LOCAL", str(want.ip)), ("IFA_ADDRESS", str(want.ip))]))
        except OSError as exc:
            raise DeviceError("failed to configure interface %s: failed to ensure %saddress of interface %s: %s"
                              % (self.name, self._v6_, self.name, _errstr(exc))) from exc
        try:
            self.nl.call(request(ifinfmsg, RTM_NEWLINK, fields={"index": idx, "flags": IFF_UP, "change": IFF_UP}))
        except OSError as exc:
            raise DeviceError("failed to configure interface %s: failed to set %sinterface %s to UP state: %s"
                              % (self.name, self._v6_, self.name, _errstr(exc))) from exc
        self.device_ok = True

    def _device_problem(self) -> str:
        """What is wrong with the device, read from the kernel (its link and the addresses), or ''."""
        assert self.device is not None and self.own_subnet is not None
        link = self.nl.link(name=self.name)
        if link is None:
            return "was deleted"
        found = read_link(link)
        reason = incompatibility(found, self.cfg, self.ext, self.family)
        if reason:
            return "was replaced by an incompatible device (%s)" % reason
        if found.index != self.device.index:
            return "was re-created"
        if found.mac != self.device.mac:
            return "has the MAC %s instead of %s" % (found.mac, self.device.mac)
        if not found.up:
            return "was set down"
        want = _device_address(self.own_subnet)
        if want not in self._addresses(found.index):
            return "lost its address %s" % want
        return ""

    def _rebuild_device(self) -> None:
        """Re-create the device if it is gone or incompatible, else take it with the MAC this node
        advertises; then its address, and up."""
        assert self.device is not None and self.own_subnet is not None
        mac = self.device.mac
        link = self.nl.link(name=self.name)
        found = read_link(link) if link is not None else None
        if found is not None and incompatibility(found, self.cfg, self.ext, self.family):
            self.nl.call(request(ifinfmsg, RTM_DELLINK, fields={"index": found.index}))
            found = None
        if found is None:
            self._follow_external()
            self.device = self._create(mac)
        else:
            if found.mac != mac:
                self.nl.call(request(ifinfmsg, RTM_NEWLINK, fields={"index": found.index},
                                     attrs=[("IFLA_ADDRESS", mac)]))
            self.device = Device(self.name, found.index, mac)
        self.configure_device(self.own_subnet)

    def _follow_external(self) -> None:
        """Find the external interface again by its name if it was re-created with a new index (the kernel
        deletes the device with it); raises DeviceError while it is gone or lacks its address."""
        try:
            ext = ip.follow(self.nl, self.ext, self.family)
        except LookupError as exc:
            raise DeviceError("%s; waiting for it" % exc) from None
        if ext is not self.ext:
            log.info("External interface %s was re-created (index %d, was %d); %s follows it", ext.name, ext.index,
                     self.ext.index, self.name)
            self.ext = ext

    def _repair_device(self, problem: str) -> int:
        """Restore the device and then every entry on it (a new device has a new index, and a device
        set down loses its routes and neighbours). One log line says what was wrong and what was
        done; a failure is logged once and tried again at the next notification or reconcile.
        Returns how many entries had drifted, as :meth:`_converge`."""
        assert self.device is not None and self.own_subnet is not None
        self.device_ok = False
        for attempt in (1, 2):
            try:
                self._rebuild_device()
                break
            except (OSError, DeviceError) as exc:
                if attempt == 1 and _errno(exc.__cause__ or exc) == errno.ENODEV:
                    # The kernel finished deleting it while we looked: look again.
                    problem = self._device_problem() or problem
                    continue
                error = _errstr(exc) if isinstance(exc, OSError) else str(exc)
                if error != self._device_error:
                    log.error("%s %s and could not be restored: %s", self.name, problem, error)
                    self._device_error = error
                return 0
        self._device_error = ""
        metrics.REPAIRS.inc()
        repairs = self._converge()
        log.warning("%s %s; restored it (MAC %s, address %s, up) and the kernel entries of %d nodes",
                    self.name, problem, self.device.mac, _device_address(self.own_subnet), len(self.applied))
        return repairs

    def _check(self) -> int:
        """Look at the device, restore it if needed, and compare every entry on it with the leases.
        Returns how many entries had drifted, as :meth:`_converge`."""
        problem = self._device_problem()
        if problem:
            return self._repair_device(problem)
        self.device_ok = True
        repairs = self._converge()
        if repairs:
            log.info("Reconcile repaired %d kernel entries on %s", repairs, self.name)
        return repairs

    # -- per-node entries -------------------------------------------------------------------------

    def _entry(self, name: str, lease: Lease | None) -> Entry | None:
        """The entries a lease asks for, or None. Remembered per lease, so an unusable lease is
        logged once and a reconcile does not decode every lease again."""
        built = self._built.get(name)
        if built is not None and (built.lease if isinstance(built, Entry) else built) == lease:
            return built if isinstance(built, Entry) else None
        entry = self._build(name, lease) if lease is not None else None
        held = built if isinstance(built, Entry) and self._macs.get(built.mac) == name else None
        if entry is not None and held is not None and entry.mac == held.mac:
            self._built[name] = entry  # a holder keeps its VtepMAC through any change of its lease
            return entry
        waited = self._mac_waiting.pop(name, None)
        if held is not None:
            self._release(held)
        if lease is None:
            self._built.pop(name, None)
            self._failing.pop(name, None)
            return None
        if entry is not None:
            entry = self._claim(name, entry, quiet=waited is not None and waited.mac == entry.mac)
        self._built[name] = entry or lease
        return entry

    def _claim(self, name: str, e: Entry, quiet: bool) -> Entry | None:
        """The entry if its VtepMAC is free (it is then the node's), else None: the node waits for it,
        with a warning unless ``quiet``."""
        holder = self._macs.get(e.mac)
        own = self.device is not None and e.mac == self.device.mac
        if holder is None and not own:
            self._macs[e.mac] = name
            return e
        self._mac_waiting[name] = e
        if not quiet:
            log.warning('Ignoring node "%s": its %sVtepMAC %s is %s', name, self._v6_, e.mac,
                        "this node's own" if own else 'the VtepMAC of node "%s", which held it first' % holder)
        return None

    def _release(self, e: Entry) -> None:
        """Its holder no longer asks for ``e``: its VtepMAC goes to the first node waiting for it."""
        del self._macs[e.mac]
        waiter = next((w for w, want in self._mac_waiting.items() if want.mac == e.mac), None)
        if waiter is not None:
            want = self._mac_waiting.pop(waiter)
            self._macs[want.mac] = waiter
            self._built[waiter] = want
            self._taken.add(waiter)
            log.info('Node "%s" takes VtepMAC %s, which no other node claims now', waiter, want.mac)

    def _build(self, name: str, lease: Lease) -> Entry | None:
        if lease.subnet == self.own_subnet:
            return None
        if lease.backend_type != "vxlan":
            subnets = {4: "<nil>", 6: "<nil>", lease.subnet.version: str(lease.subnet)}
            log.warning("ignoring non-vxlan v4Subnet(%s) v6Subnet(%s): type=%s", subnets[4], subnets[6],
                        lease.backend_type)
            return None
        try:
            raw = parse_mac(json.loads(lease.backend_data)["VtepMAC"])
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            log.error("error decoding %ssubnet lease JSON: %.200s (node %s)", self._v6_, exc, name)
            return None
        mac = raw.hex(":")
        problem = mac_problem(raw)
        if problem:
            log.warning('Ignoring node "%s": its %sVtepMAC %s %s', name, self._v6_, mac, problem)
            return None
        # inet_ntop: str() of ipaddress objects costs some 10 ms of CPU at 5,000 nodes
        gw = socket.inet_ntop(self.family.af, lease.subnet.network_address.packed)
        direct = None
        if self.cfg.direct_routing:
            direct = self._direct_gateway(socket.inet_ntop(self.family.af, lease.public_ip.packed))
        return Entry("%s/%d" % (gw, lease.subnet.prefixlen), gw, mac, lease.public_ip, direct, lease)

    def _direct_gateway(self, public_ip: str) -> str | None:
        """The public IP when it is on a directly connected subnet (one route, no gateway)."""
        try:
            routes = self.nl.route_get(public_ip)
        except OSError:
            return None
        if len(routes) == 1 and not routes[0].get_attr("RTA_GATEWAY"):
            return public_ip
        return None

    def _add(self, e: Entry) -> list[tuple[str, Packed]]:
        """The requests that program an entry, each with the error text flanneld logs for it."""
        assert self.device is not None
        v6, v6_, V6 = self._v6, self._v6_, self._V6
        if e.direct_gw is not None:
            log.log(V(2), "Adding %sdirect route to %ssubnet: %s PublicIP%s: %s", v6_, v6_, e.dst, v6, e.remote)
            return [("Error adding %sroute to %s via %s" % (v6_, e.dst, e.direct_gw),
                     _route(RTM_NEWROUTE, e.dst, e.direct_gw, None))]
        log.log(V(2), "adding %ssubnet: %s PublicIP%s: %s VtepMAC: %s", v6_, e.dst, v6, e.remote, e.mac)
        idx = self.device.index
        return [("Add%sARP failed" % V6, _neigh(RTM_NEWNEIGH, self.family.af, idx, e.gw, e.mac)),
                ("Add%sFDB failed" % V6, _neigh(RTM_NEWNEIGH, AF_BRIDGE, idx, e.public_ip, e.mac)),
                ("failed to add %svxlanRoute (%s -> %s)" % (v6_, e.dst, e.gw), _route(RTM_NEWROUTE, e.dst, e.gw, idx))]

    def _remove(self, e: Entry, keep: Entry | None = None) -> list[tuple[str, Packed]]:
        """The requests that delete an entry, except the parts ``keep`` (its replacement) overwrites."""
        assert self.device is not None
        v6, v6_, V6 = self._v6, self._v6_, self._V6
        if e.direct_gw is not None:
            log.log(V(2), "Removing %sdirect route to %ssubnet: %s PublicIP%s: %s", v6_, v6_, e.dst, v6, e.remote)
            if keep is not None and keep.dst == e.dst:
                return []
            # flanneld v0.20.2 never removes an IPv6 direct route (it deletes the IPv4 one instead); this does
            return [("Error deleting %sroute to %s via %s" % (v6_, e.dst, e.direct_gw),
                     _route(RTM_DELROUTE, e.dst, e.direct_gw, None))]
        log.log(V(2), "removing %ssubnet: %s PublicIP%s: %s VtepMAC: %s", v6, e.dst, v6, e.remote, e.mac)
        idx = self.device.index
        out = []
        if keep is None or keep.direct_gw is not None or keep.dst != e.dst:
            out.append(("Del%sARP failed" % V6, _neigh(RTM_DELNEIGH, self.family.af, idx, e.gw, e.mac)))
            out.append(("failed to delete %svxlanRoute (%s -> %s)" % (v6_, e.dst, e.gw),
                        _route(RTM_DELROUTE, e.dst, e.gw, idx)))
        if keep is None or keep.direct_gw is not None or (keep.mac, keep.remote) != (e.mac, e.remote):
            out.append(("Del%sFDB failed" % V6, _neigh(RTM_DELNEIGH, AF_BRIDGE, idx, e.public_ip, e.mac)))
        return out

    def _send(self, work: list[tuple[str, Packed]], owners: list[str] | None = None) -> list[int]:
        """Send requests in one batch and log failures. Each request's outcome: 0 when done (a missing
        entry counts as deleted), EEXIST when an exclusive create found the entry in place, else the
        errno it failed with.

        With ``owners`` (the node of each request) a failure names the node, and is logged once until
        it changes or the node's entries are programmed: every reconcile tries them again. Requests
        refused because the device is gone or down are not logged one by one: they mark the device
        lost (:attr:`device_ok`), for the caller to restore it."""
        if not work:
            return []
        codes = self.nl.batch([req for _, req in work])
        out = []
        for i, ((what, req), code) in enumerate(zip(work, codes)):
            deleting = req.msg_type in (RTM_DELNEIGH, RTM_DELROUTE)
            if code in _NO_DEVICE:
                self.device_ok = False
                code = 0 if deleting else code
            elif deleting and code in (errno.ENOENT, errno.ESRCH):
                code = 0
            elif code and not (code == errno.EEXIST and req.flags & NLM_F_EXCL):
                metrics.NETLINK_ERRORS.inc()
                error = "%s: %s" % (what, os.strerror(code).lower())
                if owners is None:
                    log.error("%s", error)
                elif error not in self._failing.setdefault(owners[i], set()):
                    log.error("%s (node %s; tried again at each reconcile)", error, owners[i])
                    self._failing[owners[i]].add(error)
            out.append(code)
        return out

    def sync(self, leases: dict[str, Lease | None]) -> set[str]:
        """Converge the named nodes' kernel entries to their leases (None: the node is gone).

        Returns the names whose entries changed. Entries that failed to program are left out of
        :attr:`applied`, so the next reconcile tries them again. While the device is lost nothing
        is sent for a node: the device is looked at, and its repair programs every entry.
        """
        changes: dict[str, tuple[Entry | None, Entry | None]] = {}
        for name, lease in leases.items():
            new, old = self._entry(name, lease), self.applied.get(name)
            if new != old:
                changes[name] = (old, new)
        for name in self._taken:  # waiting nodes whose VtepMAC a node of ``leases`` let go
            built = self._built.get(name)
            new = built if isinstance(built, Entry) else None
            if new != self.applied.get(name):
                changes.setdefault(name, (self.applied.get(name), new))
        self._taken.clear()
        asked = {name for name in changes if name in leases}
        if not changes:
            return set()
        if not self.device_ok:
            self._check()
            return asked if self.device_ok else set()
        removals = [w for old, new in changes.values() if old is not None for w in self._remove(old, keep=new)]
        self._send(removals)
        for name in changes:
            self._forget(name)
        self._program({name: new for name, (_, new) in changes.items() if new is not None})
        if not self.device_ok:  # it went while these were sent
            self._check()
        return asked

    def _program(self, entries: dict[str, Entry], missing_only: bool = False) -> set[str]:
        """Program entries in batches of PROGRAM_NODES nodes and record in :attr:`applied` those that
        succeeded whole. (A batch's requests and texts are built before it is sent: at 5,000 nodes in
        one batch they would take some 4 MiB at once.)

        With ``missing_only`` each part is created only where it is absent (an exclusive create, which
        the kernel answers with EEXIST for a part in place): a deletion reported after a comparison
        already put the entry back then changes nothing. Returns the names of which a part was created."""
        created: set[str] = set()
        items = iter(entries.items())
        while batch := list(islice(items, PROGRAM_NODES)):
            created |= self._program_batch(batch, missing_only)
        return created

    def _program_batch(self, entries: list[tuple[str, Entry]], missing_only: bool) -> set[str]:
        work: list[tuple[str, Packed]] = []
        owners: list[str] = []
        for name, e in entries:
            requests = self._add(e)
            if missing_only:
                requests = [(what, replace(req, flags=CREATE)) for what, req in requests]
            work += requests
            owners += [name] * len(requests)
        codes = self._send(work, owners)
        failed = {owner for owner, code in zip(owners, codes) if code not in (0, errno.EEXIST)}
        for name, e in entries:
            self._forget(name)
            if name not in failed:
                self._remember(name, e)
                self._failing.pop(name, None)
        return {owner for owner, code in zip(owners, codes) if code == 0}

    def _remember(self, name: str, e: Entry) -> None:
        self.applied[name] = e
        for key in _keys(e):
            self._keys[key] = name

    def _forget(self, name: str) -> None:
        e = self.applied.pop(name, None)
        if e is not None:
            for key in _keys(e):
                if self._keys.get(key) == name:
                    del self._keys[key]

    def restore(self, deleted: list[Deletion]) -> int:
        """Put back the entries the kernel reports deleted that the leases still want (a deletion
        by hand, say). An empty list means notifications were lost, and news of the device (gone,
        down, an address removed) that its entries may be gone with it too: then the device is
        looked at and everything compared. Returns how many entries were programmed again."""
        assert self.device is not None
        idx = self.device.index
        if not deleted or not self.device_ok or any(kind in _DEVICE_NEWS and where == idx for kind, where, _ in deleted):
            return self._check()
        lost: dict[str, Entry] = {}
        for kind, where, what in deleted:
            if (kind == "route" and where == MAIN_TABLE) or (kind == "neigh" and where == idx):
                name = self._keys.get(what)
            elif kind == "fdb" and where == idx:  # "mac ip": a VtepMAC has one holder
                mac, _, public_ip = what.partition(" ")
                name = self._macs.get(mac)
                e = self.applied.get(name) if name is not None else None
                name = name if e is not None and e.direct_gw is None and e.public_ip == public_ip else None
            else:
                continue
            if name is not None and name in self.applied:
                lost[name] = self.applied[name]
        restored = self._program(lost, missing_only=True)
        if not self.device_ok:  # it went while these were sent
            return self._check()
        if restored:
            metrics.REPAIRS.inc(len(restored))
            log.info("Restored the kernel entries of %d nodes after they were deleted", len(restored))
        return len(restored)

    def reconcile(self, leases: dict[str, Lease]) -> int:
        """Converge the kernel to ``leases``: the device first, then one dump of the neighbours, FDB
        entries and routes, and only the requests that change something (a restart with everything
        in place sends none).

        Returns how many kernel entries had drifted: strays removed, and entries that were
        programmed once and had gone missing.
        """
        metrics.RECONCILES.inc()
        for name in [n for n in self._built if n not in leases]:
            self._entry(name, None)
        for name, lease in leases.items():
            self._entry(name, lease)
        self._taken.clear()  # the comparison programs them
        return self._check()

    def _converge(self) -> int:
        """Compare the device's entries with what the leases ask for (:attr:`_built`) and send the
        difference; how many had drifted."""
        strays, missing = self._compare()
        drifted = sum(1 for name, e in missing.items() if self.applied.get(name) == e)
        for name in list(self.applied):
            if not isinstance(self._built.get(name), Entry) or name in missing:
                self._forget(name)
        for name, e in self._built.items():
            if isinstance(e, Entry) and name not in missing:
                self._remember(name, e)
        self._program(missing)
        repairs = strays + drifted
        if repairs:
            metrics.REPAIRS.inc(repairs)
        return repairs

    def _compare(self) -> tuple[int, dict[str, Entry]]:
        """Dump the device's entries; delete those no lease asks for. Returns how many were deleted, and
        the entries missing or different, by node name. A dump disturbed by a change is read again, as
        Netlink's are."""
        return read_dump(self._compare_once)

    def _compare_once(self) -> tuple[int, dict[str, Entry]]:
        # The dumps are read as they arrive, and what is found marked in one dict of small ints by node
        # name: at 20,000 nodes, the dumps held whole, or a set of what each holds, would take some 6 MiB
        # for a moment.
        assert self.device is not None
        idx = self.device.index
        desired = self._built  # the Entry values: a Lease asks for nothing
        want_neigh = {e.gw: name for name, e in desired.items() if isinstance(e, Entry) and e.direct_gw is None}
        want_fdb = {desired[name].mac: name for name in want_neigh.values()}  # type: ignore[union-attr]
        want_routes = {e.dst: name for name, e in desired.items() if isinstance(e, Entry)}
        found: dict[str, int] = {}  # node name -> _ROUTE | _NEIGH | _FDB of its entries found in place
        own = str(self.own_subnet)
        strays: list[tuple[str, Packed]] = []
        for n in self.nl.iter_neighbours(self.family.af, idx):
            if not n.state & NUD_PERMANENT or n.dst is None:
                continue
            name = want_neigh.get(n.dst)
            if name is None:
                strays.append(("Del%sARP failed" % self._V6,
                               _neigh(RTM_DELNEIGH, self.family.af, idx, n.dst, n.lladdr)))
            elif desired[name].mac == n.lladdr:  # type: ignore[union-attr]
                found[name] = found.get(name, 0) | _NEIGH
        for n in self.nl.iter_neighbours(AF_BRIDGE, idx):
            if n.dst is None or n.lladdr is None:
                continue
            name = want_fdb.get(n.lladdr)
            if name is not None and desired[name].public_ip == n.dst:
                found[name] = found.get(name, 0) | _FDB
            else:
                strays.append(("Del%sFDB failed" % self._V6, _neigh(RTM_DELNEIGH, AF_BRIDGE, idx, n.dst, n.lladdr)))
        for r in self.nl.iter_routes(family=self.family.af):
            if r.oif != idx:
                if r.oif != self.ext.index or r.gateway is None or r.proto != RTPROT_BOOT:
                    continue
                dst = self.family.network(r.dst)  # a DirectRouting route, if it lies within the network
                if not dst.subnet_of(self.network) or dst == self.network:  # type: ignore[arg-type]
                    continue
            elif r.proto == RTPROT_KERNEL:  # the route of the device's own address, or of its link-local one
                continue
            name = want_routes.get(r.dst)
            e = desired[name] if name is not None else None
            if name is not None and isinstance(e, Entry) and (e.direct_gw or e.gw, e.direct_gw is None) == (
                    r.gateway, r.oif == idx):
                found[name] = found.get(name, 0) | _ROUTE
            elif r.dst != own:
                strays.append(("failed to delete %svxlanRoute (%s -> %s)" % (self._v6_, r.dst, r.gateway),
                               _route(RTM_DELROUTE, r.dst, r.gateway, r.oif)))
        self._send(strays)
        missing = {name: e for name, e in desired.items() if isinstance(e, Entry) and
                   found.get(name, 0) != (_ROUTE if e.direct_gw is not None else _ROUTE | _NEIGH | _FDB)}
        return len(strays), missing


def _keys(e: Entry) -> list[str]:
    """The route ("dst/len") and neighbour ("ip") an Entry owns, as :func:`netlink.deletions` names them,
    shapes that never coincide. (Plain strings, not (kind, text) pairs: thousands of nodes' tuples cost
    some 0.8 MiB per family. Its FDB entry is found by its VtepMAC, which has one holder.)"""
    if e.direct_gw is not None:
        return [e.dst]
    return [e.dst, e.gw]


def _neigh(msg_type: int, family: int, idx: int, dst: str, mac: str | None) -> Packed:
    """A permanent neighbour (AF_INET, AF_INET6) or FDB entry (AF_BRIDGE, NTF_SELF) on the device."""
    return neighbour_request(msg_type, REPLACE if msg_type == RTM_NEWNEIGH else 0, family, idx, NUD_PERMANENT,
                             NTF_SELF if family == AF_BRIDGE else 0, dst, mac)


def _route(msg_type: int, dst: str, gw: str | None, oif: int | None) -> Packed:
    """A main-table route to ``dst`` ("a.b.c.d/len", "x::/len") via ``gw``: onlink through ``oif`` when given (the
    tunnel). A new route has protocol boot and universe scope, as flanneld's; a deletion matches any."""
    address, _, length = dst.partition("/")
    if msg_type == RTM_NEWROUTE:
        return route_request(msg_type, REPLACE, address, int(length), gw, oif, MAIN_TABLE, RTPROT_BOOT, 0,
                             RTN_UNICAST, RTNH_F_ONLINK if oif is not None else 0)
    return route_request(msg_type, 0, address, int(length), gw, oif, MAIN_TABLE, 0, RT_SCOPE_NOWHERE, 0, 0)


def _device_address(subnet: IPNetwork) -> Any:
    """The device's address: the subnet's network address, /32 or /128, as flanneld gives it."""
    return ip_interface((subnet.network_address, subnet.max_prefixlen))


def _addr_fields(idx: int, addr: Any) -> dict[str, Any]:
    return {"family": family_of(addr).af, "prefixlen": addr.network.prefixlen, "index": idx}


def _errno(exc: BaseException) -> int:
    return int(getattr(exc, "code", 0) or getattr(exc, "errno", 0) or 0)


def _errstr(exc: Exception) -> str:
    code = _errno(exc)
    return os.strerror(code).lower() if code else str(exc)
