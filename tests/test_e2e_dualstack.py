"""End to end, IPv6 with the vxlan backend: a dual-stack cluster and an IPv6-only one
(``"EnableIPv4": false``), three nodes each running pyflannel in network namespaces, IPv4 and IPv6 on
the underlay, one pod per node attached by the CNI bridge + host-local plugins with both ranges."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_netns
from tests.e2e_families import (PREFIX, expected_vxlan, families, flannel_rules, flanneld_state, ip_json,
                                kernel_snapshot, pod_cidr, pod_ip, probe_outcomes, source_seen_by_hub, underlay_ip,
                                vxlan_datapath)
from tools.netcluster import HUB_IP6, Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns]

MAC = re.compile(r'\{"VNI":1,"VtepMAC":"([0-9a-f]{2}:){5}[0-9a-f]{2}"\}')


def test_underlay_and_cni_carry_both_families(tmp_path: Path) -> None:
    """The test bed itself, without pyflannel: IPv6 between nodes on the underlay, and a pod attached
    from a dual-stack subnet.env gets both addresses and routes to both Networks."""
    with Cluster(tmp_path, stack="dual") as c:
        n1, n2 = c.add_node("k8s01"), c.add_node("k8s02")
        assert c.api is not None
        assert c.api.get_node("k8s01")["spec"] == {"podCIDR": "10.244.1.0/24",
                                                   "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]}
        assert c.ping(n1, HUB_IP6) and c.ping(n1, "fd56::12")
        n1.subnet_file.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
                                  "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n"
                                  "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
        pod = c.add_pod(n1, "pod1")
        assert pod.ips == ["10.244.1.2", "fd00:10:244:1::2"]
        routes6 = {(r["dst"], r.get("gateway")) for r in ip_json(pod.node, "ip", "-j", "-6", "route", "show", "dev",
                                                                   "cni0")}
        assert ("fd00:10:244:1::/64", None) in routes6
        in_pod = Cluster.ns_run(pod.netns, "ip", "-6", "route").stdout
        assert "fd00:10:244::/56 via fd00:10:244:1::1 dev eth0" in in_pod
        assert "default via fd00:10:244:1::1 dev eth0" in in_pod
        assert c.ping(pod, "fd00:10:244:1::1") and c.ping(pod, "10.244.1.1")


def test_flanneld_reference_state_carries_both_families(tmp_path: Path) -> None:
    """The reference the interop test builds, without pyflannel: two nodes in the state flanneld v0.20.2
    leaves (spec §10) carry pod traffic over IPv4 and IPv6."""
    with Cluster(tmp_path, stack="dual") as c:
        n1, n2 = c.add_node("k8s01"), c.add_node("k8s02")
        flanneld_state(c, n2, [], {4: "9a:1c:2b:3d:4e:5f", 6: "b2:7d:0e:61:c4:39"})
        flanneld_state(c, n1, [n2], {4: "6e:4b:3c:91:a2:10", 6: "8a:3c:1f:2d:4e:50"})
        for cmd in ("ip neigh replace 10.244.1.0 lladdr 6e:4b:3c:91:a2:10 dev flannel.1 nud permanent",
                    "bridge fdb append 6e:4b:3c:91:a2:10 dev flannel.1 dst 192.168.56.11 self permanent",
                    "ip route replace 10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink",
                    "ip -6 neigh replace fd00:10:244:1:: lladdr 8a:3c:1f:2d:4e:50 dev flannel-v6.1 nud permanent",
                    "bridge fdb append 8a:3c:1f:2d:4e:50 dev flannel-v6.1 dst fd56::11 self permanent",
                    "ip -6 route replace fd00:10:244:1::/64 via fd00:10:244:1:: dev flannel-v6.1 onlink"):
            Cluster.ns_run(n2.netns, *cmd.split())
        link = ip_json(n1, "ip", "-j", "-d", "link", "show", "flannel-v6.1")[0]
        assert (link["mtu"], link["address"], link["linkinfo"]["info_data"]["local6"]) == (1430, "8a:3c:1f:2d:4e:50",
                                                                                           "fd56::11")
        p1, p2 = c.add_pod(n1, "pod1"), c.add_pod(n2, "pod2")
        assert p2.ips == ["10.244.2.2", "fd00:10:244:2::2"]
        assert c.ping(p1, "10.244.2.2", count=2) and c.ping(p1, "fd00:10:244:2::2", count=2)


@pytest.fixture(scope="module", params=["dual", "v6"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster"), stack=request.param) as c:
        c.start_nodes_with_pods("k8s01", "k8s02", "k8s03")
        yield c


def base_nodes(cluster: Cluster) -> list[Node]:
    return [cluster.nodes[n] for n in ("k8s01", "k8s02", "k8s03")]


def wait_datapath(cluster: Cluster, nodes: list[Node], timeout: float = 20) -> float:
    """Wait until every node has exactly the entries of the others, in every family; the seconds taken."""
    started = time.monotonic()
    for node in nodes:
        others = [o for o in nodes if o is not node]
        for family in families(cluster):
            want = expected_vxlan(cluster, others, family)
            cluster.wait_for("%s's IPv%d entries for %s" % (node.name, family, [o.name for o in others]),
                             lambda: vxlan_datapath(node, family) == want, timeout)
    return time.monotonic() - started


def test_startup_writes_flanneld_state(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    v4 = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n" if cluster.ipv4 else ""
    assert n1.subnet_file.read_text() == v4 + ("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n"
                                               "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    assert cluster.api is not None
    ann = cluster.api.get_node("k8s01")["metadata"]["annotations"]
    assert ann[PREFIX + "kube-subnet-manager"] == "true" and ann[PREFIX + "backend-type"] == "vxlan"
    assert ann[PREFIX + "public-ipv6"] == "fd56::11"
    assert MAC.fullmatch(ann[PREFIX + "backend-v6-data"])
    if cluster.ipv4:
        assert ann[PREFIX + "public-ip"] == n1.ip and MAC.fullmatch(ann[PREFIX + "backend-data"])
    else:
        assert PREFIX + "public-ip" not in ann and PREFIX + "backend-data" not in ann
        assert Cluster.ns_run(n1.netns, "ip", "link", "show", "flannel.1", check=False).returncode != 0
    link = ip_json(n1, "ip", "-j", "-d", "link", "show", "flannel-v6.1")[0]
    assert link["mtu"] == 1430 and link.get("txqlen", 0) == 0
    assert link["address"] == json.loads(ann[PREFIX + "backend-v6-data"])["VtepMAC"]
    info = link["linkinfo"]["info_data"]
    assert (info["id"], info["local6"], info["port"], info.get("learning")) == (1, "fd56::11", 8472, False)
    addrs = ip_json(n1, "ip", "-j", "-6", "addr", "show", "dev", "flannel-v6.1", "scope", "global")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if "local" in a] == [("fd00:10:244:1::", 128)]
    wait_datapath(cluster, [n1, n2, n3])
    rules = flannel_rules(n1, 6)
    assert '-A FLANNEL-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244:1::/64 -m comment --comment "flanneld masq" -j RETURN' \
        in rules
    assert '-A FLANNEL-FWD -s fd00:10:244::/56 -m comment --comment "flanneld forward" -j ACCEPT' in rules
    assert bool(flannel_rules(n1, 4)) == cluster.ipv4


def test_pods_ping_across_nodes_over_both_families(cluster: Cluster) -> None:
    pods = [p for n in base_nodes(cluster) for p in n.pods]
    for family in families(cluster):
        for src in pods:
            for dst in pods:
                if src is not dst:
                    assert cluster.ping(src, pod_ip(dst, family), count=2), \
                        "%s cannot reach %s over IPv%d" % (src.name, dst.name, family)


def test_pod_traffic_to_the_underlay_is_masqueraded(cluster: Cluster) -> None:
    n1 = base_nodes(cluster)[0]
    for family in families(cluster):
        seen, echoed = source_seen_by_hub(cluster, n1.pods[0], family)
        assert seen == echoed == underlay_ip(n1, family), "IPv%d: the hub saw %r" % (family, seen)


def test_deleted_node_entries_disappear(cluster: Cluster) -> None:
    base = base_nodes(cluster)
    n4 = cluster.add_node("k8s04")
    cluster.start(n4)
    cluster.wait_ready(n4)
    wait_datapath(cluster, base + [n4])
    cluster.stop(n4)
    assert cluster.api is not None
    gone = {f: str(pod_cidr(cluster, "k8s04", f)) for f in families(cluster)}
    cluster.api.delete_node("k8s04")
    print("entries of a deleted node gone in %.2fs" % wait_datapath(cluster, base))
    for node in base:
        for family, subnet in gone.items():
            assert all(r[0] != subnet for r in vxlan_datapath(node, family)["routes"])


def test_hand_deleted_ipv6_entries_come_back(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    subnet = pod_cidr(cluster, "k8s02", 6)
    assert cluster.api is not None
    mac = json.loads(cluster.api.get_node("k8s02")["metadata"]["annotations"][PREFIX + "backend-v6-data"])["VtepMAC"]
    started = time.monotonic()
    Cluster.ns_run(n1.netns, "ip", "-6", "route", "del", str(subnet), "dev", "flannel-v6.1")
    Cluster.ns_run(n1.netns, "ip", "-6", "neigh", "del", str(subnet.network_address), "dev", "flannel-v6.1")
    Cluster.ns_run(n1.netns, "bridge", "fdb", "del", mac, "dev", "flannel-v6.1", "dst", str(n2.ip6))
    want = expected_vxlan(cluster, [n2, n3], 6)
    cluster.wait_for("the IPv6 entries to be repaired", lambda: vxlan_datapath(n1, 6) == want, 15)
    print("hand-deleted IPv6 route, neighbour and FDB entry restored in %.2fs" % (time.monotonic() - started))
    assert cluster.ping(n1.pods[0], pod_ip(n2.pods[0], 6), count=2)


def test_restart_duplicates_nothing(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    before = kernel_snapshot(n1)
    assert cluster.stop(n1, signal.SIGTERM) == 0
    assert kernel_snapshot(n1) == before, "SIGTERM leaves the datapath in place"
    cluster.start(n1)
    cluster.wait_ready(n1)
    time.sleep(1.5)
    assert kernel_snapshot(n1) == before
    for family in families(cluster):
        assert len(vxlan_datapath(n1, family)["routes"]) == 2
        assert cluster.ping(n1.pods[0], pod_ip(n3.pods[0], family), count=2)


def test_a_node_set_up_as_flanneld_does_interoperates(cluster: Cluster) -> None:
    """A rolling migration: a node in the state flanneld v0.20.2 leaves (spec §10; the IPv6-only variant
    without flannel.1), made here with iproute2 and flanneld's node patch, reaches the pyflannel nodes'
    pods over every family and is reached by them."""
    base = base_nodes(cluster)
    fl = cluster.add_node("k8s07")
    flanneld_state(cluster, fl, base, {4: "6e:4b:3c:91:a2:10", 6: "8a:3c:1f:2d:4e:50"})
    pod = cluster.add_pod(fl, "pod7")
    try:
        wait_datapath(cluster, base + [fl])
        for node in base:
            for family in families(cluster):
                assert cluster.ping(pod, pod_ip(node.pods[0], family), count=2), \
                    "flanneld-style pod cannot reach %s over IPv%d" % (node.name, family)
                assert cluster.ping(node.pods[0], pod_ip(pod, family), count=2)
    finally:
        assert cluster.api is not None
        cluster.api.delete_node(fl.name)
    wait_datapath(cluster, base)


def test_datapath_probes_pass_through_both_devices(cluster: Cluster) -> None:
    """IPv4 probes go to each peer's flannel.1 address, IPv6 ones to an address of its pod subnet on lo
    (the /64's network address is the pods' bridge's anycast address, which takes no TCP)."""
    nodes = [cluster.nodes[n] for n in ("k8s01", "k8s02", "k8s03")]
    for node in nodes:
        peers = [o.name for o in nodes if o is not node]
        cluster.wait_for("%s's probes" % node.name, lambda: all(
            [found.get(name) for name in peers] == ["ok", "ok"] for found in probe_outcomes(cluster, node).values())
            and len(probe_outcomes(cluster, node)) == len(families(cluster)), 30)
