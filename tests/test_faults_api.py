"""Faults that come through the API, injected from outside running pyflannel processes: a
black-holed API connection, bad data from other nodes, a bad public-ip-overwrite on this node.
Each test prints how long recovery took (pytest -s)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.conftest import needs_netns
from tools.netcluster import API_PORT, Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns]

PREFIX = "flannel.alpha.coreos.com/"


def flannel_annotations(ip: str, mac: str) -> dict[str, str]:
    return {PREFIX + "kube-subnet-manager": "true", PREFIX + "backend-type": "vxlan", PREFIX + "public-ip": ip,
            PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"%s"}' % mac}


def ip_json(node: Node, *args: str) -> list[dict]:
    out = Cluster.ns_run(node.netns, *args).stdout
    return json.loads(out) if out.strip() else []


def routes(node: Node) -> set[str]:
    """Every IPv4 route destination in the node's main table."""
    return {r["dst"] for r in ip_json(node, "ip", "-j", "-4", "route", "show")}


def flannel_macs(node: Node) -> set[str]:
    """The MACs of flannel.1's FDB and neighbour entries."""
    fdb = {f["mac"] for f in ip_json(node, "bridge", "-j", "fdb", "show", "dev", "flannel.1") if f.get("dst")}
    return fdb | {n.get("lladdr", "") for n in ip_json(node, "ip", "-j", "neigh", "show", "dev", "flannel.1")}


def api_connections(cluster: Cluster, node: Node) -> set[int]:
    """The node's client ports of its established connections to the API server, seen in the hub."""
    out = Cluster.ns_run(cluster.hub, "ss", "-Htn", "state", "established", "( sport = :%d )" % API_PORT).stdout
    ports = set()
    for line in out.splitlines():
        peer = line.split()[-1]
        host, _, port = peer.rpartition(":")
        if host == node.ip:
            ports.add(int(port))
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as c:
        for name in ("k8s01", "k8s02"):
            c.start(c.add_node(name))
        for node in c.nodes.values():
            c.wait_ready(node)
        for i, node in enumerate(c.nodes.values()):
            c.add_pod(node, "pod%d" % (i + 1))
        yield c


def test_black_holed_api_connection(cluster: Cluster) -> None:
    """A load balancer forgets the node's connections (no RST, no FIN); new connections still work."""
    n1, n2 = cluster.nodes["k8s01"], cluster.nodes["k8s02"]
    assert cluster.api is not None
    ports = cluster.wait_for("k8s01's API connections", lambda: api_connections(cluster, n1), 10)
    assert isinstance(ports, set)
    for port in ports:  # only these connections: a new one gets another port and passes
        Cluster.ns_run(cluster.hub, "iptables", "-I", "INPUT", "-s", n1.ip, "-p", "tcp", "--sport", str(port),
                       "--dport", str(API_PORT), "-j", "DROP")
        Cluster.ns_run(cluster.hub, "iptables", "-I", "OUTPUT", "-d", n1.ip, "-p", "tcp", "--dport", str(port),
                       "--sport", str(API_PORT), "-j", "DROP")
    started = time.monotonic()
    cluster.api.add_node("k8s09", pod_cidr="10.244.9.0/24",
                         annotations=flannel_annotations("192.168.56.99", "0a:00:00:00:00:09"))
    cluster.wait_for("k8s02 to route to k8s09", lambda: "10.244.9.0/24" in routes(n2), 10)
    print("unaffected node programmed in %.1fs" % (time.monotonic() - started))
    cluster.wait_for("k8s01 to route to k8s09", lambda: "10.244.9.0/24" in routes(n1), 60, 0.5)
    took = time.monotonic() - started
    print("black-holed API connection: node change in k8s01's kernel after %.1fs" % took)
    assert took < 60
    assert api_connections(cluster, n1) - ports, "k8s01 has no new API connection"
    assert n1.proc is not None and n1.proc.poll() is None
    assert "Failed to watch nodes" in n1.log()
    cluster.api.delete_node("k8s09")
    cluster.wait_for("k8s01 to drop k8s09", lambda: "10.244.9.0/24" not in routes(n1), 20)


def test_bad_nodes_never_reach_the_kernel(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes["k8s01"], cluster.nodes["k8s02"]
    assert cluster.api is not None
    bad = {"evil-outside": "172.31.5.0/24", "evil-half": "0.0.0.0/1", "evil-whole": "10.244.0.0/16",
           "evil-dup": "10.244.2.0/24", "evil-mine": "10.244.1.0/24", "evil-part": "10.244.2.128/25"}
    bad_macs = set()
    for i, (name, cidr) in enumerate(bad.items()):
        mac = "0a:00:00:00:0e:%02x" % i
        bad_macs.add(mac)
        cluster.api.add_node(name, pod_cidr=cidr, annotations=flannel_annotations("192.168.56.%d" % (200 + i), mac))
    started = time.monotonic()
    # A good node added after them: once it is in the kernel, the bad ones were processed too.
    cluster.api.add_node("good", pod_cidr="10.244.50.0/24",
                         annotations=flannel_annotations("192.168.56.250", "0a:00:00:00:00:50"))
    for node in (n1, n2):
        cluster.wait_for("%s to route to good" % node.name, lambda: "10.244.50.0/24" in routes(node), 20)
    print("good node programmed beside bad ones in %.1fs" % (time.monotonic() - started))
    time.sleep(1)
    for node in (n1, n2):
        dsts = routes(node)
        for cidr in ("172.31.5.0/24", "0.0.0.0/1", "10.244.0.0/16", "10.244.2.128/25"):
            assert cidr not in dsts, "%s routes %s" % (node.name, cidr)
        assert not flannel_macs(node) & bad_macs, node.name
        for name in bad:
            assert node.log().count('Ignoring node "%s"' % name) == 1, (node.name, name)
    # The rightful owners keep their subnets: pods still reach each other.
    p1, p2 = n1.pods[0], n2.pods[0]
    assert cluster.ping(p1, p2.ip, count=2) and cluster.ping(p2, p1.ip, count=2)
    for name in [*bad, "good"]:
        cluster.api.delete_node(name)


def test_own_public_ip_overwrite_that_is_not_an_ip(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes["k8s01"], cluster.nodes["k8s02"]
    assert cluster.api is not None
    key = PREFIX + "public-ip-overwrite"
    cluster.api.patch_node("k8s01", {"metadata": {"annotations": {key: "garbage"}}})
    cluster.wait_for("k8s01's warning", lambda: 'Ignoring annotation %s="garbage"' % key in n1.log(), 20)
    time.sleep(1)
    assert n1.proc is not None and n1.proc.poll() is None
    assert cluster.api.get_node("k8s01")["metadata"]["annotations"][PREFIX + "public-ip"] == n1.ip
    # A restart with the annotation in place starts normally.
    cluster.stop(n1)
    cluster.start(n1)
    cluster.wait_ready(n1)
    assert cluster.api.get_node("k8s01")["metadata"]["annotations"][PREFIX + "public-ip"] == n1.ip
    assert n1.log().count('Ignoring annotation %s="garbage"' % key) == 2  # once per process
    assert "Traceback" not in n1.log()
    assert cluster.ping(n2.pods[0], n1.pods[0].ip, count=2)
    cluster.api.patch_node("k8s01", {"metadata": {"annotations": {key: None}}})
