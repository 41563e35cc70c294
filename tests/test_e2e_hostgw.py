"""End to end, the host-gw backend: IPv4-only, dual-stack and IPv6-only clusters, three nodes each running
pyflannel in network namespaces on one L2 underlay, one pod per node attached by the CNI plugins."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.conftest import needs_netns
from tests.e2e_families import (PREFIX, expected_hostgw, families, hostgw_routes, ip_json, kernel_snapshot, pod_cidr,
                                pod_ip, probe_outcomes)
from tools.netcluster import Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns]


@pytest.fixture(scope="module", params=["v4", "dual", "v6"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster"), stack=request.param, backend={"Type": "host-gw"}) as c:
        c.start_nodes_with_pods("k8s01", "k8s02", "k8s03")
        yield c


def base_nodes(cluster: Cluster) -> list[Node]:
    return [cluster.nodes[n] for n in ("k8s01", "k8s02", "k8s03")]


def wait_routes(cluster: Cluster, nodes: list[Node], timeout: float = 20) -> float:
    """Wait until every node has exactly the routes to the others' pod CIDRs, in every family."""
    started = time.monotonic()
    for node in nodes:
        others = [o for o in nodes if o is not node]
        for family in families(cluster):
            want = expected_hostgw(cluster, others, family)
            cluster.wait_for("%s's IPv%d routes to %s" % (node.name, family, [o.name for o in others]),
                             lambda: hostgw_routes(node, family) == want, timeout)
    return time.monotonic() - started


def test_startup_writes_flanneld_state(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    v4 = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n" if cluster.ipv4 else ""
    v6 = "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n" if cluster.ipv6 else ""
    assert n1.subnet_file.read_text() == v4 + v6 + "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n"
    assert cluster.api is not None
    ann = cluster.api.get_node("k8s01")["metadata"]["annotations"]
    # spec §3.2: host-gw writes backend-data null and, IPv6-only, public-ip 0.0.0.0
    want = {PREFIX + "backend-type": "host-gw", PREFIX + "backend-data": "null",
            PREFIX + "public-ip": n1.ip if cluster.ipv4 else "0.0.0.0", PREFIX + "kube-subnet-manager": "true"}
    if cluster.ipv6:
        want.update({PREFIX + "backend-v6-data": "null", PREFIX + "public-ipv6": "fd56::11"})
    assert {k: v for k, v in ann.items() if k.startswith(PREFIX)} == want
    links = {link["ifname"] for link in ip_json(n1, "ip", "-j", "link")}
    assert not {"flannel.1", "flannel-v6.1"} & links, "host-gw creates no device"
    wait_routes(cluster, [n1, n2, n3])


def test_pods_ping_across_nodes(cluster: Cluster) -> None:
    pods = [p for n in base_nodes(cluster) for p in n.pods]
    for family in families(cluster):
        for src in pods:
            for dst in pods:
                if src is not dst:
                    assert cluster.ping(src, pod_ip(dst, family), count=2), \
                        "%s cannot reach %s over IPv%d" % (src.name, dst.name, family)


def test_hand_deleted_routes_come_back(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    for family in families(cluster):
        subnet = pod_cidr(cluster, "k8s02", family)
        started = time.monotonic()
        Cluster.ns_run(n1.netns, "ip", "-%d" % family, "route", "del", str(subnet), "dev", "eth1")
        want = expected_hostgw(cluster, [n2, n3], family)
        cluster.wait_for("the IPv%d route back" % family, lambda: hostgw_routes(n1, family) == want, 15, 0.05)
        print("hand-deleted IPv%d host-gw route restored in %.2fs" % (family, time.monotonic() - started))
        assert cluster.ping(n1.pods[0], pod_ip(n2.pods[0], family), count=2)


def test_deleted_node_routes_disappear(cluster: Cluster) -> None:
    base = base_nodes(cluster)
    n4 = cluster.add_node("k8s04")
    cluster.start(n4)
    cluster.wait_ready(n4)
    wait_routes(cluster, base + [n4])
    cluster.stop(n4)
    assert cluster.api is not None
    gone = {f: str(pod_cidr(cluster, "k8s04", f)) for f in families(cluster)}
    cluster.api.delete_node("k8s04")
    print("routes of a deleted node gone in %.2fs" % wait_routes(cluster, base))
    for node in base:
        for family, subnet in gone.items():
            assert all(dst != subnet for dst, _ in hostgw_routes(node, family))


def test_restart_duplicates_nothing_and_removes_routes_of_nodes_deleted_while_down(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    before = kernel_snapshot(n1)
    n5 = cluster.add_node("k8s05")
    cluster.start(n5)
    cluster.wait_ready(n5)
    wait_routes(cluster, [n1, n2, n3, n5])
    assert cluster.stop(n1, signal.SIGTERM) == 0
    assert hostgw_routes(n1, families(cluster)[0]) == expected_hostgw(cluster, [n2, n3, n5], families(cluster)[0]), \
        "SIGTERM leaves the routes in place"
    cluster.stop(n5)
    assert cluster.api is not None
    cluster.api.delete_node("k8s05")
    cluster.start(n1)
    cluster.wait_ready(n1)
    print("routes of a node deleted while down gone %.2fs after ready" % wait_routes(cluster, [n1, n2, n3]))
    time.sleep(1.5)
    assert kernel_snapshot(n1) == before
    for family in families(cluster):
        assert cluster.ping(n1.pods[0], pod_ip(n3.pods[0], family), count=2)


def test_datapath_probes_take_the_host_gw_routes_in_every_family(cluster: Cluster) -> None:
    """Each node answers probes on an address of its pod subnet put on lo, which the others reach
    only through their host-gw route to its pods."""
    nodes = base_nodes(cluster)
    for node in nodes:
        peers = [o.name for o in nodes if o is not node]
        cluster.wait_for("%s's probes" % node.name, lambda: all(
            [found.get(name) for name in peers] == ["ok", "ok"] for found in probe_outcomes(cluster, node).values())
            and len(probe_outcomes(cluster, node)) == len(families(cluster)), 30)
    lo = {(a["local"], a["prefixlen"]) for a in ip_json(nodes[0], "ip", "-j", "addr", "show", "dev", "lo")[0]["addr_info"]}
    assert ("10.244.1.0", 32) in lo if cluster.ipv4 else ("fd00:10:244:1:8000::", 128) in lo
