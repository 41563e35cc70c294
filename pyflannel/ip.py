"""Choosing the external interface: ``--iface``, ``--iface-regex``, ``--iface-can-reach``, ``--public-ip``.

The rules and log lines are flanneld's (its ``pkg/ipmatch``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from .netlink import Netlink

log = logging.getLogger(__name__)


class InterfaceError(Exception):
    """No usable interface; the message is flanneld's fatal line."""


@dataclass(frozen=True)
class ExternalInterface:
    """The interface the tunnel runs over, its address, and the address advertised to other nodes."""

    name: str
    index: int
    mtu: int
    iface_addr: IPv4Address
    ext_addr: IPv4Address


def _address(m: Any) -> IPv4Address:
    return IPv4Address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))


def _v4_addresses(nl: Netlink, index: int) -> list[IPv4Address]:
    """The interface's IPv4 addresses, global unicast first, then link-local, in kernel order."""
    addrs = [_address(m) for m in nl.addresses(index)]
    usable = [a for a in addrs if not (a.is_loopback or a.is_link_local or a.is_multicast or a.is_unspecified)]
    return usable + [a for a in addrs if a.is_link_local]


def _link(nl: Netlink, index: int) -> tuple[str, int]:
    msg = nl.link(index=index)
    if msg is None:
        raise InterfaceError("Failed to find any valid interface to use: interface %d vanished" % index)
    return msg.get_attr("IFLA_IFNAME"), msg.get_attr("IFLA_MTU") or 0


def _by_ip(nl: Netlink, ip: IPv4Address) -> int:
    for m in nl.addresses():
        if _address(m) == ip:
            return int(m["index"])
    raise LookupError("error looking up interface %s: No interface with given IP found" % ip)


def _by_name(nl: Netlink, name: str) -> int:
    found = nl.link(name=name)
    if found is None:
        raise LookupError("error looking up interface %s: route ip+net: no such network interface" % name)
    return int(found["index"])


def _by_regex(nl: Netlink, pattern: str) -> tuple[int, IPv4Address | None]:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise LookupError("invalid regex %r: %s" % (pattern, exc)) from None
    links = sorted(((int(m["index"]), m.get_attr("IFLA_IFNAME")) for m in nl.links()))
    for index, _ in links:
        for addr in _v4_addresses(nl, index):
            if rx.search(str(addr)):
                return index, addr
    for index, name in links:
        if rx.search(name):
            return index, None
    raise LookupError("No interface matches the regex")


def _by_route(nl: Netlink, target: str) -> tuple[int, IPv4Address | None]:
    routes = nl.route_get(str(IPv4Address(target)))
    if not routes:
        raise LookupError("no route to %s" % target)
    src = routes[0].get_attr("RTA_PREFSRC")
    return int(routes[0].get_attr("RTA_OIF")), IPv4Address(src) if src else None


def _default_route(nl: Netlink) -> int:
    for r in nl.routes(254):
        if r.dst == "0.0.0.0/0":
            if not r.oif:
                raise LookupError("failed to get default interface: Found default route but could not determine interface")
            return r.oif
    raise LookupError("failed to get default interface: Unable to find default route")


def select(nl: Netlink, ifaces: list[str], regexes: list[str], can_reach: str, public_ip: str) -> ExternalInterface:
    """Pick the external interface the way flanneld does; raises InterfaceError with its wording."""
    index: int | None = None
    addr: IPv4Address | None = None
    if not ifaces and not regexes and not can_reach:
        try:
            if public_ip:
                addr = IPv4Address(public_ip)
                index = _by_ip(nl, addr)
            else:
                log.info("Determining IP address of default interface")
                index = _default_route(nl)
        except (LookupError, ValueError) as exc:
            raise InterfaceError("Failed to find any valid interface to use: %s" % exc) from None
    else:
        for value in ifaces:
            try:
                try:
                    ip = IPv4Address(value)
                except ValueError:
                    index = _by_name(nl, value)
                else:
                    log.info("Searching for interface using %s", ip)
                    index, addr = _by_ip(nl, ip), ip
                break
            except LookupError as exc:
                log.info("Could not find valid interface matching %s: %s", value, exc)
        for pattern in regexes if index is None else ():
            try:
                index, addr = _by_regex(nl, pattern)
                break
            except LookupError as exc:
                log.info("Could not find valid interface matching %s: %s", pattern, exc)
        if index is None and can_reach:
            try:
                index, addr = _by_route(nl, can_reach)
            except (LookupError, ValueError, OSError) as exc:
                log.info("Could not find valid interface matching ifaceCanReach: %s: %s", can_reach, exc)
        if index is None:
            raise InterfaceError("Failed to find interface to use that matches the interfaces and/or regexes provided")

    name, mtu = _link(nl, index)
    if addr is None:
        found = _v4_addresses(nl, index)
        if not found:
            raise InterfaceError("Failed to find any valid interface to use: failed to find IPv4 address for interface %s" % name)
        addr = found[0]
    log.info("Using interface with name %s and address %s", name, addr)
    if mtu == 0:
        raise InterfaceError("Failed to find any valid interface to use: failed to determine MTU for %s interface" % addr)
    if public_ip:
        ext = IPv4Address(public_ip)
        log.info("Using %s as external address", ext)
    else:
        ext = addr
        log.info("Defaulting external address to interface address (%s)", addr)
    return ExternalInterface(name, index, mtu, addr, ext)
