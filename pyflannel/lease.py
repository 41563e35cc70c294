"""The lease: a node's pod subnet and how to reach it (flannel's ``pkg/lease``)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network


@dataclass(frozen=True, slots=True)
class Lease:
    """A node's subnet, the public IP its tunnel ends at, and its backend's data (raw JSON)."""

    subnet: IPv4Network
    public_ip: IPv4Address
    backend_type: str
    backend_data: str


class LeaseError(Exception):
    """A lease could not be acquired; the message is flanneld's."""


class LeaseRevoked(LeaseError):
    """Someone deleted this node's lease: the daemon stops, as flanneld does."""
