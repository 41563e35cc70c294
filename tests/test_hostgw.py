"""The host-gw backend's routes, sync, reconcile and restore, against a fake kernel, for both families."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyflannel import ip
from pyflannel.backend.hostgw import LOG_EACH, BackendError, HostGWNetwork, nat_error
from pyflannel.family import IPV4, IPV6, Family
from pyflannel.lease import Lease
from pyflannel.daemon import DEVICE_RETRY
from pyflannel.netlink import Route
from tests.conftest import needs_netns
from tests.fakenetlink import FakeNetlink
from tools.netcluster import Cluster

RTPROT_BOOT = 3


@dataclass(frozen=True)
class Stack:
    """One family's addresses in the tests: node n has the pod subnet ``subnet % n`` and the public IP
    ``public % (0x10 + n)`` on eth1, whose subnet is ``l2``."""

    family: Family
    network: str
    subnet: str
    public: str
    l2: str
    elsewhere: str  # a public IP on another L2 network
    public_flag: str  # select()'s argument for --public-ip of this family

    def lease(self, n: int, public_ip: str = "", backend_type: str = "host-gw") -> Lease:
        return Lease(self.family.network(self.subnet % n), self.family.address(public_ip or self.ip(n)),
                     backend_type, "null")

    def ip(self, n: int) -> str:
        return self.public % (0x10 + n)

    def route(self, n: int) -> tuple[str, str]:
        """Node n's route as ``ip route`` shows it: (dst, gateway)."""
        return str(self.family.network(self.subnet % n)), self.ip(n)


V4 = Stack(IPV4, "10.244.0.0/16", "10.244.%d.0/24", "192.168.56.%d", "192.168.56.0/24", "10.9.9.9", "public_ip")
V6 = Stack(IPV6, "fd00:10:244::/56", "fd00:10:244:%x::/64", "fd56::%x", "fd56::/64", "fd99::9", "public_ipv6")
STACKS = [V4, V6]


def node(s: Stack, public_ip: str = "") -> tuple[FakeNetlink, HostGWNetwork]:
    """This node (node 1): eth1 with its public IP, and the backend (nothing programmed yet)."""
    nl = FakeNetlink()
    nl.ip_link_add("eth1")
    nl.ip_addr_add("eth1", "%s/%s" % (s.ip(1), s.l2.split("/")[1]))
    publics = {"public_ip": "", "public_ipv6": "", s.public_flag: public_ip}
    ext = ip.select(nl, ["eth1"], [], "", families=[s.family], **publics)  # the daemon's own look-up, on the fake
    return nl, HostGWNetwork(nl, s.family, ext, s.family.network(s.network))


def routes(nl: FakeNetlink) -> set[tuple[str, str | None]]:
    """The routes via eth1 with a gateway."""
    return nl.datapath("eth1")["routes"]


def leases(s: Stack, *nodes: int) -> dict[str, Lease]:
    return {"k8s%02d" % n: s.lease(n) for n in nodes}


@pytest.fixture(params=STACKS, ids=lambda s: str(s.family))
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def running(stack: Stack) -> tuple[FakeNetlink, HostGWNetwork]:
    """Node 1 after start-up: the routes to nodes 2 and 3."""
    nl, b = node(stack)
    b.reconcile(leases(stack, 2, 3))
    assert routes(nl) == {stack.route(2), stack.route(3)}
    nl.take_events()
    nl.take_writes()
    return nl, b


def test_a_route_per_node_via_its_public_ip_on_the_external_interface(stack: Stack) -> None:
    nl, b = node(stack)
    assert (b.backend_data(), b.mtu, b.device_ok) == ("null", 1500, True)
    assert b.reconcile(leases(stack, 2, 3)) == 0
    eth1 = nl.find("eth1")
    assert eth1 is not None
    assert sorted(nl.route_table.values(), key=lambda r: r.dst) == [
        Route(dst, gw, eth1.index, RTPROT_BOOT, 254) for dst, gw in sorted([stack.route(2), stack.route(3)])]
    assert set(b.applied) == {"k8s02", "k8s03"}


