"""The VXLAN backend's device, sync, reconcile and restore, against a fake kernel (no root needed)."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.backend.vxlan import (VXLANBackend, VXLANLink, backend_data, device_attributes, device_name,
                                     incompatibility, read_link)
from pyflannel import ip
from pyflannel.config import VXLANConfig
from pyflannel.family import IPV4
from pyflannel.ip import ExtAddr, ExternalInterface
from pyflannel.lease import Lease
from tests.fakenetlink import FakeNetlink

NETWORK = IPv4Network("10.244.0.0/16")
ETH1_IP = IPv4Address("192.168.56.11")
OWN = IPv4Network("10.244.1.0/24")
MAC = "0a:00:00:00:00:01"  # the MAC this node advertises


def lease(n: int, mac: str = "", public_ip: str = "") -> Lease:
    """Node n's lease: 10.244.<n>.0/24 at 192.168.56.<10+n>."""
    return Lease(IPv4Network("10.244.%d.0/24" % n), IPv4Address(public_ip or "192.168.56.%d" % (10 + n)), "vxlan",
                 backend_data(1, mac or "0a:00:00:00:00:%02x" % n))


def expected(*nodes: int) -> dict[str, set[tuple[str, str | None]]]:
    """flannel.1's routes, neighbours and FDB entries for these nodes' default leases."""
    return {"routes": {("10.244.%d.0/24" % n, "10.244.%d.0" % n) for n in nodes},
            "neigh": {("10.244.%d.0" % n, "0a:00:00:00:00:%02x" % n) for n in nodes},
            "fdb": {("0a:00:00:00:00:%02x" % n, "192.168.56.%d" % (10 + n)) for n in nodes}}


def node(cfg: VXLANConfig | None = None) -> tuple[FakeNetlink, VXLANBackend]:
    """A node with eth1 at 192.168.56.11/24 and a backend that has not made its device yet."""
    nl = FakeNetlink()
    eth1 = nl.ip_link_add("eth1")
    nl.ip_addr_add("eth1", "192.168.56.11/24")
    ext = ip.select(nl, ["eth1"], [], "", "")  # the daemon's own look-up, on the fake
    assert ext == ExternalInterface("eth1", eth1.index, 1500, {IPV4: ExtAddr(ETH1_IP, ETH1_IP)})
    return nl, VXLANBackend(nl, cfg or VXLANConfig(), ext, NETWORK)


@pytest.fixture
def running() -> tuple[FakeNetlink, VXLANBackend]:
    """A node as the daemon leaves it after start-up: device, address, and nodes 2 and 3 programmed."""
    nl, b = node()
    b.create_device(MAC)
    b.configure_device(OWN)
    b.reconcile({"k8s01": lease(1), "k8s02": lease(2), "k8s03": lease(3)})
    assert nl.datapath("flannel.1") == expected(2, 3)
    nl.take_events()
    nl.take_writes()
    return nl, b


def device_state(nl: FakeNetlink) -> tuple[str, bool, list[str], int]:
    link = nl.find("flannel.1")
    assert link is not None
    return link.mac, link.up, nl.addresses_of("flannel.1"), link.txqlen


# -- the device ----------------------------------------------------------------------------------


def test_a_new_device_has_flanneld_attributes_and_the_advertised_mac() -> None:
    nl, b = node()
    dev = b.create_device(MAC)
    link = nl.find("flannel.1")
    assert link is not None and dev.index == link.index and dev.mac == MAC
    assert (link.kind, link.mac, link.up, link.txqlen, link.mtu) == ("vxlan", MAC, False, 0, 1450)
    assert link.data == {**dict(device_attributes(VXLANConfig(), b.ext)), "IFLA_VXLAN_PORT": 8472}
    assert link.data["IFLA_VXLAN_LOCAL"] == "192.168.56.11" and "IFLA_VXLAN_GBP" not in link.data
    assert nl.sysctls == {"net/ipv6/conf/flannel.1/accept_ra": "0"}
    assert not b.device_ok
    b.configure_device(OWN)
    assert device_state(nl) == (MAC, True, ["10.244.1.0/32"], 0) and b.device_ok


def test_a_compatible_device_is_kept_with_its_mac() -> None:
    nl, b = node()
    nl.ip_link_add("flannel.1", kind="vxlan", mac="0a:00:00:00:00:99", up=False,
                   data={"IFLA_VXLAN_ID": 1, "IFLA_VXLAN_LINK": b.ext.index, "IFLA_VXLAN_LOCAL": "192.168.56.11",
                         "IFLA_VXLAN_PORT": 8472})
    nl.take_writes()
    assert b.create_device(MAC).mac == "0a:00:00:00:00:99"
    assert nl.take_writes() == []


