"""Choosing the external interface: ``--iface``, ``--iface-regex``, ``--iface-can-reach``, ``--public-ip``,
``--public-ipv6``, for each enabled family; and following it when it is re-created.

The rules and log lines are flanneld v0.28.9's (its ``pkg/ipmatch``). For dual-stack, each family
missing an address is filled from the chosen interface, as flannel v0.27.4 does, where v0.20.2
leaves it empty and later panics. An interface's addresses are taken in flannel v0.28's order of
preference: global before link-local, permanent (set by hand) before dynamic, non-temporary before
temporary (the kernel's ``IFA_F_*`` flags); deprecated ones are never taken.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, ip_address
from typing import Any

from .family import IPV4, IPV6, Family, IPAddress, family_of
from .netlink import Netlink

log = logging.getLogger(__name__)

IFA_F_TEMPORARY = 0x01  # an IPv6 privacy address; the same bit is IFA_F_SECONDARY in IPv4
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80  # set by hand (or by a tool through netlink), not by DHCP, SLAAC or a lifetime


class InterfaceError(Exception):
    """No usable interface; the message is flanneld's fatal line."""


@dataclass(frozen=True)
class ExtAddr:
    """One family's addresses: the interface's (the tunnel's local end) and the one advertised to other nodes."""

    iface_addr: IPAddress
    ext_addr: IPAddress
    ext_local: bool = True  # the advertised address is one of this node's (always so when it is the interface's)


@dataclass(frozen=True)
class ExternalInterface:
    """The interface the tunnel runs over, and its addresses of each enabled family."""

    name: str
    index: int
    mtu: int
    addrs: dict[Family, ExtAddr]

    @property
    def iface_addr(self) -> IPv4Address:
        """The IPv4 interface address (for code that handles IPv4 only)."""
        addr = self.addrs[IPV4].iface_addr
        assert isinstance(addr, IPv4Address)
        return addr

    @property
    def ext_addr(self) -> IPv4Address:
        """The advertised IPv4 address (for code that handles IPv4 only)."""
        addr = self.addrs[IPV4].ext_addr
        assert isinstance(addr, IPv4Address)
        return addr


def _address(m: Any) -> IPAddress:
    return ip_address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))


def _flags(m: Any) -> int:
    """An address's IFA_F_* flags: the 32-bit attribute when the kernel sends it, else the header's 8 bits."""
    flags = m.get_attr("IFA_FLAGS")
    return int(flags if flags is not None else m["flags"])


def _preference(address: IPAddress, flags: int) -> tuple[bool, bool, bool]:
    """Sorts an address after those flannel v0.28 prefers to it: link-local after global, then not
    permanent after permanent, then temporary after non-temporary."""
    return address.is_link_local, not flags & IFA_F_PERMANENT, bool(flags & IFA_F_TEMPORARY)


def _addresses(nl: Netlink, index: int, family: Family) -> list[IPAddress]:
    """The interface's usable addresses of ``family`` (global unicast or link-local, not deprecated) in
    the order of preference of :func:`_preference`, kernel order among equals."""
    found = []
    for m in nl.addresses(index, family.af):
        address, flags = _address(m), _flags(m)
        if flags & IFA_F_DEPRECATED or address.is_loopback or address.is_multicast or address.is_unspecified:
            continue
        found.append((_preference(address, flags), address))
    found.sort(key=lambda pair: pair[0])  # stable: kernel order among equals
    return [address for _, address in found]


_GIVEN = {IPV4: "IP", IPV6: "IPv6"}  # flanneld's "no interface with given IP/IPv6 found"


def _words(family: Family, what: str) -> str:
    """flanneld's wording: "address" / "v6 address", "route" / "v6 route"."""
    return ("%s %s" % (family.v6, what)).strip()


def _link(nl: Netlink, index: int) -> tuple[str, int]:
    msg = nl.link(index=index)
    if msg is None:
        raise InterfaceError("Failed to find any valid interface to use: interface %d vanished" % index)
    return msg.get_attr("IFLA_IFNAME"), msg.get_attr("IFLA_MTU") or 0