def test_a_restart_with_every_route_in_place_sends_nothing(running: tuple[FakeNetlink, HostGWNetwork],
                                                            stack: Stack) -> None:
    nl, _ = running
    b = HostGWNetwork(nl, stack.family, running[1].ext, running[1].network)
    assert b.reconcile(leases(stack, 2, 3)) == 0
    assert nl.take_writes() == []
    assert b.sync(leases(stack, 2, 3)) == set() and nl.take_writes() == []  # type: ignore[arg-type]


def test_nodes_added_and_removed(running: tuple[FakeNetlink, HostGWNetwork], stack: Stack,
                                 caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    with caplog.at_level(logging.INFO):
        assert b.sync({"k8s04": stack.lease(4), "k8s02": None}) == {"k8s02", "k8s04"}
    assert routes(nl) == {stack.route(3), stack.route(4)}
    dst, gw = stack.route(4)
    assert "Subnet added: %s via %s" % (dst, gw) in caplog.messages
    assert "Subnet removed: %s" % stack.route(2)[0] in caplog.messages


def test_a_new_public_ip_replaces_the_route(running: tuple[FakeNetlink, HostGWNetwork], stack: Stack) -> None:
    nl, b = running
    moved = stack.public % 0x20
    assert b.sync({"k8s02": stack.lease(2, public_ip=moved)}) == {"k8s02"}
    assert routes(nl) == {(stack.route(2)[0], moved), stack.route(3)}


def test_the_nat_check_refuses_a_public_ip_that_is_not_the_interface_address(stack: Stack) -> None:
    with pytest.raises(BackendError) as exc:
        node(stack, public_ip=stack.ip(9))
    assert str(exc.value) == nat_error(stack.family, None, stack.family.address(stack.ip(9)))
    if stack.family is IPV4:
        assert str(exc.value) == ("your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
                                  "which is not supported by host-gw backend")


def test_routes_of_nodes_deleted_while_down_are_removed(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = node(stack)
    b.reconcile(leases(stack, 2, 3, 4))
    eth1 = nl.find("eth1")
    assert eth1 is not None
    other = str(stack.family.network(stack.subnet % 7).supernet(new_prefix=8))  # outside the network: not ours
    nl.route_table[other] = Route(other, stack.ip(2), eth1.index, RTPROT_BOOT, 254)
    b = HostGWNetwork(nl, stack.family, b.ext, b.network)  # restarted: nodes 3 and 4 are gone
    with caplog.at_level(logging.INFO):
        assert b.reconcile(leases(stack, 2)) == 2
    assert routes(nl) == {stack.route(2), (other, stack.ip(2))}
    assert "Subnet removed: %s" % stack.route(3)[0] in caplog.messages
    nl.take_writes()
    assert b.reconcile(leases(stack, 2)) == 0 and nl.take_writes() == []


def test_a_hand_deleted_route_is_put_back_from_the_notification(running: tuple[FakeNetlink, HostGWNetwork],
                                                                stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    dst, gw = stack.route(2)
    nl.ip_route_del(dst)
    events = nl.take_events()
    with caplog.at_level(logging.INFO):
        assert b.restore(events) == 1
    assert routes(nl) == {stack.route(2), stack.route(3)}
    assert caplog.messages == ["Route recovered %s : %s" % (dst, gw)]
    nl.take_writes()
    assert b.restore(events) == 0  # a late copy of the notification: the exclusive create changes nothing
    assert routes(nl) == {stack.route(2), stack.route(3)}


def test_a_hand_changed_route_is_corrected(running: tuple[FakeNetlink, HostGWNetwork], stack: Stack,
                                           caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    dst, _ = stack.route(2)
    nl.ip_route_add(dst, stack.ip(9), "eth1")  # flanneld's check never corrects this one
    with caplog.at_level(logging.WARNING):
        assert b.reconcile(leases(stack, 2, 3)) == 1
    assert routes(nl) == {stack.route(2), stack.route(3)}
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith("Replacing existing route to")


def test_lost_notifications_compare_everything(running: tuple[FakeNetlink, HostGWNetwork], stack: Stack) -> None:
    nl, b = running
    del nl.route_table[stack.route(3)[0]]  # no notification
    assert b.restore([]) == 1
    assert routes(nl) == {stack.route(2), stack.route(3)}


def test_a_node_on_another_l2_network_is_an_error_naming_it_once(
        running: tuple[FakeNetlink, HostGWNetwork], stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    far = {**leases(stack, 2, 3), "k8s09": stack.lease(9, public_ip=stack.elsewhere)}
    with caplog.at_level(logging.INFO):
        b.sync({"k8s09": far["k8s09"]})
        b.reconcile(far)
        b.reconcile(far)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "k8s09" in errors[0] and stack.elsewhere in errors[0] and "not on the L2 network of eth1" in errors[0]
    assert errors[0].startswith("Error adding route to {Ifindex: ")
    assert nl.take_writes() == [] and "k8s09" not in b.applied
    b.sync({"k8s09": stack.lease(9)})  # its lease moves onto this network: programmed
    assert stack.route(9) in routes(nl)


def test_a_route_of_another_shape_is_replaced_with_flanneld_warning(stack: Stack,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    nl, b = node(stack)
    vxlan = nl.ip_link_add("flannel.1")
    dst, gw = stack.route(2)
    nl.route_table[dst] = Route(dst, dst.split("/")[0], vxlan.index, RTPROT_BOOT, 254)  # left by the vxlan backend
    with caplog.at_level(logging.WARNING):
        b.reconcile(leases(stack, 2))
    assert routes(nl) == {stack.route(2)}
    eth1 = nl.find("eth1")
    assert eth1 is not None
    assert caplog.messages == [
        "Replacing existing route to {Ifindex: %d Dst: %s Src: <nil> Gw: %s Flags: [] Table: 254 Realm: 0} with "
        "{Ifindex: %d Dst: %s Src: <nil> Gw: %s Flags: [] Table: 0 Realm: 0}"
        % (vxlan.index, dst, dst.split("/")[0], eth1.index, dst, gw)]
    # the same found by a node change rather than a reconcile
    dst3 = stack.route(3)[0]
    nl.route_table[dst3] = Route(dst3, dst3.split("/")[0], vxlan.index, RTPROT_BOOT, 254)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        b.sync({"k8s03": stack.lease(3)})
    assert routes(nl) == {stack.route(2), stack.route(3)}
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith("Replacing existing route to")


def test_a_lease_of_another_backend_is_ignored_with_one_warning(running: tuple[FakeNetlink, HostGWNetwork],
                                                                stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    other = {**leases(stack, 2, 3), "k8s05": stack.lease(5, backend_type="vxlan")}
    with caplog.at_level(logging.WARNING):
        b.reconcile(other)
        b.reconcile(other)
    assert caplog.messages == ["Ignoring non-host-gw subnet: type=vxlan (node k8s05, %s)" % stack.route(5)[0]]
    assert nl.take_writes() == []


def test_a_large_start_up_logs_one_info_line(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = node(stack)
    many = leases(stack, *range(2, 2 + 4 * LOG_EACH))
    with caplog.at_level(logging.INFO):
        b.reconcile(many)
    assert caplog.messages == ["Subnet added: the pod subnets of %d nodes (one line each at -v=1)" % len(many)]
    assert len(routes(nl)) == len(many)


def test_the_external_interface_going_down_and_coming_back(running: tuple[FakeNetlink, HostGWNetwork], stack: Stack,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    before = nl.addresses_of("eth1")
    nl.ip_link_set_down("eth1")
    with caplog.at_level(logging.INFO):
        assert b.restore(nl.take_events()) == 0
        b.restore([])
    assert not b.device_ok and routes(nl) == set()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["eth1 has no %s subnet (it is down, or its %s address was removed): the routes to the other "
                      "nodes' pods cannot be added" % (stack.family, stack.family)]
    assert b.sync({"k8s04": stack.lease(4)}) == set() and nl.take_writes() == []
    nl.ip_link_set_up("eth1")
    for addr in before:  # the kernel drops IPv6 addresses with the link: the node's network config adds them again
        if addr not in nl.addresses_of("eth1"):
            nl.ip_addr_add("eth1", addr)
    b.reconcile(leases(stack, 2, 3, 4))
    assert b.device_ok and routes(nl) == {stack.route(2), stack.route(3), stack.route(4)}


def test_the_external_interface_re_created_with_a_new_index_is_found_by_name(
        running: tuple[FakeNetlink, HostGWNetwork], stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A VLAN, bond or tailscale0 restarted: the kernel drops its routes; the routes follow the new link at its
    first news (it came up)."""
    nl, b = running
    before, old = nl.addresses_of("eth1"), b.ext.index
    nl.ip_link_del("eth1")
    assert b.restore(nl.take_events()) == 0 and not b.device_ok
    nl.ip_link_add("eth1")
    for addr in before:
        nl.ip_addr_add("eth1", addr)
    nl.ip_link_set_up("eth1")
    with caplog.at_level(logging.INFO):
        b.restore(nl.take_events())
    assert b.device_ok and b.ext.index == nl.link(name="eth1")["index"] != old
    assert routes(nl) == {stack.route(2), stack.route(3)}
    assert "External interface eth1 was re-created (index %d, was %d); the %s routes follow it" % (
        b.ext.index, old, stack.family) in caplog.text


# -- the daemon, in namespaces ---------------------------------------------------------------------


@pytest.mark.netns
@needs_netns
def test_the_routes_come_back_after_the_external_interface_was_down(tmp_path: Path) -> None:
    """Setting eth1 down takes the routes with it, and the kernel says nothing when it is up again: the
    daemon looks at it every DEVICE_RETRY seconds while it is unusable."""
    with Cluster(tmp_path, backend={"Type": "host-gw"}) as c:
        nodes = [c.add_node("k8s%02d" % i) for i in (1, 2, 3)]
        for n in nodes:
            c.start(n)
        for n in nodes:
            c.wait_ready(n)
        n1 = nodes[0]

        def show() -> str:
            return c.ns_run(n1.netns, "ip", "route", "show", "proto", "boot").stdout

        before = show()
        assert "10.244.2.0/24 via 192.168.56.12 dev eth1" in before
        c.ns_run(n1.netns, "ip", "link", "set", "eth1", "down")
        c.wait_for("the daemon to see eth1 down", lambda: "eth1 has no IPv4 subnet" in n1.log())
        c.ns_run(n1.netns, "ip", "link", "set", "eth1", "up")
        start = time.monotonic()
        c.wait_for("the routes back", lambda: show() == before, timeout=DEVICE_RETRY + 10, interval=0.1)
        print("routes back %.1fs after eth1 came up" % (time.monotonic() - start))
        assert "eth1 has an IPv4 subnet again (192.168.56.0/24)" in n1.log()


@pytest.mark.netns
@needs_netns
def test_the_daemon_refuses_a_public_ip_behind_nat_with_flanneld_error(tmp_path: Path) -> None:
    with Cluster(tmp_path, backend={"Type": "host-gw"}) as c:
        n1 = c.add_node("k8s01")
        c.start(n1, "--public-ip=203.0.113.7")
        assert n1.proc is not None
        assert n1.proc.wait(30) == 1
        assert ("Error fetching backend: your PublicIP differs from interface IP, meaning that probably you're on a "
                "NAT, which is not supported by host-gw backend") in n1.log()


def test_a_refused_route_is_logged_once_with_the_node(running: tuple[FakeNetlink, HostGWNetwork], stack: Stack,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    real = nl.batch
    mark = socket.inet_pton(stack.family.af, stack.ip(4))
    monkeypatch.setattr(nl, "batch", lambda reqs: [22 if mark in getattr(r, "body", b"") else c  # EINVAL
                                                  for r, c in zip(reqs, real(reqs))])
    for _ in range(3):
        b.reconcile(leases(stack, 2, 3, 4))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].endswith("invalid argument (node k8s04; tried again at each reconcile)"), \
        errors