def test_an_incompatible_device_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    nl, b = node()
    old = nl.ip_link_add("flannel.1", kind="vxlan", up=False, data={"IFLA_VXLAN_ID": 2, "IFLA_VXLAN_PORT": 8472})
    with caplog.at_level(logging.WARNING):
        dev = b.create_device(MAC)
    assert '"flannel.1" already exists with incompatible configuration: vni: 2 vs 1; recreating device' in caplog.text
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
    assert device_name(4096) == "flannel.4096"


def test_read_link_gives_what_diagnose_shows(running: tuple[FakeNetlink, VXLANBackend]) -> None:
    nl, b = running
    found = read_link(nl.link(name="flannel.1"))
    assert (found.name, found.mac, found.up, found.mtu, found.kind, found.port) == ("flannel.1", MAC, True, 1450,
                                                                                    "vxlan", 8472)
    eth1 = read_link(nl.link(name="eth1"))
    assert (eth1.kind, eth1.up, eth1.port) == ("veth", True, 8472)


# -- sync and reconcile ---------------------------------------------------------------------------


def test_sync_programs_changes_and_removals(running: tuple[FakeNetlink, VXLANBackend]) -> None:
    nl, b = running
    assert b.sync({"k8s04": lease(4), "k8s03": None}) == {"k8s03", "k8s04"}
    assert nl.datapath("flannel.1") == expected(2, 4)
    # A new VtepMAC replaces the neighbour and the FDB entry; the route stays.
    assert b.sync({"k8s02": lease(2, mac="0a:00:00:00:02:22")}) == {"k8s02"}
    dp = nl.datapath("flannel.1")
    assert ("10.244.2.0", "0a:00:00:00:02:22") in dp["neigh"] and ("0a:00:00:00:02:22", "192.168.56.12") in dp["fdb"]
    assert ("0a:00:00:00:00:02", "192.168.56.12") not in dp["fdb"]
    nl.take_writes()
    assert b.sync({"k8s02": lease(2, mac="0a:00:00:00:02:22")}) == set()
    assert nl.take_writes() == []


def test_reconcile_sends_nothing_when_all_is_in_place(running: tuple[FakeNetlink, VXLANBackend]) -> None:
    nl, b = running
    assert b.reconcile({"k8s01": lease(1), "k8s02": lease(2), "k8s03": lease(3)}) == 0
    assert nl.take_writes() == []


