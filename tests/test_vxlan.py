"""The VXLAN backend's devices, sync, reconcile and restore, for both IP families, against a fake kernel
(no root needed)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from pyflannel.backend.vxlan import (PROGRAM_NODES, VXLANLink, VXLANNetwork, backend_data, device_attributes,
                                     device_name, incompatibility, read_link)
from pyflannel.config import VXLANConfig
from pyflannel.family import IPV4, IPV6, Family, IPNetwork
from pyflannel import ip
from pyflannel.ip import ExtAddr, ExternalInterface
from pyflannel.lease import Lease
from pyflannel.log import V
from tests.conftest import needs_netns
from tests.fakenetlink import FakeNetlink

MAC = "0a:00:00:00:00:01"  # the MAC this node advertises
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stack:
    """One family's addresses in these tests: node n has the n-th subnet and public IP (the spec's worked
    example: 10.244.<n>.0/24 at 192.168.56.<10+n>, fd00:10:244:<n>::/64 at fd56::<10+n>)."""

    family: Family
    network: IPNetwork
    subnet_fmt: str
    public_fmt: str
    device: str
    address: str  # this node's (node 1's) device address

    def subnet(self, n: int) -> str:
        return self.subnet_fmt % n

    def gw(self, n: int) -> str:
        return self.subnet(n).split("/")[0]

    def public(self, n: int) -> str:
        return self.public_fmt % (10 + n)

    @property
    def own(self) -> IPNetwork:
        return self.family.network(self.subnet(1))

    def lease(self, n: int, mac: str = "", public_ip: str = "") -> Lease:
        return Lease(self.family.network(self.subnet(n)), self.family.address(public_ip or self.public(n)), "vxlan",
                     backend_data(1, mac or "0a:00:00:00:00:%02x" % n))

    def leases(self, *nodes: int) -> dict[str, Lease]:
        return {"k8s%02d" % n: self.lease(n) for n in nodes}

    def expected(self, *nodes: int) -> dict[str, set[tuple[str, str | None]]]:
        """The device's routes, neighbours and FDB entries for these nodes' default leases."""
        return {"routes": {(self.subnet(n), self.gw(n)) for n in nodes},
                "neigh": {(self.gw(n), "0a:00:00:00:00:%02x" % n) for n in nodes},
                "fdb": {("0a:00:00:00:00:%02x" % n, self.public(n)) for n in nodes}}


V4 = Stack(IPV4, IPV4.network("10.244.0.0/16"), "10.244.%d.0/24", "192.168.56.%d", "flannel.1", "10.244.1.0/32")
V6 = Stack(IPV6, IPV6.network("fd00:10:244::/56"), "fd00:10:244:%x::/64", "fd56::%d", "flannel-v6.1",
           "fd00:10:244:1::/128")
STACKS = [pytest.param(V4, id="ipv4"), pytest.param(V6, id="ipv6")]
# The IPv4 tests' names, kept short
NETWORK, OWN, lease, expected = V4.network, V4.own, V4.lease, V4.expected


def external(nl: FakeNetlink) -> ExternalInterface:
    """eth1 with both families' addresses, as the daemon's own look-up finds it."""
    eth1 = nl.find("eth1")
    assert eth1 is not None
    ext = ip.select(nl, ["eth1"], [], "", "", "", (IPV4, IPV6))
    v4, v6 = IPv4Address("192.168.56.11"), IPv6Address("fd56::11")
    assert ext == ExternalInterface("eth1", eth1.index, 1500, {IPV4: ExtAddr(v4, v4), IPV6: ExtAddr(v6, v6)})
    return ext


def node(cfg: VXLANConfig | None = None, stack: Stack = V4) -> tuple[FakeNetlink, VXLANNetwork]:
    """A node with eth1 at 192.168.56.11/24 and fd56::11/64, and a network that has not made its device yet."""
    nl = FakeNetlink()
    nl.ip_link_add("eth1")
    nl.ip_addr_add("eth1", "192.168.56.11/24")
    nl.ip_addr_add("eth1", "fd56::11/64")
    return nl, VXLANNetwork(nl, cfg or VXLANConfig(), stack.family, external(nl), stack.network)


def start(stack: Stack, cfg: VXLANConfig | None = None) -> tuple[FakeNetlink, VXLANNetwork]:
    """A node as the daemon leaves it after start-up: device, address, and nodes 2 and 3 programmed."""
    nl, b = node(cfg, stack)
    b.create_device(MAC)
    b.configure_device(stack.own)
    b.reconcile(stack.leases(1, 2, 3))
    assert nl.datapath(stack.device) == stack.expected(2, 3)
    nl.take_events()
    nl.take_writes()
    return nl, b


@pytest.fixture(params=STACKS)
def stack(request: Any) -> Stack:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def running(stack: Stack) -> tuple[FakeNetlink, VXLANNetwork]:
    return start(stack)


def device_state(nl: FakeNetlink, stack: Stack = V4) -> tuple[str, bool, list[str], int]:
    link = nl.find(stack.device)
    assert link is not None
    return link.mac, link.up, nl.addresses_of(stack.device), link.txqlen


# -- the device ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stack, local, mtu", [pytest.param(V4, ("IFLA_VXLAN_LOCAL", "192.168.56.11"), 1450, id="ipv4"),
                                               pytest.param(V6, ("IFLA_VXLAN_LOCAL6", "fd56::11"), 1430, id="ipv6")])
def test_a_new_device_has_flanneld_attributes_and_the_advertised_mac(stack: Stack, local: tuple[str, str],
                                                                     mtu: int) -> None:
    nl, b = node(stack=stack)
    dev = b.create_device(MAC)
    link = nl.find(stack.device)
    assert link is not None and dev.index == link.index and dev.mac == MAC
    assert (link.kind, link.mac, link.up, link.txqlen, link.mtu) == ("vxlan", MAC, False, 0, mtu)
    assert link.data == {**dict(device_attributes(VXLANConfig(), b.ext, stack.family)), "IFLA_VXLAN_PORT": 8472}
    assert link.data[local[0]] == local[1] and "IFLA_VXLAN_GBP" not in link.data
    assert not {"IFLA_VXLAN_LOCAL", "IFLA_VXLAN_LOCAL6"} - {local[0]} & set(link.data)
    assert nl.sysctls == {"net/ipv6/conf/%s/accept_ra" % stack.device: "0"}
    assert not b.device_ok
    b.configure_device(stack.own)
    assert device_state(nl, stack) == (MAC, True, [stack.address], 0) and b.device_ok
    assert b.mtu == 1450 and b.device_mtu == mtu  # FLANNEL_MTU is ext - 50 in every family, as flanneld's (§6.7)
    assert b.backend_data() == '{"VNI":1,"VtepMAC":"%s"}' % MAC


def test_both_families_have_their_own_device_and_mac() -> None:
    nl, b4 = node(stack=V4)
    b6 = VXLANNetwork(nl, VXLANConfig(), IPV6, b4.ext, V6.network)
    b4.create_device(MAC)
    b6.create_device()
    b4.configure_device(V4.own)
    b6.configure_device(V6.own)
    assert b6.device is not None and b6.device.mac != MAC
    assert device_state(nl, V6) == (b6.device.mac, True, [V6.address], 0)
    assert device_state(nl, V4) == (MAC, True, [V4.address], 0)
    b4.reconcile(V4.leases(2))
    b6.reconcile(V6.leases(2))
    assert nl.datapath("flannel.1") == V4.expected(2) and nl.datapath("flannel-v6.1") == V6.expected(2)
    # Each compares only its own family: nothing to do for either.
    nl.take_writes()
    assert b4.reconcile(V4.leases(2)) == 0 and b6.reconcile(V6.leases(2)) == 0
    assert nl.take_writes() == []


def test_the_mtu_key_is_clamped_by_the_kernel_per_family() -> None:
    nl, b4 = node(VXLANConfig(mtu=1400), V4)
    b6 = VXLANNetwork(nl, VXLANConfig(mtu=1400), IPV6, b4.ext, V6.network)
    assert (b4.mtu, b4.device_mtu, b6.mtu, b6.device_mtu) == (1350, 1350, 1350, 1350)
    b6.create_device()
    assert nl.find("flannel-v6.1").mtu == 1350  # type: ignore[union-attr]
    _, b6 = node(VXLANConfig(mtu=9000), V6)
    assert (b6.mtu, b6.device_mtu) == (1450, 1430)


def test_the_v6_address_is_the_only_one_in_the_network_and_link_local_ones_stay() -> None:
    nl, b = node(stack=V6)
    b.create_device(MAC)
    nl.ip_addr_add("flannel-v6.1", "fe80::801:ff:fe00:1/64")
    nl.ip_addr_add("flannel-v6.1", "fd00:10:244:7::/128")  # a stale address of this network
    nl.ip_addr_add("flannel-v6.1", "fd99::1/64")  # someone else's, outside the network
    b.configure_device(V6.own)
    assert nl.addresses_of("flannel-v6.1") == [V6.address, "fd99::1/64", "fe80::801:ff:fe00:1/64"]


@pytest.mark.parametrize("stack", STACKS)
def test_a_compatible_device_is_kept_with_its_mac(stack: Stack) -> None:
    nl, b = node(stack=stack)
    local = dict(device_attributes(VXLANConfig(), b.ext, stack.family))[stack.family.vxlan_local]
    nl.ip_link_add(stack.device, kind="vxlan", mac="0a:00:00:00:00:99", up=False,
                   data={"IFLA_VXLAN_ID": 1, "IFLA_VXLAN_LINK": b.ext.index, stack.family.vxlan_local: local,
                         "IFLA_VXLAN_PORT": 8472})
    nl.take_writes()
    assert b.create_device(MAC).mac == "0a:00:00:00:00:99"
    assert nl.take_writes() == []


@pytest.mark.parametrize("stack", STACKS)
def test_a_device_whose_local_end_is_the_local_public_ip_is_kept(stack: Stack) -> None:
    """flanneld v0.27.4+ makes the public IP the local end: with --public-ip set to another address of this
    node, its device is taken as it is; new devices get the interface's address. A public IP that is not
    local (NAT) never is a local end."""
    nl, b = node(stack=stack)
    public = stack.family.address("192.168.56.99" if stack.family is IPV4 else "fd56::99")
    nl.ip_link_add("eth2")  # the public IP is an address of this node, on another interface
    nl.ip_addr_add("eth2", "%s/%d" % (public, 24 if stack.family is IPV4 else 64))
    b.ext = ip.select(nl, ["eth1"], [], "", *((str(public), "") if stack.family is IPV4 else ("", str(public))),
                      families=(stack.family,))
    assert b.ext.addrs[stack.family].ext_addr == public and b.ext.addrs[stack.family].ext_local
    nl.ip_link_add(stack.device, kind="vxlan", mac="0a:00:00:00:00:99", up=False,
                   data={"IFLA_VXLAN_ID": 1, "IFLA_VXLAN_LINK": b.ext.index, stack.family.vxlan_local: str(public),
                         "IFLA_VXLAN_PORT": 8472})
    nl.take_writes()
    assert b.create_device(MAC).mac == "0a:00:00:00:00:99"
    assert nl.take_writes() == []
    nat = dataclasses.replace(b.ext.addrs[stack.family], ext_local=False)
    b.ext = dataclasses.replace(b.ext, addrs={stack.family: nat})
    assert incompatibility(read_link(nl.link(name=stack.device)), VXLANConfig(), b.ext, stack.family) == \
        "vtep (external) IP: %s vs %s" % (public, nat.iface_addr)


@pytest.mark.parametrize("stack", STACKS)
def test_an_incompatible_device_is_replaced(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = node(stack=stack)
    old = nl.ip_link_add(stack.device, kind="vxlan", up=False, data={"IFLA_VXLAN_ID": 2, "IFLA_VXLAN_PORT": 8472})
    with caplog.at_level(logging.WARNING):
        dev = b.create_device(MAC)
    assert ('"%s" already exists with incompatible configuration: vni: 2 vs 1; recreating device' % stack.device
            in caplog.text)
    assert dev.index != old.index and dev.mac == MAC


def test_incompatibility_reasons_are_flanneld_s() -> None:
    _, b = node()
    cfg, ext = VXLANConfig(), b.ext
    good = {"IFLA_VXLAN_ID": 1, "IFLA_VXLAN_LINK": ext.index, "IFLA_VXLAN_LOCAL": "192.168.56.11", "IFLA_VXLAN_PORT": 8472}

    def reason(kind: str = "vxlan", **changes: object) -> str:
        return incompatibility(VXLANLink("flannel.1", 5, MAC, True, 1450, kind, {**good, **changes}), cfg, ext)

    assert reason() == ""
    assert reason(IFLA_VXLAN_LEARNING=1) == ""  # learning, like the MAC and MTU, is not compared
    assert reason("bridge") == "link type: bridge vs vxlan"
    assert reason(IFLA_VXLAN_ID=2) == "vni: 2 vs 1"
    assert reason(IFLA_VXLAN_LINK=9) == "vtep (external) interface: 9 vs %d" % ext.index
    assert reason(IFLA_VXLAN_LOCAL="192.168.56.99") == "vtep (external) IP: 192.168.56.99 vs 192.168.56.11"
    assert reason(IFLA_VXLAN_GROUP="239.1.1.1") == "vtep group: 239.1.1.1 vs <nil>"
    assert reason(IFLA_VXLAN_L2MISS=1) == "l2miss: true vs false"
    assert reason(IFLA_VXLAN_GBP=True) == "gbp: true vs false"
    assert incompatibility(VXLANLink("flannel.1", 5, MAC, True, 1450, "vxlan", good), VXLANConfig(port=4789), ext) \
        == "port: 8472 vs 4789"
    v6 = {"IFLA_VXLAN_ID": 1, "IFLA_VXLAN_LINK": ext.index, "IFLA_VXLAN_LOCAL6": "fd56::99"}
    assert incompatibility(VXLANLink("flannel-v6.1", 5, MAC, True, 1430, "vxlan", v6), cfg, ext, IPV6) \
        == "vtep (external) IP: fd56::99 vs fd56::11"
    assert device_name(4096) == "flannel.4096" and device_name(4096, IPV6) == "flannel-v6.4096"


def test_read_link_gives_what_diagnose_shows(running: tuple[FakeNetlink, VXLANNetwork], stack: Stack) -> None:
    nl, b = running
    found = read_link(nl.link(name=stack.device))
    assert (found.name, found.mac, found.up, found.mtu, found.kind, found.port) == (
        stack.device, MAC, True, b.device_mtu, "vxlan", 8472)
    eth1 = read_link(nl.link(name="eth1"))
    assert (eth1.kind, eth1.up, eth1.port) == ("veth", True, 8472)


# -- sync and reconcile ---------------------------------------------------------------------------


def test_sync_programs_changes_and_removals(running: tuple[FakeNetlink, VXLANNetwork], stack: Stack) -> None:
    nl, b = running
    assert b.sync({"k8s04": stack.lease(4), "k8s03": None}) == {"k8s03", "k8s04"}
    assert nl.datapath(stack.device) == stack.expected(2, 4)
    # A new VtepMAC replaces the neighbour and the FDB entry; the route stays.
    assert b.sync({"k8s02": stack.lease(2, mac="0a:00:00:00:02:22")}) == {"k8s02"}
    dp = nl.datapath(stack.device)
    assert (stack.gw(2), "0a:00:00:00:02:22") in dp["neigh"] and ("0a:00:00:00:02:22", stack.public(2)) in dp["fdb"]
    assert ("0a:00:00:00:00:02", stack.public(2)) not in dp["fdb"]
    nl.take_writes()
    assert b.sync({"k8s02": stack.lease(2, mac="0a:00:00:00:02:22")}) == set()
    assert nl.take_writes() == []


def test_more_nodes_than_a_batch_are_all_programmed_and_recorded() -> None:
    """Entries go out PROGRAM_NODES nodes at a time; every node's are in the kernel and in :attr:`applied`."""
    nl, b = node()
    b.create_device(MAC)
    b.configure_device(OWN)
    count = 2 * PROGRAM_NODES + 1
    subnets = [IPV4.network("%s/28" % IPv4Address(int(IPv4Address("10.244.2.0")) + 16 * i)) for i in range(count)]
    leases = {"n%d" % i: Lease(s, IPv4Address(int(IPv4Address("192.168.100.1")) + i), "vxlan",
                               backend_data(1, "0a:00:01:00:%02x:%02x" % (i >> 8, i & 255)))
              for i, s in enumerate(subnets)}
    assert b.reconcile(leases) == 0
    dp = nl.datapath("flannel.1")
    assert (len(dp["routes"]), len(dp["neigh"]), len(dp["fdb"])) == (count, count, count)
    assert set(b.applied) == set(leases)
    nl.take_writes()
    assert b.reconcile(leases) == 0
    assert nl.take_writes() == []