def _by_ip(nl: Netlink, ip: IPAddress) -> int:
    family = family_of(ip)
    for m in nl.addresses(0, family.af):
        if _address(m) == ip:
            return int(m["index"])
    raise LookupError("error looking up %s %s: no interface with given %s found"
                      % (_words(family, "interface"), ip, _GIVEN[family]))


def _by_name(nl: Netlink, name: str) -> int:
    found = nl.link(name=name)
    if found is None:
        raise LookupError("error looking up interface %s: route ip+net: no such network interface" % name)
    return int(found["index"])


def _by_regex(nl: Netlink, pattern: str, families: Sequence[Family]) -> tuple[int, dict[Family, IPAddress]]:
    """The first interface with an address of every family that matches, else the first whose name matches."""
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise LookupError("invalid regex %r: %s" % (pattern, exc)) from None
    links = sorted(((int(m["index"]), m.get_attr("IFLA_IFNAME")) for m in nl.links()))
    for index, _ in links:
        matched = {}
        for family in families:
            addr = next((a for a in _addresses(nl, index, family) if rx.search(str(a))), None)
            if addr is not None:
                matched[family] = addr
        if len(matched) == len(families):
            return index, matched
    for index, name in links:
        if rx.search(name):
            return index, {}
    listed = families[0] if len(families) == 1 else IPV4  # flanneld lists the IPv4 addresses unless IPv6-only
    available = ("%s:[%s]" % (name, " ".join(str(a) for a in _addresses(nl, index, listed))) for index, name in links)
    raise LookupError("could not match pattern %s to any of the available network interfaces (%s)"
                      % (pattern, ", ".join(available)))


def _by_route(nl: Netlink, target: str) -> tuple[int, dict[Family, IPAddress]]:
    routes = nl.route_get(str(ip_address(target)))
    if not routes:
        raise LookupError("no route to %s" % target)
    src = routes[0].get_attr("RTA_PREFSRC")
    found = ip_address(src) if src else None
    return int(routes[0].get_attr("RTA_OIF")), {family_of(found): found} if found else {}


def _default_route(nl: Netlink, family: Family) -> int:
    what = "default %s" % _words(family, "interface")
    for r in nl.routes(254, family.af):
        if r.dst == family.any_network:
            if not r.oif:
                raise LookupError("failed to get %s: found default %s but could not determine interface"
                                  % (what, _words(family, "route")))
            return r.oif
    raise LookupError("failed to get %s: unable to find default %s" % (what, _words(family, "route")))


