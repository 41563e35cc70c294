"""Subnet managers: where the leases live (flannel's ``pkg/subnet``).

``kube.KubeSubnetManager`` keeps them in the Kubernetes node objects, ``etcd.EtcdSubnetManager``
in etcd. The daemon's start-up and its reconcile loop use only what ``SubnetManager`` lists, so
both modes share one backend and one loop. Leases are per family: a manager answers for the
families of its config (etcd mode: IPv4 only) and has no leases of the others.
"""

from __future__ import annotations

import threading
from typing import Protocol

from ..family import Family, IPAddress
from ..lease import Lease
from .nodenet import NodeNetwork


class SubnetManager(Protocol):
    """What the daemon needs of a subnet manager.

    ``node_name`` is the name under which changes of this node's own lease are reported to the
    daemon's ``on_change`` (the node's name; in etcd mode the lease's key once acquired).
    ``progress`` is the ``time.monotonic()`` of the watch's last sign of progress; it advances at
    least every ``kube.PROGRESS_BOUND`` seconds while the watch works or retries.
    """

    node_name: str
    progress: float
    synced: threading.Event  # set once the first list of the leases is in

    @property
    def name(self) -> str:
        """flanneld's ``Created subnet manager: <name>``."""

    def run(self, stop: threading.Event) -> None:
        """List and watch the leases until ``stop`` is set (a worker of its own)."""

    def wait_synced(self, stop: threading.Event, timeout: float) -> None:
        """Block until the first list of leases is in; raises LeaseError after ``timeout`` seconds."""

    def acquire_lease(self, public_ips: dict[Family, IPAddress], backend_type: str,
                      backend_data: dict[Family, str]) -> dict[Family, Lease]:
        """This node's lease of every enabled family, published with each family's public IP and
        backend data; idempotent. Raises LeaseError (LeaseRevoked once the lease was deleted)."""

    def set_node_network(self, networks: dict[Family, NodeNetwork]) -> None:
        """This node's network of each enabled family (known once the external interface is): from now on
        no lease may point into it, and the leases that do are taken away (reported as changes)."""

    def leases(self, family: Family) -> dict[str, Lease]:
        """The other nodes' valid leases of ``family``, by name."""

    def lease_of(self, name: str, family: Family) -> Lease | None:
        """One other node's valid lease of ``family``."""

    def published_data(self, family: Family, public_ip: IPAddress) -> str:
        """The backend data this node published for ``family`` before ('' if none): a re-created VXLAN
        device keeps the VtepMAC in it (kube: the node's annotation; etcd: the lease carrying ``public_ip``)."""

    def complete_lease(self) -> None:
        """What follows a programmed datapath (kube: the NetworkUnavailable condition)."""