def test_reconcile_sends_nothing_when_all_is_in_place(running: tuple[FakeNetlink, VXLANNetwork], stack: Stack) -> None:
    nl, b = running
    assert b.reconcile(stack.leases(1, 2, 3)) == 0
    assert nl.take_writes() == []


def test_reconcile_removes_strays_and_puts_back_what_is_missing(running: tuple[FakeNetlink, VXLANNetwork],
                                                                stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    nl.ip_route_del(stack.subnet(2))
    b.sync({"k8s09": stack.lease(9)})
    with caplog.at_level(logging.INFO):
        assert b.reconcile(stack.leases(1, 2, 3)) == 4  # 3 strays, 1 missing
    assert nl.datapath(stack.device) == stack.expected(2, 3)
    assert caplog.text.count("Reconcile repaired 4 kernel entries on %s" % stack.device) == 1


def test_restore_puts_back_entries_deleted_by_hand(running: tuple[FakeNetlink, VXLANNetwork], stack: Stack) -> None:
    nl, b = running
    nl.ip_route_del(stack.subnet(2))
    nl.ip_neigh_del(stack.gw(3), stack.device)
    nl.bridge_fdb_del("0a:00:00:00:00:03", stack.device)
    assert b.restore(nl.take_events()) == 2
    assert nl.datapath(stack.device) == stack.expected(2, 3)


def test_a_deletion_reported_after_a_comparison_put_it_back_changes_nothing(
        running: tuple[FakeNetlink, VXLANNetwork], stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    nl.ip_neigh_del(stack.gw(2), stack.device)
    late = nl.take_events()
    assert b.reconcile(stack.leases(2, 3)) == 1
    nl.take_writes()
    with caplog.at_level(logging.INFO):
        assert b.restore(late) == 0
    assert "Restored" not in caplog.text
    assert nl.datapath(stack.device) == stack.expected(2, 3)


def test_restore_of_lost_notifications_compares_everything(running: tuple[FakeNetlink, VXLANNetwork],
                                                           stack: Stack) -> None:
    nl, b = running
    nl.ip_route_del(stack.subnet(2))
    nl.take_events()  # lost: the Monitor reports []
    assert b.restore([]) == 1
    assert nl.datapath(stack.device) == stack.expected(2, 3)


def test_the_other_family_s_deletions_change_nothing() -> None:
    nl, b4 = start(V4)
    b6 = VXLANNetwork(nl, VXLANConfig(), IPV6, b4.ext, V6.network)
    b6.create_device(MAC)
    b6.configure_device(V6.own)
    b6.reconcile(V6.leases(2, 3))
    nl.take_events()
    nl.ip_route_del(V6.subnet(2))
    nl.ip_neigh_del(V6.gw(3), "flannel-v6.1")
    events = nl.take_events()
    nl.take_writes()
    assert b4.restore(events) == 0 and nl.take_writes() == []
    assert b6.restore(events) == 2 and nl.datapath("flannel-v6.1") == V6.expected(2, 3)


def test_v6_log_texts_are_flanneld_s(caplog: pytest.LogCaptureFixture) -> None:
    nl, b = start(V6)
    with caplog.at_level(V(2)):
        b.sync({"k8s04": V6.lease(4), "k8s03": None})
        b.sync({"k8s05": Lease(IPV6.network("fd00:10:244:5::/64"), IPv6Address("fd56::15"), "host-gw", "null")})
        b.sync({"k8s06": V6.lease(6, mac="zz")})
    lines = [r.getMessage() for r in caplog.records]
    assert "adding v6 subnet: fd00:10:244:4::/64 PublicIPv6: fd56::14 VtepMAC: 0a:00:00:00:00:04" in lines
    assert "removing v6subnet: fd00:10:244:3::/64 PublicIPv6: fd56::13 VtepMAC: 0a:00:00:00:00:03" in lines
    assert "ignoring non-vxlan v4Subnet(<nil>) v6Subnet(fd00:10:244:5::/64): type=host-gw" in lines
    assert any(line.startswith("error decoding v6 subnet lease JSON: ") for line in lines)


# -- the device lost while running ----------------------------------------------------------------


@pytest.mark.parametrize("fault, problem", [
    ("ip_link_del", "was deleted"),
    ("ip_link_set_down", "was set down"),
    ("ip_addr_flush", "lost its address %s"),
])
def test_a_lost_device_comes_back_from_its_notification(running: tuple[FakeNetlink, VXLANNetwork], stack: Stack,
                                                        fault: str, problem: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    getattr(nl, fault)(stack.device)
    with caplog.at_level(logging.INFO):
        b.restore(nl.take_events())
    assert device_state(nl, stack) == (MAC, True, [stack.address], 0)
    link = nl.find(stack.device)
    assert b.device is not None and link is not None and b.device.index == link.index and b.device_ok
    assert nl.datapath(stack.device) == stack.expected(2, 3)
    # One line says what happened, nothing per entry.
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["%s %s; restored it (MAC %s, address %s, up) and the kernel entries of 2 nodes"
                     % (stack.device, problem.replace("%s", stack.address), MAC, stack.address)]
    # The notifications of the repair itself (a new device comes up down) change nothing.
    nl.take_writes()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert b.restore(nl.take_events()) == 0
    assert nl.take_writes() == [] and caplog.text == ""


@pytest.mark.parametrize("fault", ["ip_link_del", "ip_link_set_down", "ip_addr_flush"])
def test_the_full_reconcile_finds_a_lost_device_without_notifications(running: tuple[FakeNetlink, VXLANNetwork],
                                                                      stack: Stack, fault: str) -> None:
    nl, b = running
    getattr(nl, fault)(stack.device)
    nl.take_events()
    b.reconcile(stack.leases(1, 2, 3, 4))
    assert device_state(nl, stack) == (MAC, True, [stack.address], 0) and b.device_ok
    assert nl.datapath(stack.device) == stack.expected(2, 3, 4)


def test_a_device_replaced_by_another_agent_gets_our_mac_back(running: tuple[FakeNetlink, VXLANNetwork],
                                                              stack: Stack) -> None:
    nl, b = running
    local = dict(device_attributes(VXLANConfig(), b.ext, stack.family))[stack.family.vxlan_local]
    nl.ip_link_del(stack.device)
    nl.ip_link_add(stack.device, kind="vxlan", up=True,
                   data={"IFLA_VXLAN_ID": 1, "IFLA_VXLAN_LINK": b.ext.index, stack.family.vxlan_local: local})
    b.restore(nl.take_events())
    assert device_state(nl, stack)[:3] == (MAC, True, [stack.address])
    assert nl.datapath(stack.device) == stack.expected(2, 3)


def test_a_device_that_cannot_come_back_sends_nothing_per_entry_and_logs_once(
        running: tuple[FakeNetlink, VXLANNetwork], stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    nl.ip_link_del(stack.device)
    nl.ip_link_del("eth1")  # the VXLAN device cannot be made without its external interface
    with caplog.at_level(logging.INFO):
        b.restore(nl.take_events())
        assert not b.device_ok
        nl.take_writes()
        for _ in range(3):
            b.reconcile(stack.leases(1, 2, 3))
            b.sync({"k8s04": stack.lease(4)})
    assert not b.device_ok
    assert [w for w in nl.take_writes() if "NEIGH" in w or "ROUTE" in w] == []
    errors = [r.getMessage() for r in caplog.records]
    assert errors == ["%s was deleted and could not be restored: external interface eth1 not found; waiting for it"
                      % stack.device]
    # Once the interface is back (with a new index), the next look finds it by name and restores everything,
    # node 4 included.
    old = b.ext.index
    nl.ip_link_add("eth1")
    nl.ip_addr_add("eth1", "192.168.56.11/24")
    nl.ip_addr_add("eth1", "fd56::11/64")
    b.reconcile(stack.leases(1, 2, 3, 4))
    assert b.device_ok and nl.datapath(stack.device) == stack.expected(2, 3, 4)
    assert b.ext.index != old and b.ext.index == nl.link(name="eth1")["index"]


def test_a_device_lost_under_a_sync_is_restored_without_a_line_per_entry(
        running: tuple[FakeNetlink, VXLANNetwork], stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    nl.ip_link_del(stack.device)
    nl.take_events()  # the notifications have not arrived yet
    with caplog.at_level(logging.INFO):
        assert b.sync({"k8s04": stack.lease(4)}) == {"k8s04"}
    assert b.device_ok and nl.datapath(stack.device) == stack.expected(2, 3, 4)
    assert [r.getMessage() for r in caplog.records] == [
        "%s was deleted; restored it (MAC %s, address %s, up) and the kernel entries of 3 nodes"
        % (stack.device, MAC, stack.address)]


@pytest.mark.parametrize("stack, far", [pytest.param(V4, "10.9.0.5", id="ipv4"),
                                        pytest.param(V6, "fd99::5", id="ipv6")])
def test_direct_routing_routes_need_no_device_entries_and_go_with_their_node(stack: Stack, far: str) -> None:
    nl, b = node(VXLANConfig(direct_routing=True), stack)
    b.create_device(MAC)
    b.configure_device(stack.own)
    both = {"k8s02": stack.lease(2), "k8s05": stack.lease(5, public_ip=far)}
    b.reconcile(both)
    assert nl.datapath(stack.device)["routes"] == {(stack.subnet(5), stack.gw(5))}
    direct = (stack.subnet(2), stack.public(2), b.ext.index)
    routes = nl.routes(family=stack.family.af)
    assert direct in {(r.dst, r.gateway, r.oif) for r in routes}
    nl.take_writes()
    assert b.reconcile(both) == 0
    assert nl.take_writes() == []
    # A deleted node's direct route goes (flanneld v0.20.2 leaves the IPv6 one behind)
    assert b.sync({"k8s02": None}) == {"k8s02"}
    assert direct not in {(r.dst, r.gateway, r.oif) for r in nl.routes(family=stack.family.af)}


# -- two nodes on a real kernel ---------------------------------------------------------------------

# The spec's worked example (dual-stack-host-gw.md §10): its addresses and MACs.
MACS = {1: {IPV4: "6e:4b:3c:91:a2:10", IPV6: "8a:3c:1f:2d:4e:50"},
        2: {IPV4: "9a:1c:2b:3d:4e:5f", IPV6: "b2:7d:0e:61:c4:39"}}

NODE = r"""
import json, subprocess, sys
from pyflannel import ip
from pyflannel.backend.vxlan import VXLANNetwork, backend_data
from pyflannel.config import VXLANConfig
from pyflannel.family import IPV4, IPV6
from pyflannel.lease import Lease
from pyflannel.netlink import Netlink

me, peer, macs, direct, peers = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] == "1", \
    sys.argv[5] == "1"
nets = {IPV4: ("10.244.0.0/16", "10.244.%d.0/24", "192.168.56.%d"),
        IPV6: ("fd00:10:244::/56", "fd00:10:244:%x::/64", "fd56::%d")}
nl = Netlink()
ext = ip.select(nl, ["eth1"], [], "", "", "", (IPV4, IPV6))
for family, (network, subnet, public) in nets.items():
    n = VXLANNetwork(nl, VXLANConfig(direct_routing=direct), family, ext, family.network(network))
    n.create_device(macs[str(me)][family.name])
    n.configure_device(family.network(subnet % (me - 1)))
    lease = Lease(family.network(subnet % (peer - 1)), family.address(public % (10 + peer)), "vxlan",
                  backend_data(1, macs[str(peer)][family.name]))
    n.reconcile({"k8s%02d" % peer: lease} if peers else {})

def sh(cmd):
    return subprocess.run(cmd.split(), capture_output=True, text=True, check=True).stdout

print(json.dumps({"link": sh("ip -d link show"), "addr": sh("ip addr show"), "route": sh("ip route show"),
                  "route6": sh("ip -6 route show"), "neigh": sh("ip neigh show nud permanent"),
                  "neigh6": sh("ip -6 neigh show nud permanent"), "fdb": sh("bridge fdb show")}))
"""


@pytest.fixture
def two_nodes() -> Iterator[tuple[str, str]]:
    """Two namespaces whose eth1 are the two ends of one veth: 192.168.56.1<i>/24 and fd56::1<i>/64."""
    tag = secrets.token_hex(2)
    ns = ("pfv6a" + tag, "pfv6b" + tag)
    try:
        for name in ns:
            subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "link", "add", "eth1", "netns", ns[0], "type", "veth", "peer", "name", "eth1", "netns",
                        ns[1]], check=True)
        for i, name in enumerate(ns, 1):
            for cmd in ("ip link set lo up", "ip addr add 192.168.56.1%d/24 dev eth1" % i,
                        "ip addr add fd56::1%d/64 dev eth1 nodad" % i, "ip link set eth1 up"):
                subprocess.run(["ip", "netns", "exec", name] + cmd.split(), check=True)
        yield ns
    finally:
        for name in ns:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def program(ns: str, me: int, direct: bool = False, peers: bool = True) -> dict[str, str]:
    """Run node ``me``'s two VXLAN networks in namespace ``ns`` with the other node's lease (or none); the
    kernel state ip and bridge show then."""
    macs = json.dumps({n: {f.name: mac for f, mac in m.items()} for n, m in MACS.items()})
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", NODE, str(me), str(3 - me), macs,
                          str(int(direct)), str(int(peers))], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def ping(ns: str, src: str, dst: str) -> bool:
    """One ping from ``src`` to ``dst``, retried while the IPv6 address is tentative (up to 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        res = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", "-I", src, dst], capture_output=True)
        if res.returncode == 0 or time.monotonic() > deadline:
            return res.returncode == 0
        time.sleep(0.2)


@needs_netns
@pytest.mark.netns
def test_two_dual_stack_nodes_have_flanneld_s_kernel_state_and_talk(two_nodes: tuple[str, str]) -> None:
    """Node 1 and node 2 of the spec's worked example (§10): every flannel line of ip/bridge is there,
    the pods' subnets reach each other over both devices, a restart changes nothing, and a node that
    went (while the daemon was down) leaves no entry behind."""
    ns1, ns2 = two_nodes
    out = program(ns1, 1)
    program(ns2, 2)
    link = re.sub(r"\s+", " ", out["link"])
    for name, mtu, mac, local in (("flannel.1", 1450, MACS[1][IPV4], "192.168.56.11"),
                                  ("flannel-v6.1", 1430, MACS[1][IPV6], "fd56::11")):
        assert re.search(r"%s: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu %d qdisc noqueue state UNKNOWN [^\n]*? "
                         r"link/ether %s brd ff:ff:ff:ff:ff:ff .*?vxlan id 1 local %s dev eth1 srcport 0 0 dstport "
                         r"8472 nolearning ttl auto ageing 300 udpcsum noudp6zerocsumtx noudp6zerocsumrx"
                         % (re.escape(name), mtu, mac, re.escape(local)), link), name
        assert not re.search(r"%s: [^\n]*qlen" % re.escape(name), out["link"])  # flanneld's txqlen 0
    assert "inet 10.244.0.0/32 scope global flannel.1" in out["addr"]
    assert "inet6 fd00:10:244::/128 scope global" in out["addr"]
    assert "10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink" in out["route"]
    assert "fd00:10:244:1::/64 via fd00:10:244:1:: dev flannel-v6.1 metric 1024 onlink pref medium" in out["route6"]
    assert "fd00:10:244:: dev flannel-v6.1 proto kernel metric 256 pref medium" in out["route6"]
    assert "10.244.1.0 dev flannel.1 lladdr %s PERMANENT" % MACS[2][IPV4] in out["neigh"]
    assert "fd00:10:244:1:: dev flannel-v6.1 lladdr %s PERMANENT" % MACS[2][IPV6] in out["neigh6"]
    assert "%s dev flannel.1 dst 192.168.56.12 self permanent" % MACS[2][IPV4] in out["fdb"]
    assert "%s dev flannel-v6.1 dst fd56::12 self permanent" % MACS[2][IPV6] in out["fdb"]
    assert ping(ns1, "10.244.0.0", "10.244.1.0") and ping(ns1, "fd00:10:244::", "fd00:10:244:1::")
    again = program(ns1, 1)  # a restart: the devices are reused, nothing is added twice

    def state(shown: dict[str, str]) -> dict[str, str]:  # without the link counters and DAD's progress
        return {k: v.replace(" tentative", "") for k, v in shown.items() if k != "link"}

    assert state(again) == state(out)
    gone = program(ns1, 1, peers=False)  # node 2 deleted while node 1's daemon was down
    assert "10.244.1.0" not in gone["route"] + gone["neigh"]
    assert "fd00:10:244:1::" not in gone["route6"] + gone["neigh6"]
    assert "192.168.56.12" not in gone["fdb"] and "fd56::12" not in gone["fdb"]


@needs_netns
@pytest.mark.netns
def test_direct_routing_over_both_families_and_its_removal(two_nodes: tuple[str, str]) -> None:
    """DirectRouting: node 2 is on eth1's subnets, so each family gets a route via its public IP and no
    neighbour or FDB entry; the IPv6 route goes with the node (flanneld v0.20.2 leaves it)."""
    ns1, ns2 = two_nodes
    out = program(ns1, 1, direct=True)
    program(ns2, 2, direct=True)
    assert "10.244.1.0/24 via 192.168.56.12 dev eth1" in out["route"]
    assert "fd00:10:244:1::/64 via fd56::12 dev eth1 metric 1024 pref medium" in out["route6"]
    assert MACS[2][IPV4] not in out["fdb"] + out["neigh"] and MACS[2][IPV6] not in out["fdb"] + out["neigh6"]
    assert ping(ns1, "10.244.0.0", "10.244.1.0") and ping(ns1, "fd00:10:244::", "fd00:10:244:1::")
    gone = program(ns1, 1, direct=True, peers=False)
    assert "10.244.1.0/24" not in gone["route"] and "fd00:10:244:1::/64" not in gone["route6"]


# -- VtepMACs: claimed like pod CIDRs --------------------------------------------------------------


def mac_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "VtepMAC" in r.getMessage()]


def test_a_copied_vtep_mac_never_takes_the_first_holders_entry(running: tuple[FakeNetlink, VXLANNetwork],
                                                             stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    victim_mac = "0a:00:00:00:00:02"
    leases = {**stack.leases(2, 3), "evil": stack.lease(9, mac=victim_mac)}
    for _ in range(3):  # full reconciles
        b.reconcile(leases)
        assert nl.datapath(stack.device) == stack.expected(2, 3)
    # The copier flips its public IP: each change reaches sync, none reaches the kernel.
    for i in range(4):
        flipped = stack.lease(9, mac=victim_mac, public_ip=stack.public(40 + i % 2))
        leases["evil"] = flipped
        assert b.sync({"evil": flipped}) == set()
        assert nl.datapath(stack.device) == stack.expected(2, 3)
    assert mac_warnings(caplog) == ['Ignoring node "evil": its %sVtepMAC %s is the VtepMAC of node "k8s02", which '
                                    'held it first' % (stack.family.v6 + " " if stack.family.v6 else "", victim_mac)]
    # The holder's own lease changes (a new public IP): it keeps its VtepMAC.
    moved = stack.lease(2, public_ip=stack.public(30))
    assert b.sync({"k8s02": moved}) == {"k8s02"}
    assert (victim_mac, stack.public(30)) in nl.datapath(stack.device)["fdb"] and "evil" not in b.applied
    b.sync({"k8s02": stack.lease(2)})
    # The holder goes: the waiting node takes the VtepMAC over, in the same sync.
    assert b.sync({"k8s02": None}) == {"k8s02"}
    dp = nl.datapath(stack.device)
    assert (victim_mac, stack.public(41)) in dp["fdb"] and (stack.gw(9), victim_mac) in dp["neigh"]
    assert (victim_mac, stack.public(2)) not in dp["fdb"] and "evil" in b.applied
    # The holder comes back: the MAC is taken now, so it waits in turn.
    assert b.sync({"k8s02": stack.lease(2)}) == set()
    assert "k8s02" not in b.applied


def test_this_nodes_own_and_unusable_vtep_macs_are_refused(running: tuple[FakeNetlink, VXLANNetwork], stack: Stack,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    odd = {"mine": MAC, "zero": "00:00:00:00:00:00", "bcast": "ff:ff:ff:ff:ff:ff", "mcast": "01:00:5e:00:00:01"}
    leases = {**stack.leases(2, 3), **{name: stack.lease(20 + i, mac=mac) for i, (name, mac) in enumerate(odd.items())}}
    for _ in range(2):
        b.reconcile(leases)
    assert nl.datapath(stack.device) == stack.expected(2, 3)
    v6 = stack.family.v6 + " " if stack.family.v6 else ""
    assert mac_warnings(caplog) == [
        'Ignoring node "mine": its %sVtepMAC %s is this node\'s own' % (v6, MAC),
        'Ignoring node "zero": its %sVtepMAC 00:00:00:00:00:00 is all zeros' % v6,
        'Ignoring node "bcast": its %sVtepMAC ff:ff:ff:ff:ff:ff is a multicast address' % v6,
        'Ignoring node "mcast": its %sVtepMAC 01:00:5e:00:00:01 is a multicast address' % v6]


@pytest.mark.parametrize("hint", ['01:00:5e:00:00:01', "00:00:00:00:00:00", "zz", "ab:ab:ab:ab:ab:ab:ab", "0a-00"])
def test_an_unusable_advertised_mac_gives_a_random_one(hint: str, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = node()
    dev = b.create_device(hint)
    assert dev.mac != hint and not int(dev.mac[:2], 16) & 1 and dev.mac != "00:00:00:00:00:00"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "Ignoring the VtepMAC %r this node advertised: it %s; a new flannel.1 gets a random MAC"
        % (hint, "is not a MAC address" if ":" not in hint or len(hint) > 17 or hint == "zz" else
           ("is all zeros" if hint.startswith("00") else "is a multicast address"))]
    assert b.create_device("0A:00:00:00:00:07").mac == "0a:00:00:00:00:07" or nl.find("flannel.1") is not None


def test_a_refused_request_is_logged_once_with_the_node(running: tuple[FakeNetlink, VXLANNetwork], stack: Stack,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    real = nl.batch

    marks = [socket.inet_pton(stack.family.af, a) for a in (stack.gw(4), stack.public(4))]

    def refuse_node_4(requests: Any) -> list[int]:
        codes = real(requests)
        return [95 if any(m in getattr(r, "body", b"") for m in marks) else c  # EOPNOTSUPP
                for r, c in zip(requests, codes)]

    monkeypatch.setattr(nl, "batch", refuse_node_4)
    for _ in range(3):
        b.reconcile(stack.leases(2, 3, 4))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == len(set(errors)) == 3, errors  # the neighbour, the FDB entry, the route: once each
    assert all(e.endswith("operation not supported (node k8s04; tried again at each reconcile)") for e in errors)
