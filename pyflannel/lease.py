"""The lease: a node's pod subnet of one family and how to reach it (flannel's ``pkg/lease``).

A dual-stack node has two leases, one per family, of the same type.
"""

from __future__ import annotations

from dataclasses import dataclass

from .family import IPAddress, IPNetwork


@dataclass(frozen=True, slots=True)
class Lease:
    """A node's subnet, the public IP its tunnel ends at, and its backend's data (raw JSON), all of one family."""

    subnet: IPNetwork
    public_ip: IPAddress
    backend_type: str
    backend_data: str


class LeaseError(Exception):
    """A lease could not be acquired; the message is flanneld's."""


class LeaseRevoked(LeaseError):
    """Someone deleted this node's lease: the daemon stops, as flanneld does."""