def select(nl: Netlink, ifaces: list[str], regexes: list[str], can_reach: str, public_ip: str,
           public_ipv6: str = "", families: Sequence[Family] = (IPV4,)) -> ExternalInterface:
    """Pick the external interface and each family's addresses the way flanneld does; raises
    InterfaceError with its wording.

    ``families`` are the enabled ones, IPv4 first. The interface comes from the first flag that
    finds one (``--iface`` names or addresses, ``--iface-regex``, ``--iface-can-reach``), else
    from the first family's ``--public-ip(v6)``, else from the default route (in dual-stack the
    IPv6 default route must use the same interface). A family the flag did not give an address
    is filled with the interface's first address of it; ``--public-ip(v6)`` sets what is advertised.
    """
    publics = {f: ip_address(text) for f, text in ((IPV4, public_ip), (IPV6, public_ipv6)) if text and f in families}
    index: int | None = None
    found: dict[Family, IPAddress] = {}  # the addresses the flags name; the others are the interface's first
    if not ifaces and not regexes and not can_reach:
        try:
            if publics:
                # the owner of the first family's public address; the others' must be on it too
                found = dict(publics)
                owners = {f: _by_ip(nl, a) for f, a in publics.items()}
                kind = "interface"
            else:
                log.info("Determining IP address of default interface")
                owners = {f: _default_route(nl, f) for f in families}
                kind = "default route interface"
        except LookupError as exc:
            raise InterfaceError("Failed to find any valid interface to use: %s" % exc) from None
        (first, index), *others = owners.items()
        for family, other in others:
            if other != index:
                raise InterfaceError("Failed to find any valid interface to use: v%d %s %s must be the same with "
                                     "v%d %s %s" % (family.version, kind, _link(nl, other)[0], first.version,
                                                    kind, _link(nl, index)[0]))
    else:
        for value in ifaces:
            try:
                try:
                    ip = ip_address(value)
                except ValueError:
                    index = _by_name(nl, value)
                else:
                    log.info("Searching for interface using %s", ip)
                    index = _by_ip(nl, ip)
                    found = {family_of(ip): ip}
                break
            except LookupError as exc:
                log.info("Could not find valid interface matching %s: %s", value, exc)
        for pattern in regexes if index is None else ():
            try:
                index, found = _by_regex(nl, pattern, families)
                break
            except LookupError as exc:
                log.info("Could not find valid interface matching %s: %s", pattern, exc)
        if index is None and can_reach:
            log.info("Determining interface to use based on given ifcanreach: %s", can_reach)
            try:
                index, found = _by_route(nl, can_reach)
            except (LookupError, ValueError, OSError) as exc:
                log.info("Could not find valid interface matching ifaceCanReach: %s: %s", can_reach, exc)
        if index is None:
            raise InterfaceError("Failed to find interface to use that matches the interfaces and/or regexes provided")

    name, mtu = _link(nl, index)
    addrs: dict[Family, ExtAddr] = {}
    for family in families:
        addr = found.get(family)
        if addr is None:
            first_addrs = _addresses(nl, index, family)
            if not first_addrs:
                raise InterfaceError("Failed to find any valid interface to use: failed to find %s address for "
                                     "interface %s" % (family, name))
            addr = first_addrs[0]
        log.info("Using interface with name %s and %s %s", name, _words(family, "address"), addr)
        ext = publics.get(family)
        if ext is not None:
            log.info("Using %s as external address", ext)
        else:
            ext = addr
            log.info("Defaulting external %s to interface address (%s)", _words(family, "address"), addr)
        addrs[family] = ExtAddr(addr, ext, ext == addr or _is_local(nl, ext))
    if mtu == 0:
        raise InterfaceError("Failed to find any valid interface to use: failed to determine MTU for %s interface"
                             % addrs[families[0]].iface_addr)
    return ExternalInterface(name, index, mtu, addrs)


def _is_local(nl: Netlink, address: IPAddress) -> bool:
    """Whether ``address`` is on one of this node's interfaces."""
    try:
        _by_ip(nl, address)
    except LookupError:
        return False
    return True


def follow(nl: Netlink, ext: ExternalInterface, family: Family) -> ExternalInterface:
    """``ext`` as the kernel has it now: ``ext`` itself while its index still has its name; when the
    interface was re-created under a new index (a VLAN, bond or tailscale0 restarted), the interface of
    that name, once it holds its interface address of ``family`` again. Raises LookupError (flannel
    v0.28.9's device watcher's words where it has them) until then.

    The name is what the flags chose (or the address's interface, which keeps its name), so a
    re-created interface is found by it, as flannel v0.27.4's device watcher finds it. The addresses
    must be the ones chosen at start: they are what this node advertises.
    """
    link = nl.link(index=ext.index)
    if link is not None and link.get_attr("IFLA_IFNAME") == ext.name:
        return ext
    link = nl.link(name=ext.name)
    if link is None:
        raise LookupError("external interface %s not found" % ext.name)
    index = int(link["index"])
    want = ext.addrs[family].iface_addr
    have = _addresses(nl, index, family)
    if not have:
        raise LookupError("error getting %s addresses for %s: no %s address found for given interface"
                          % (family, ext.name, family))
    if want not in have:
        raise LookupError("%s was re-created without its address %s (it has %s); restart pyflannel to use another"
                          % (ext.name, want, ", ".join(str(a) for a in have)))
    return replace(ext, index=index)
