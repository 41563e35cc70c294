"""This node's own network, which no other node's lease may point into or cover.

Another node's lease becomes a route to its pod CIDR and a tunnel (or next hop) to its public IP. A
pod CIDR that covers this node's address, its gateway, its external interface's subnets or the API
server would take underlay traffic into the overlay; a public IP that is this node's own, a loopback,
multicast or broadcast address would reflect or amplify pod traffic. The subnet managers refuse such
leases with one warning naming the node (flanneld v0.20.2 programs them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_address, ip_interface
from urllib.parse import urlsplit

from ..family import Family, IPAddress, IPNetwork
from ..ip import ExternalInterface
from ..netlink import Netlink

log = logging.getLogger(__name__)


def last_address(net: IPNetwork) -> int:
    """A network's last address as an integer, without ``broadcast_address`` (which ``overlaps`` and ``in``
    use too): it would cache more objects on every lease's network, for thousands of nodes."""
    return int(net.network_address) | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)


def public_ip_problem(ip: IPAddress) -> str:
    """Why an address cannot be another node's public IP on any node ('' when it can)."""
    if ip.version == 4:  # in integers: the properties below cost some µs each, for thousands of nodes
        value = int(ip)
        if value == 0:
            return "is unspecified"
        if value >> 24 == 127:
            return "is a loopback address"
        if value >> 28 == 14:
            return "is a multicast address"
        return "is the broadcast address" if value == 0xFFFFFFFF else ""
    if ip.is_unspecified:
        return "is unspecified"
    if ip.is_loopback:
        return "is a loopback address"
    if ip.is_multicast:
        return "is a multicast address"
    return ""


@dataclass(frozen=True)
class NodeNetwork:
    """One family's addresses of this node that another node's lease may not point into or cover."""

    addresses: tuple[IPAddress, ...] = ()  # this node's own: the external interface's and the advertised one
    subnets: tuple[IPNetwork, ...] = ()  # the external interface's connected subnets: the node network
    gateways: tuple[IPAddress, ...] = ()  # the next hops of the default routes through the external interface
    servers: tuple[IPAddress, ...] = ()  # the API server, or the etcd endpoints, where given as addresses

    def subnet_problem(self, subnet: IPNetwork) -> str:
        """Why another node's pod CIDR ``subnet`` would take this node's own traffic ('' when it would not)."""
        if not (self.subnets or self.addresses or self.gateways or self.servers):
            return ""
        first, last = int(subnet.network_address), last_address(subnet)
        for net in self.subnets:
            if net.version == subnet.version and int(net.network_address) <= last and first <= last_address(net):
                return "overlaps this node's network %s" % net
        for what, addresses in (("address", self.addresses), ("gateway", self.gateways),
                                ("API server or etcd endpoint", self.servers)):
            for address in addresses:
                if address.version == subnet.version and first <= int(address) <= last:
                    return "contains this node's %s %s" % (what, address)
        return ""

    def address_problem(self, ip: IPAddress) -> str:
        """Why ``ip`` cannot be another node's public IP on this node, beyond :func:`public_ip_problem`:
        it is this node's own address, or its network's network or broadcast address ('' when it can)."""
        if ip in self.addresses:
            return "is this node's own address"
        for net in self.subnets:  # an IPv4 subnet's first and last addresses: its network and broadcast ones
            if ip.version == net.version == 4 and net.prefixlen < 31 and ip in (net.network_address,
                                                                                 net.broadcast_address):
                return "is the %s address of this node's network %s" % (
                    "network" if ip == net.network_address else "broadcast", net)
        return ""

    def with_servers(self, urls: Iterable[str]) -> NodeNetwork:
        """This network and the hosts of ``urls`` of its family that are addresses (names are not resolved)."""
        servers = []
        for url in urls:
            try:
                host = ip_address(urlsplit(url).hostname or "")
            except ValueError:
                continue
            if not self.subnets or host.version == self.subnets[0].version:
                servers.append(host)
        return NodeNetwork(self.addresses, self.subnets, self.gateways, tuple(servers))


def node_network(nl: Netlink, ext: ExternalInterface, family: Family) -> NodeNetwork:
    """This node's network of ``family``, read from the kernel: the external interface's addresses and
    subnets (not the link-local ones), the advertised address, and the default routes' gateways through it."""
    addresses: list[IPAddress] = []
    subnets: list[IPNetwork] = []
    for m in nl.addresses(ext.index, family.af):
        iface = ip_interface((m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"), m["prefixlen"]))
        if iface.ip.is_link_local:
            continue
        addresses.append(iface.ip)
        if iface.network.prefixlen > 0 and iface.network not in subnets:
            subnets.append(iface.network)
    for own in (ext.addrs[family].iface_addr, ext.addrs[family].ext_addr):
        if own not in addresses:
            addresses.append(own)
    gateways = [ip_address(r.gateway) for r in nl.routes(family=family.af)
                if r.oif == ext.index and r.gateway is not None and r.dst == family.any_network]
    return NodeNetwork(tuple(addresses), tuple(subnets), tuple(gateways))


def warn_overlap(network: IPNetwork, nodenet: NodeNetwork, ext: ExternalInterface) -> None:
    """Warn once, at start, when net-conf's Network overlaps the node network: pod routes could then
    cover node addresses (pyflannel refuses the pod CIDRs that do)."""
    key = "Network" if network.version == 4 else "IPv6Network"
    for net in nodenet.subnets:
        if net.version == network.version and net.overlaps(network):
            log.warning("The %s %s in net-conf.json overlaps this node's network %s on %s: pod CIDRs over it "
                        "would take node traffic into the overlay, and are refused; choose a %s apart from the "
                        "node network (and the same kube-controller-manager --cluster-cidr)",
                        key, network, net, ext.name, key)
