"""The host-gw backend: for every other node, a route to its pod subnet via its public IP on the
external interface (flannel's ``backend/hostgw`` and ``backend/route_network.go``).

One instance per IP family, with the VXLAN backend's methods. The routes are converged to the
leases the same way: a change programs that node's route, a route the kernel reports deleted is put
back at once (flanneld looks every 10 s), and a full reconcile (one route dump) removes the routes
of nodes deleted while the daemon was down and adds what is missing. There is no device. The
routes work only between nodes on one L2 network: a node whose public IP is not on the external
interface's subnet gets an error that names it, not a route the kernel refuses over and over.

Per-node lines are flanneld's (``Subnet added: <S> via <P>``, ``Subnet removed: <S>``, ``Route
recovered <S> : <P>``) at Info, as long as an event concerns at most :data:`LOG_EACH` nodes; a
larger one (start-up, a relist, a flush) is one Info line with the count, the per-node lines at
``-v=1``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .. import ip, metrics
from ..family import Family, IPAddress, IPNetwork
from ..ip import ExternalInterface
from ..lease import Lease
from ..log import V
from ..netlink import CREATE, REPLACE, RTM_DELROUTE, RTM_NEWROUTE, Deletion, Netlink, Packed, Route, route_request
from .vxlan import MAIN_TABLE, RT_SCOPE_NOWHERE, RTN_UNICAST, RTPROT_BOOT

log = logging.getLogger(__name__)

BACKEND_TYPE = "host-gw"
LOG_EACH = 5  # per-node lines of one event logged at Info; beyond this one summary line (the rest at V(1))
_INTERFACE_NEWS = ("link", "down", "addr")  # the notifications about a link, among netlink.deletions()


class BackendError(Exception):
    """The backend cannot run on this node; the message is flanneld's."""


@dataclass(frozen=True, slots=True)
class Entry:
    """The route to one node's pods: its subnet via its public IP."""

    dst: str  # "10.244.1.0/24", "fd00:10:244:1::/64"
    gw: str  # "192.168.56.12", "fd56::12"

    @property
    def public_ip(self) -> str:
        """The node's public IP: the route's gateway."""
        return self.gw


def route_text(dst: str, gw: str | None, oif: int, table: int = 0) -> str:
    """A route as flanneld's log lines print it (Go netlink's ``Route.String``); Table 0 for a route
    flannel builds, 254 for one read from the main table. (Route flags are not read back: ``[]``.)"""
    return "{Ifindex: %d Dst: %s Src: <nil> Gw: %s Flags: [] Table: %d Realm: 0}" % (oif, dst, gw or "<nil>", table)


def nat_error(family: Family, iface_addr: IPAddress | None, ext_addr: IPAddress | None) -> str:
    """flanneld's refusal when the advertised address is not the interface's, or ''."""
    if iface_addr == ext_addr:
        return ""
    return ("your PublicIP%s differs from interface IP%s, meaning that probably you're on a NAT, which is not "
            "supported by host-gw backend" % (family.v6, family.v6))


def l2_networks(routes: Iterable[Route], index: int, family: Family) -> list[IPNetwork]:
    """The subnets directly on link ``index``, from the main table (its routes without a gateway; not the
    link-local one): a host-gw route through that link needs its gateway inside one of them."""
    found = (family.network(r.dst) for r in routes if r.oif == index and r.gateway is None)
    return [net for net in found if not net.is_link_local]


def on_link(networks: Iterable[IPNetwork], address: IPAddress) -> bool:
    """Whether ``address`` lies in one of ``networks`` (the external interface's subnets)."""
    return any(address in net for net in networks)


