"""``--ip-blackhole-route``: this node's pod subnet of each enabled family routed to nowhere (flannel
v0.27.1, for setups like Canal whose CNI plugin routes each pod by itself, with no bridge route to
the whole subnet), so that traffic to an unused pod address of this node is dropped here rather than
sent out along the default route.

The route is ``blackhole <subnet> proto boot metric 1024`` in the main table. flannel v0.28.9's is
the same except that its IPv4 route has metric 0. 1024 is the metric IPv6 gives such a route anyway;
with it, a route of the node's bridge (cni0, metric 0; IPv6: 256) to the same subnet takes
precedence, whereas an IPv4 blackhole with metric 0 added before the bridge has its address comes
first and drops every packet for the node's pods. flannel v0.28.9's route, when found, is replaced.

The route is checked every ``--iptables-resync`` seconds (the period flanneld uses) and added again
when it is missing. When another route to the subnet with the same metric holds its place, that
is said once and the route is left alone; the blackhole route follows once it is gone.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

from . import metrics
from .family import Family, IPNetwork
from .netlink import CREATE, RTM_DELROUTE, RTM_NEWROUTE, RTN_BLACKHOLE, Netlink, route_request

log = logging.getLogger(__name__)

__all__ = ["METRIC", "BlackholeRoutes"]

METRIC = 1024
MAIN_TABLE = 254
RTPROT_BOOT = 3
RT_SCOPE_NOWHERE = 255


class BlackholeRoutes:
    """The blackhole route of each family's subnet (``{family: this node's subnet}``), kept by
    :meth:`run` in a thread of its own with a netlink socket of its own."""

    def __init__(self, subnets: dict[Family, IPNetwork], period: float, nl: Netlink | None = None) -> None:
        self.subnets = subnets
        self.period = period
        self.nl = nl
        self._in_place: set[Family] = set()  # the families whose route was there at the last look
        self._error: dict[Family, str] = {}  # the last failure of each family, said once

    def run(self, stop: threading.Event) -> None:
        """Check the routes now and then every ``period`` seconds, until ``stop`` is set."""
        if self.nl is None:
            self.nl = Netlink()
            self.nl.strict_dumps()  # the kernel then sends only the blackhole routes, not one route per node
        while not stop.is_set():
            self.check()
            stop.wait(self.period)

    def check(self) -> None:
        """Add each family's route where it is missing; replace one with another metric."""
        for family, subnet in self.subnets.items():
            self._check(family, subnet)

    def _check(self, family: Family, subnet: IPNetwork) -> None:
        assert self.nl is not None
        dst, length = str(subnet.network_address), subnet.prefixlen
        found = [r for r in self.nl.routes(MAIN_TABLE, family.af, RTN_BLACKHOLE) if r.dst == str(subnet)]
        for r in found:
            if r.metric != METRIC:
                # flannel v0.28.9's IPv4 route (metric 0), which would come before a route of the bridge
                self.nl.batch([route_request(RTM_DELROUTE, 0, dst, length, None, None, MAIN_TABLE, 0, RT_SCOPE_NOWHERE,
                                             RTN_BLACKHOLE, 0, r.metric)])
                log.info("Replacing the blackhole route to %s with metric %d by one with metric %d, after any route "
                         "of the node's bridge", subnet, r.metric, METRIC)
        if any(r.metric == METRIC for r in found):
            self._in_place.add(family)
            self._error.pop(family, None)
            return
        code = self.nl.batch([route_request(RTM_NEWROUTE, CREATE, dst, length, None, None, MAIN_TABLE, RTPROT_BOOT, 0,
                                            RTN_BLACKHOLE, 0, METRIC)])[0]
        if code == 0:
            if family in self._in_place:
                metrics.REPAIRS.inc()
                log.warning("The blackhole route to %s was deleted; added it again", subnet)
            else:
                log.info("Added the blackhole route to this node's pod subnet %s (metric %d)", subnet, METRIC)
            self._in_place.add(family)
            self._error.pop(family, None)
            return
        self._in_place.discard(family)
        error = os.strerror(code).lower()
        if code == errno.EEXIST:
            error += (": another route to %s with metric %d is in the main table; pyflannel leaves it there and adds "
                      "the blackhole route once it is gone" % (subnet, METRIC))
        if self._error.get(family) != error:
            log.error("Failed to setup blackhole route, %s", error)
            self._error[family] = error
