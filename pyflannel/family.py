"""The two IP families as data: what differs between IPv4 and IPv6 for every part of flannel.

The lease, the backends, the traffic manager and subnet.env each take a :class:`Family` and run the
same code for both, so a dual-stack node is two instances of the same types, not ``if ipv6`` branches.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Union

IPAddress = Union[IPv4Address, IPv6Address]
IPNetwork = Union[IPv4Network, IPv6Network]


@dataclass(frozen=True, eq=False)
class Family:
    """One IP family and the names flanneld gives its parts.

    IPV4 and IPV6 below are the only instances: they compare and hash by identity, which keeps the
    per-family dict look-ups made for every node as cheap as a plain object's.
    """

    name: str  # "IPv4", "IPv6"
    version: int  # 4, 6
    af: int  # socket.AF_INET, socket.AF_INET6
    bits: int  # address length in bits
    any_network: str  # the network a missing value stands for: "0.0.0.0/0", "::/0"
    multicast: str  # the multicast range the masquerade rules leave alone
    vxlan_device: str  # the VXLAN device's name, with %d for the VNI
    tunnel_overhead: int  # what the kernel takes off a VXLAN device's MTU over this family
    vxlan_local: str  # the VXLAN device's attribute holding its local (tunnel end) address
    iptables: str  # the iptables binary; -save and -restore are appended for the others
    data_annotation: str  # the annotation suffixes (after the prefix) of this family's lease
    public_ip_annotation: str
    public_ip_overwrite_annotation: str
    env_network: str  # the subnet.env keys
    env_subnet: str
    v6: str  # "" or "v6", as flanneld puts it in this family's log lines ("adding v6 subnet", "AddV6ARP")

    def network(self, text: str) -> IPNetwork:
        """A network of this family from its text (host bits masked); ValueError otherwise."""
        return (IPv4Network if self.version == 4 else IPv6Network)(text, strict=False)

    def address(self, text: str) -> IPAddress:
        """An address of this family from its text; ValueError otherwise."""
        return (IPv4Address if self.version == 4 else IPv6Address)(text)

    def __str__(self) -> str:
        return self.name


IPV4 = Family(
    name="IPv4", version=4, af=socket.AF_INET, bits=32, any_network="0.0.0.0/0", multicast="224.0.0.0/4",
    vxlan_device="flannel.%d", tunnel_overhead=50, vxlan_local="IFLA_VXLAN_LOCAL", iptables="iptables",
    data_annotation="backend-data", public_ip_annotation="public-ip",
    public_ip_overwrite_annotation="public-ip-overwrite",
    env_network="FLANNEL_NETWORK", env_subnet="FLANNEL_SUBNET", v6="",
)
IPV6 = Family(
    name="IPv6", version=6, af=socket.AF_INET6, bits=128, any_network="::/0", multicast="ff00::/8",
    vxlan_device="flannel-v6.%d", tunnel_overhead=70, vxlan_local="IFLA_VXLAN_LOCAL6", iptables="ip6tables",
    data_annotation="backend-v6-data", public_ip_annotation="public-ipv6",
    public_ip_overwrite_annotation="public-ipv6-overwrite",
    env_network="FLANNEL_IPV6_NETWORK", env_subnet="FLANNEL_IPV6_SUBNET", v6="v6",
)
FAMILIES = (IPV4, IPV6)  # flanneld's order: IPv4 first wherever both appear


def family_of(net: IPNetwork | IPAddress) -> Family:
    """The family of an address or network."""
    return IPV4 if net.version == 4 else IPV6