class HostGWNetwork:
    """The routes of one IP family to the other nodes' pod subnets (``HostGWNetwork(nl, family, ext, network)``).

    Raises :class:`BackendError` with flanneld's NAT text when the public IP of ``family`` is not the
    external interface's own address.
    """

    def __init__(self, nl: Netlink, family: Family, ext: ExternalInterface, network: IPNetwork) -> None:
        self.nl = nl
        self.family = family
        self.ext = ext
        self.network = network
        addr = ext.addrs[family]
        error = nat_error(family, addr.iface_addr, addr.ext_addr)
        if error:
            raise BackendError(error)
        self.device_ok = True  # the external interface has a subnet of this family (routes can be added)
        self.applied: dict[str, Entry] = {}  # node name -> the route the kernel holds for it
        self._keys: dict[str, str] = {}  # each applied route's dst -> its node
        self._built: dict[str, tuple[Lease, Entry | None]] = {}  # node name -> its lease and the route it asks for
        self._l2: list[IPNetwork] = []  # the external interface's subnets, from the last route dump
        self._off_l2: set[str] = set()  # nodes whose current lease was reported not on the L2 network
        self._added: list[str] = []  # the "Subnet added" lines of the leases taken since the last log
        self._failing: dict[str, str] = {}  # node name -> the failure to add its route, logged once

    @property
    def mtu(self) -> int:
        """The pods' MTU: the external interface's."""
        return self.ext.mtu

    def backend_data(self) -> str:
        """The lease's backend data: host-gw has none, and flanneld writes ``null``."""
        return "null"

    # -- leases -> routes ---------------------------------------------------------------------------

    def _entry(self, name: str, lease: Lease | None) -> Entry | None:
        """The route a lease asks for, or None. Remembered per lease, so a lease is logged once (as
        flanneld's event, ``Subnet added``) and a reconcile decodes nothing again."""
        if lease is None:
            self._built.pop(name, None)
            self._off_l2.discard(name)
            self._failing.pop(name, None)
            return None
        built = self._built.get(name)
        if built is None or built[0] != lease:
            self._off_l2.discard(name)
            entry = None
            if lease.backend_type != BACKEND_TYPE:
                log.warning("Ignoring non-host-gw subnet: type=%s (node %s, %s)", lease.backend_type, name,
                            lease.subnet)
            else:
                entry = Entry(str(lease.subnet), str(lease.public_ip))
                self._added.append("Subnet added: %s via %s" % (entry.dst, entry.gw))
            built = self._built[name] = (lease, entry)
        return built[1]

    def _reachable(self, name: str, e: Entry) -> bool:
        """Whether the node's public IP is on the external interface's subnet; logs once per lease when not."""
        if on_link(self._l2, self.family.address(e.gw)):
            self._off_l2.discard(name)
            return True
        if name not in self._off_l2:
            self._off_l2.add(name)
            log.error("Error adding route to %s: node %s's public IP %s is not on the L2 network of %s (%s): "
                      "host-gw needs every node on one L2 network; use the vxlan backend (with DirectRouting for "
                      "the nodes that share one)", route_text(e.dst, e.gw, self.ext.index), name, e.gw, self.ext.name,
                      ", ".join(str(n) for n in self._l2) or "none")
        return False

    # -- the daemon's calls -------------------------------------------------------------------------

    def sync(self, leases: dict[str, Lease | None]) -> set[str]:
        """Converge the named nodes' routes to their leases (None: the node is gone).

        Returns the names whose route changed. A route that could not be added is left out of
        :attr:`applied`, so the next reconcile tries it again.
        """
        changes: dict[str, tuple[Entry | None, Entry | None]] = {}
        for name, lease in leases.items():
            new, old = self._entry(name, lease), self.applied.get(name)
            if new != old:
                changes[name] = (old, new)
        self._log_added()
        if not changes:
            return set()
        if not self._l2:  # no route dump yet, or the interface was unusable at the last one
            self._check()
            return set(changes) if self.device_ok else set()
        self._remove({name: old for name, (old, new) in changes.items()
                      if old is not None and (new is None or new.dst != old.dst)})
        for name in changes:
            self._forget(name)
        added = {name: new for name, (_, new) in changes.items() if new is not None and self._reachable(name, new)}
        own = {name for name, (old, new) in changes.items()
               if old is not None and new is not None and old.dst == new.dst}  # its route is replaced in place
        codes = self._program(added, replace=own)
        taken = {name: added[name] for name, code in codes.items() if code == errno.EEXIST}
        if taken:  # another route holds the subnet: look at it, as flanneld does
            self._resolve(taken, self._dump())
        return set(changes)

    def restore(self, deleted: list[Deletion]) -> int:
        """Put back at once the routes the kernel reports deleted that the leases still want. An empty
        list (notifications were lost) or news of the external interface means everything is compared.
        Returns how many routes were added again."""
        if not deleted or not self._l2 or any(kind in _INTERFACE_NEWS and where == self.ext.index
                                              for kind, where, _ in deleted):
            return self._check()
        lost: dict[str, Entry] = {}
        for kind, where, what in deleted:
            if kind == "route" and where == MAIN_TABLE:
                name = self._keys.get(what)
                if name is not None:
                    lost[name] = self.applied[name]
        codes = self._program(lost, missing_only=True)
        return self._recovered([lost[name] for name, code in codes.items() if code == 0])

    def reconcile(self, leases: dict[str, Lease]) -> int:
        """Converge the main table to ``leases`` with one route dump, sending only what changes something
        (a restart with every route in place sends nothing). Returns how many routes had drifted: strays
        removed (nodes deleted while the daemon was down) and routes that had gone missing."""
        metrics.RECONCILES.inc()
        for name in [n for n in self._built if n not in leases]:
            self._entry(name, None)
        for name, lease in leases.items():
            self._entry(name, lease)
        self._log_added()
        return self._check()

    # -- comparing with the kernel ----------------------------------------------------------------

    def _dump(self) -> dict[str, Route]:
        """The main table's routes via a gateway, by dst (the first of each, as flanneld looks at);
        refreshes the external interface's subnets and :attr:`device_ok` on the way."""
        routes = self.nl.routes(family=self.family.af)
        l2 = l2_networks(routes, self.ext.index, self.family)
        if not l2:  # the interface may have been re-created (a VLAN, bond or tailscale0 restarted): find it by name
            try:
                moved = ip.follow(self.nl, self.ext, self.family)
            except LookupError:
                moved = self.ext  # not yet: the error below says the interface is unusable
            if moved is not self.ext:
                log.info("External interface %s was re-created (index %d, was %d); the %s routes follow it",
                         moved.name, moved.index, self.ext.index, self.family)
                self.ext = moved
                l2 = l2_networks(routes, moved.index, self.family)
        found: dict[str, Route] = {}
        for r in routes:
            if r.gateway is not None:
                found.setdefault(r.dst, r)
        ok = bool(l2)
        if ok != self.device_ok:
            if ok:
                log.info("%s has an %s subnet again (%s): adding the routes to the other nodes' pods",
                         self.ext.name, self.family, ", ".join(str(n) for n in l2))
            else:
                log.error("%s has no %s subnet (it is down, or its %s address was removed): the routes to the "
                          "other nodes' pods cannot be added", self.ext.name, self.family, self.family)
        self._l2 = l2
        self.device_ok = ok
        return found

    def _check(self) -> int:
        """Dump the main table and converge every route; how many had drifted."""
        have = self._dump()
        if not self.device_ok:
            self.applied.clear()
            self._keys.clear()
            return 0
        desired = {name: e for name, (_, e) in self._built.items() if e is not None}
        wanted = {e.dst for e in desired.values()}
        strays = {dst: r for dst, r in have.items() if dst not in wanted and self._ours(r)}
        self._send([("Error deleting route to %s" % dst, _route(RTM_DELROUTE, dst, r.gateway, r.oif))
                    for dst, r in strays.items()])
        self._announce(["Subnet removed: %s" % dst for dst in strays],
                       "Subnet removed: the pod subnets of %d nodes that are gone" % len(strays))
        missing: dict[str, Entry] = {}
        other: dict[str, Entry] = {}
        lost: set[str] = set()  # programmed once, and gone or changed since
        for name, e in desired.items():
            r = have.get(e.dst)
            if r is not None and (r.gateway, r.oif) == (e.gw, self.ext.index):
                self._remember(name, e)
                continue
            if self.applied.get(name) == e:
                lost.add(name)
            self._forget(name)
            if self._reachable(name, e):
                (missing if r is None else other)[name] = e
        for name in [n for n in self.applied if n not in desired]:
            self._forget(name)
        codes = self._program(missing)
        recovered = self._recovered([e for name, e in missing.items() if name in lost and codes[name] == 0])
        self._resolve(other, have)
        changed = len(lost.intersection(other))  # programmed once, and changed by hand since
        if strays or changed:
            metrics.REPAIRS.inc(len(strays) + changed)
        return len(strays) + recovered + changed

    def _ours(self, r: Route) -> bool:
        """Whether a listed route is one host-gw programs: via a gateway on the external interface,
        protocol boot, to a subnet of the network."""
        if r.oif != self.ext.index or r.proto != RTPROT_BOOT:
            return False
        dst = self.family.network(r.dst)
        prefix = self.network.prefixlen
        return dst.prefixlen > prefix and dst.supernet(new_prefix=prefix) == self.network

    def _resolve(self, entries: dict[str, Entry], have: dict[str, Route]) -> None:
        """Replace the routes of another shape that hold the subnets of ``entries`` (left by the vxlan
        backend, say), with flanneld's warning; a route found equal is taken as it is."""
        replace: dict[str, Entry] = {}
        lines = []
        for name, e in entries.items():
            r = have.get(e.dst)
            if r is not None and (r.gateway, r.oif) == (e.gw, self.ext.index):
                log.log(V(1), "Route to %s already exists, skipping.", route_text(e.dst, e.gw, self.ext.index))
                self._remember(name, e)
                continue
            if r is not None:
                lines.append("Replacing existing route to %s with %s" % (
                    route_text(r.dst, r.gateway, r.oif, r.table), route_text(e.dst, e.gw, self.ext.index)))
            replace[name] = e
        self._announce(lines, "Replacing existing routes of another shape to %d subnets" % len(lines), logging.WARNING)
        self._program(replace, replace=replace)

    # -- requests -------------------------------------------------------------------------------------

    def _program(self, entries: dict[str, Entry], missing_only: bool = False,
                 replace: Collection[str] = ()) -> dict[str, int]:
        """Add routes in one batch and record those in place in :attr:`applied`. A route is created
        only where its subnet has none (EEXIST otherwise), except for the names in ``replace``, whose
        route replaces the one there. With ``missing_only`` a route found in place counts as added.
        Returns each name's errno (0: added)."""
        work = [("Error adding route to %s" % route_text(e.dst, e.gw, self.ext.index),
                 _route(RTM_NEWROUTE, e.dst, e.gw, self.ext.index, REPLACE if name in replace else CREATE))
                for name, e in entries.items()]
        codes = dict(zip(entries, self._send(work, quiet_exists=True, owners=list(entries))))
        for name, code in codes.items():
            self._forget(name)
            if code == 0 or (missing_only and code == errno.EEXIST):
                self._remember(name, entries[name])
                self._failing.pop(name, None)
        return codes

    def _remove(self, entries: dict[str, Entry]) -> None:
        """Delete the routes of nodes that are gone or moved to another subnet."""
        self._send([("Error deleting route to %s" % e.dst, _route(RTM_DELROUTE, e.dst, e.gw, self.ext.index))
                    for e in entries.values()])
        self._announce(["Subnet removed: %s" % e.dst for e in entries.values()],
                       "Subnet removed: the pod subnets of %d nodes" % len(entries))

    def _send(self, work: list[tuple[str, Packed]], quiet_exists: bool = False,
              owners: list[str] | None = None) -> list[int]:
        """Send requests in one batch and log failures; each one's errno (0: done; a route already gone
        counts as deleted; EEXIST is not logged with ``quiet_exists``). With ``owners`` (each request's
        node) a failure names the node and is logged once until it changes: every reconcile tries again."""
        if not work:
            return []
        out = []
        for i, ((what, req), code) in enumerate(zip(work, self.nl.batch([req for _, req in work]))):
            if req.msg_type == RTM_DELROUTE and code in (errno.ESRCH, errno.ENOENT):
                code = 0
            elif code and not (quiet_exists and code == errno.EEXIST):
                metrics.NETLINK_ERRORS.inc()
                error = "%s: %s" % (what, os.strerror(code).lower())
                if owners is None:
                    log.error("%s", error)
                elif self._failing.get(owners[i]) != error:
                    log.error("%s (node %s; tried again at each reconcile)", error, owners[i])
                    self._failing[owners[i]] = error
            out.append(code)
        return out

    def _recovered(self, entries: list[Entry]) -> int:
        """Count and log the routes put back; how many."""
        if entries:
            metrics.REPAIRS.inc(len(entries))
            self._announce(["Route recovered %s : %s" % (e.dst, e.gw) for e in entries],
                           "Route recovered: the routes to the pod subnets of %d nodes" % len(entries))
        return len(entries)

    def _log_added(self) -> None:
        """Log the ``Subnet added`` lines of the leases taken since the last call."""
        lines, self._added = self._added, []
        self._announce(lines, "Subnet added: the pod subnets of %d nodes" % len(lines))

    def _announce(self, lines: list[str], summary: str, level: int = logging.INFO) -> None:
        """Log one event's per-node lines: each at ``level`` when they are few, else the summary at
        ``level`` (with a pointer to ``-v=1``) and each at V(1)."""
        if len(lines) > LOG_EACH:
            log.log(level, "%s (one line each at -v=1)", summary)
            level = V(1)
        for line in lines:
            log.log(level, "%s", line)

    def _remember(self, name: str, e: Entry) -> None:
        self.applied[name] = e
        self._keys[e.dst] = name

    def _forget(self, name: str) -> None:
        e = self.applied.pop(name, None)
        if e is not None and self._keys.get(e.dst) == name:
            del self._keys[e.dst]


def _route(msg_type: int, dst: str, gw: str | None, oif: int, flags: int = 0) -> Packed:
    """A main-table route to ``dst`` via ``gw`` through ``oif``: a new one with protocol boot and
    universe scope, as flanneld's; a deletion matches any protocol and scope."""
    address, _, length = dst.partition("/")
    if msg_type == RTM_NEWROUTE:
        return route_request(msg_type, flags, address, int(length), gw, oif, MAIN_TABLE, RTPROT_BOOT, 0,
                             RTN_UNICAST, 0)
    return route_request(msg_type, 0, address, int(length), gw, oif, MAIN_TABLE, 0, RT_SCOPE_NOWHERE, 0, 0)