def test_reconcile_removes_strays_and_puts_back_what_is_missing(running: tuple[FakeNetlink, VXLANBackend],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    nl.ip_route_del("10.244.2.0/24")
    b.sync({"k8s09": lease(9)})
    with caplog.at_level(logging.INFO):
        assert b.reconcile({"k8s01": lease(1), "k8s02": lease(2), "k8s03": lease(3)}) == 4  # 3 strays, 1 missing
    assert nl.datapath("flannel.1") == expected(2, 3)
    assert caplog.text.count("Reconcile repaired 4 kernel entries on flannel.1") == 1


def test_restore_puts_back_entries_deleted_by_hand(running: tuple[FakeNetlink, VXLANBackend]) -> None:
    nl, b = running
    nl.ip_route_del("10.244.2.0/24")
    nl.ip_neigh_del("10.244.3.0", "flannel.1")
    nl.bridge_fdb_del("0a:00:00:00:00:03", "flannel.1")
    assert b.restore(nl.take_events()) == 2
    assert nl.datapath("flannel.1") == expected(2, 3)


def test_a_deletion_reported_after_a_comparison_put_it_back_changes_nothing(
        running: tuple[FakeNetlink, VXLANBackend], caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    nl.ip_neigh_del("10.244.2.0", "flannel.1")
    late = nl.take_events()
    assert b.reconcile({"k8s02": lease(2), "k8s03": lease(3)}) == 1
    nl.take_writes()
    with caplog.at_level(logging.INFO):
        assert b.restore(late) == 0
    assert "Restored" not in caplog.text
    assert nl.datapath("flannel.1") == expected(2, 3)


def test_restore_of_lost_notifications_compares_everything(running: tuple[FakeNetlink, VXLANBackend]) -> None:
    nl, b = running
    nl.ip_route_del("10.244.2.0/24")
    nl.take_events()  # lost: the Monitor reports []
    assert b.restore([]) == 1
    assert nl.datapath("flannel.1") == expected(2, 3)


# -- the device lost while running ----------------------------------------------------------------


@pytest.mark.parametrize("fault, problem", [
    ("ip_link_del", "was deleted"),
    ("ip_link_set_down", "was set down"),
    ("ip_addr_flush", "lost its address 10.244.1.0/32"),
])
def test_a_lost_device_comes_back_from_its_notification(running: tuple[FakeNetlink, VXLANBackend], fault: str,
                                                        problem: str, caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    getattr(nl, fault)("flannel.1")
    with caplog.at_level(logging.INFO):
        b.restore(nl.take_events())
    assert device_state(nl) == (MAC, True, ["10.244.1.0/32"], 0)
    assert b.device.index == nl.find("flannel.1").index and b.device_ok
    assert nl.datapath("flannel.1") == expected(2, 3)
    # One line says what happened, nothing per entry.
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["flannel.1 %s; restored it (MAC %s, address 10.244.1.0/32, up) and the kernel entries of 2 nodes"
                     % (problem, MAC)]
    # The notifications of the repair itself (a new device comes up down) change nothing.
    nl.take_writes()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert b.restore(nl.take_events()) == 0
    assert nl.take_writes() == [] and caplog.text == ""


@pytest.mark.parametrize("fault", ["ip_link_del", "ip_link_set_down", "ip_addr_flush"])
def test_the_full_reconcile_finds_a_lost_device_without_notifications(running: tuple[FakeNetlink, VXLANBackend],
                                                                      fault: str) -> None:
    nl, b = running
    getattr(nl, fault)("flannel.1")
    nl.take_events()
    b.reconcile({"k8s01": lease(1), "k8s02": lease(2), "k8s03": lease(3), "k8s04": lease(4)})
    assert device_state(nl) == (MAC, True, ["10.244.1.0/32"], 0) and b.device_ok
    assert nl.datapath("flannel.1") == expected(2, 3, 4)


def test_a_device_replaced_by_another_agent_gets_our_mac_back(running: tuple[FakeNetlink, VXLANBackend]) -> None:
    nl, b = running
    nl.ip_link_del("flannel.1")
    nl.ip_link_add("flannel.1", kind="vxlan", up=True,
                   data={"IFLA_VXLAN_ID": 1, "IFLA_VXLAN_LINK": b.ext.index, "IFLA_VXLAN_LOCAL": "192.168.56.11"})
    b.restore(nl.take_events())
    assert device_state(nl)[:3] == (MAC, True, ["10.244.1.0/32"])
    assert nl.datapath("flannel.1") == expected(2, 3)


def test_a_device_that_cannot_come_back_sends_nothing_per_entry_and_logs_once(
        running: tuple[FakeNetlink, VXLANBackend], caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    nl.ip_link_del("flannel.1")
    nl.ip_link_del("eth1")  # the VXLAN device cannot be made without its external interface
    with caplog.at_level(logging.INFO):
        b.restore(nl.take_events())
        assert not b.device_ok
        nl.take_writes()
        for _ in range(3):
            b.reconcile({"k8s01": lease(1), "k8s02": lease(2), "k8s03": lease(3)})
            b.sync({"k8s04": lease(4)})
    assert not b.device_ok
    assert [w for w in nl.take_writes() if "NEIGH" in w or "ROUTE" in w] == []
    errors = [r.getMessage() for r in caplog.records]
    assert errors == ["flannel.1 was deleted and could not be restored: no such device"]
    # Once the interface is back, the next look restores everything, node 4 included.
    eth1 = nl.ip_link_add("eth1")
    nl.ip_addr_add("eth1", "192.168.56.11/24")
    b.ext = ExternalInterface("eth1", eth1.index, 1500, {IPV4: ExtAddr(ETH1_IP, ETH1_IP)})
    b.reconcile({"k8s01": lease(1), "k8s02": lease(2), "k8s03": lease(3), "k8s04": lease(4)})
    assert b.device_ok and nl.datapath("flannel.1") == expected(2, 3, 4)


def test_a_device_lost_under_a_sync_is_restored_without_a_line_per_entry(
        running: tuple[FakeNetlink, VXLANBackend], caplog: pytest.LogCaptureFixture) -> None:
    nl, b = running
    nl.ip_link_del("flannel.1")
    nl.take_events()  # the notifications have not arrived yet
    with caplog.at_level(logging.INFO):
        assert b.sync({"k8s04": lease(4)}) == {"k8s04"}
    assert b.device_ok and nl.datapath("flannel.1") == expected(2, 3, 4)
    assert [r.getMessage() for r in caplog.records] == [
        "flannel.1 was deleted; restored it (MAC %s, address 10.244.1.0/32, up) and the kernel entries of 3 nodes" % MAC]


def test_direct_routing_routes_need_no_device_entries() -> None:
    nl, b = node(VXLANConfig(direct_routing=True))
    b.create_device(MAC)
    b.configure_device(OWN)
    b.reconcile({"k8s02": lease(2), "k8s05": lease(5, public_ip="10.9.0.5")})
    assert nl.datapath("flannel.1")["routes"] == {("10.244.5.0/24", "10.244.5.0")}
    assert any(r.dst == "10.244.2.0/24" and r.gateway == "192.168.56.12" and r.oif == b.ext.index for r in nl.routes())
    nl.take_writes()
    assert b.reconcile({"k8s02": lease(2), "k8s05": lease(5, public_ip="10.9.0.5")}) == 0
    assert nl.take_writes() == []
