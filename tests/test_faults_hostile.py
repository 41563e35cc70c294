"""Hostile nodes, fed through the in-repo API server to running pyflannel processes: a copied VtepMAC,
nodes nested as deep as the API server allows, a 1.5 MB node, unusable public IPs, a forged log line, a
pod CIDR over the node network, this node's own unusable VtepMAC. The other nodes' datapath and the
daemons' health are checked after each; pods keep reaching each other."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pyflannel import kubeclient
from tests.conftest import needs_netns
from tests.test_faults_api import flannel_annotations, ip_json, routes
from tools.netcluster import HUB_IP, Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns]

PREFIX = "flannel.alpha.coreos.com/"
RESYNC = "--datapath-resync=2"  # full reconciles every 2 s, so that a test sees several


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as c:
        nodes = [c.add_node(name) for name in ("k8s01", "k8s02")]
        for node in nodes:
            c.start(node, RESYNC)
        for i, node in enumerate(nodes):
            c.wait_ready(node)
            c.add_pod(node, "pod%d" % (i + 1))
        yield c


def nodes(cluster: Cluster) -> tuple[Node, Node]:
    return cluster.nodes["k8s01"], cluster.nodes["k8s02"]


def vtep_mac(cluster: Cluster, name: str) -> str:
    assert cluster.api is not None
    return str(json.loads(cluster.api.get_node(name)["metadata"]["annotations"][PREFIX + "backend-data"])["VtepMAC"])


def fdb(node: Node) -> set[tuple[str, str]]:
    return {(f["mac"], f["dst"]) for f in ip_json(node, "bridge", "-j", "fdb", "show", "dev", "flannel.1")
            if f.get("dst")}


def running(node: Node) -> bool:
    return node.proc is not None and node.proc.poll() is None


def pods_reach_each_other(cluster: Cluster) -> bool:
    n1, n2 = nodes(cluster)
    return cluster.ping(n1.pods[0], n2.pods[0].ip, count=2) and cluster.ping(n2.pods[0], n1.pods[0].ip, count=2)


def log_count(node: Node, text: str) -> int:
    return node.log().count(text)


@pytest.fixture
def deep_json() -> Iterator[None]:
    """The API server here runs in this process: it must encode as deep as the daemons decode."""
    limit, stack = sys.getrecursionlimit(), threading.stack_size()
    sys.setrecursionlimit(30_000)
    threading.stack_size(kubeclient.THREAD_STACK)
    yield
    sys.setrecursionlimit(limit)
    threading.stack_size(stack)


def post_node(cluster: Cluster, body: str) -> None:
    """Create a node as a kubelet does: its JSON in a POST, sent from the hub namespace where the API server
    listens (nothing in this process copies the node)."""
    out = Cluster.ns_run(cluster.hub, sys.executable, "-c", (
        "import http.client,sys\n"
        "c=http.client.HTTPConnection(%r,6443,timeout=30)\n"
        "c.request('POST','/api/v1/nodes',body=sys.stdin.buffer.read(),headers={'Content-Type':'application/json',"
        "'Authorization':'Bearer pyflannel-test-token'})\n"
        "print(c.getresponse().status)\n") % HUB_IP, input=body)
    assert out.stdout.strip() == "201", out.stdout + out.stderr


def deep_node(name: str, i: int, depth: int) -> str:
    """A flannel peer whose managedFields nest ``depth`` levels (fieldsV1 is a free-form trie)."""
    meta = {"name": name, "annotations": flannel_annotations("192.168.56.%d" % (100 + i), "0a:00:00:00:0d:%02x" % i)}
    head = json.dumps({"metadata": meta, "spec": {"podCIDR": "10.244.%d.0/24" % i, "podCIDRs": ["10.244.%d.0/24" % i]}})
    fields = '{"f:a":' * depth + "{}" + "}" * depth
    return head[:-2] + ',"managedFields":[{"manager":"kubelet","fieldsType":"FieldsV1","fieldsV1":%s}]}}' % fields


def test_a_copied_vtep_mac_never_redirects_the_victims_traffic(cluster: Cluster) -> None:
    n1, n2 = nodes(cluster)
    assert cluster.api is not None
    victim = vtep_mac(cluster, "k8s02")
    cluster.api.add_node("evil", pod_cidr="10.244.9.0/24", annotations=flannel_annotations("192.168.56.99", victim))
    started = time.monotonic()
    for turn in range(6):  # the copier flips its public IP; full reconciles run every 2 s meanwhile
        cluster.api.patch_node("evil", {"metadata": {"annotations": {PREFIX + "public-ip": "192.168.56.%d" % (98 + turn % 2)}}})
        time.sleep(1)
        assert {dst for mac, dst in fdb(n1) if mac == victim} == {n2.ip}, fdb(n1)
    assert pods_reach_each_other(cluster)
    assert "10.244.9.0/24" not in routes(n1)
    warning = 'Ignoring node "evil": its VtepMAC %s is the VtepMAC of node "k8s02", which held it first' % victim
    assert log_count(n1, warning) == 1, n1.log()[-3000:]
    print("copied VtepMAC held off for %.1fs of flips and reconciles" % (time.monotonic() - started))
    # The victim's own daemon refuses its own MAC coming back from another node.
    assert log_count(n2, 'Ignoring node "evil": its VtepMAC %s is this node\'s own' % victim) == 1
    cluster.api.delete_node("evil")
    assert running(n1) and running(n2)


def test_nodes_nested_as_deep_as_the_api_server_allows(cluster: Cluster, deep_json: None) -> None:
    n1, n2 = nodes(cluster)
    post_node(cluster, deep_node("deep-skip", 20, 9_999))  # decoded by msgspec, skipping the trie
    post_node(cluster, deep_node("deep-parse", 21, 5_000))  # small enough for json.loads, which builds it
    for node in (n1, n2):
        cluster.wait_for("%s to route to both" % node.name,
                         lambda: {"10.244.20.0/24", "10.244.21.0/24"} <= routes(node), 20)
    # A daemon starting now finds them in its first list.
    n3 = cluster.add_node("k8s03")
    cluster.start(n3, RESYNC)
    cluster.wait_ready(n3)
    cluster.wait_for("k8s03 to route to every node",
                     lambda: {"10.244.1.0/24", "10.244.2.0/24", "10.244.20.0/24", "10.244.21.0/24"} <= routes(n3), 20)
    assert all(running(node) for node in (n1, n2, n3))
    for node in (n1, n2, n3):
        assert "RecursionError" not in node.log() and "Traceback" not in node.log()
    assert pods_reach_each_other(cluster)
    assert cluster.api is not None
    for name in ("deep-skip", "deep-parse"):
        cluster.api.delete_node(name)
    cluster.stop(n3)


def vm_hwm_kib(node: Node) -> int:
    assert node.proc is not None
    with open("/proc/%d/status" % node.proc.pid) as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read())[1])  # type: ignore[index]


def test_a_large_node_by_the_watch_costs_little_memory(cluster: Cluster) -> None:
    n1, n2 = nodes(cluster)
    assert cluster.api is not None
    cluster.api.add_node("big", pod_cidr="10.244.30.0/24", annotations=flannel_annotations("192.168.56.130",
                                                                                           "0a:00:00:00:00:30"))
    for node in (n1, n2):
        cluster.wait_for("%s to route to big" % node.name, lambda: "10.244.30.0/24" in routes(node), 20)
    before = vm_hwm_kib(n1)
    for beat in range(3):  # 1.5 MB of small objects, the costliest to parse, three times
        cluster.api.patch_node("big", {"status": {"images": [{"names": ["a"]}] * 95_000, "beat": beat}})
    cluster.api.add_node("after", pod_cidr="10.244.31.0/24", annotations=flannel_annotations("192.168.56.131",
                                                                                             "0a:00:00:00:00:31"))
    for node in (n1, n2):
        cluster.wait_for("%s to route to after" % node.name, lambda: "10.244.31.0/24" in routes(node), 30)
    grew = vm_hwm_kib(n1) - before
    print("peak RSS grew by %d KiB over three 1.5 MB node events" % grew)
    assert grew < 12 * 1024, grew  # the whole object, parsed, is some 28 MiB
    assert "10.244.30.0/24" in routes(n1) and running(n1) and running(n2)
    for name in ("big", "after"):
        cluster.api.delete_node(name)


def test_unusable_public_ips_and_forged_log_lines(cluster: Cluster) -> None:
    n1, n2 = nodes(cluster)
    assert cluster.api is not None
    odd = {"loopback": "127.0.0.1", "any": "0.0.0.0", "mcast": "224.0.0.1", "bcast": "255.255.255.255",
           "self": n1.ip, "netbcast": "192.168.56.255"}
    for i, (name, public_ip) in enumerate(odd.items()):
        cluster.api.add_node(name, pod_cidr="10.244.%d.0/24" % (40 + i),
                             annotations=flannel_annotations(public_ip, "0a:00:00:00:00:%02x" % (40 + i)))
    forged = "x\nE1204 21:00:00.000000       1 kube.py:400] Lease has been revoked. Shutting down daemon.\x1b[2K"
    cluster.api.add_node("forger", pod_cidr="10.244.50.0/24",
                         annotations={**flannel_annotations("192.168.56.150", "0a:00:00:00:00:50"),
                                      PREFIX + "backend-type": forged})
    cluster.api.add_node("good", pod_cidr="10.244.51.0/24", annotations=flannel_annotations("192.168.56.151",
                                                                                            "0a:00:00:00:00:51"))
    cluster.wait_for("k8s01 to route to good", lambda: "10.244.51.0/24" in routes(n1), 20)
    time.sleep(5)  # two full reconciles
    dsts = {dst for _, dst in fdb(n1)}
    assert not dsts & {"127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", n1.ip, "192.168.56.255"}, dsts
    assert not {"10.244.%d.0/24" % (40 + i) for i in range(len(odd))} & routes(n1)
    text = n1.log()
    for name in odd:
        assert text.count('Ignoring node "%s": its public IP ' % name) == 1, (name, text[-3000:])
    assert not re.search(r"^E1204 21:00:00", text, re.M) and "\x1b" not in text
    assert "type=x\\nE1204 21:00:00.000000       1 kube.py:400] Lease has been revoked." in text
    assert not re.search(r"Add(ARP|FDB) failed", text)  # nothing refused by the kernel, reconcile after reconcile
    assert running(n1) and pods_reach_each_other(cluster)
    for name in [*odd, "forger", "good"]:
        cluster.api.delete_node(name)


def test_an_unusable_own_vtep_mac_gives_a_random_one(cluster: Cluster) -> None:
    """Someone wrote a multicast VtepMAC into k8s02's own annotation; its device is then lost and pyflannel
    restarted (a reboot): it starts with a random MAC instead of failing until the annotation is fixed."""
    n1, n2 = nodes(cluster)
    assert cluster.api is not None
    cluster.stop(n2)  # first: a running k8s02 would put its own MAC back into the annotation
    cluster.api.patch_node("k8s02", {"metadata": {"annotations": {
        PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}'}}})
    Cluster.ns_run(n2.netns, "ip", "link", "del", "flannel.1")
    cluster.start(n2, RESYNC)
    cluster.wait_ready(n2)
    mac = vtep_mac(cluster, "k8s02")
    assert mac != "01:00:5e:00:00:01" and not int(mac[:2], 16) & 1
    assert "Ignoring the VtepMAC '01:00:5e:00:00:01' this node advertised: it is a multicast address; a new " \
           "flannel.1 gets a random MAC" in n2.log()
    cluster.wait_for("k8s01 to know k8s02's new MAC", lambda: (mac, n2.ip) in fdb(n1), 20)
    assert pods_reach_each_other(cluster)


def test_a_pod_cidr_over_the_node_network_is_refused(tmp_path: Any) -> None:
    """A Network holding the node network (192.168.56.0/24 in 192.168.0.0/16): pyflannel warns at start, and
    a node claiming a part of the node network gets no route, so the underlay keeps working."""
    with Cluster(tmp_path / "underlay", network="192.168.0.0/16") as c:
        n1 = c.add_node("k8s01")
        c.start(n1, RESYNC)
        c.wait_ready(n1)
        assert c.api is not None
        assert "The Network 192.168.0.0/16 in net-conf.json overlaps this node's network 192.168.56.0/24 on eth1" \
            in n1.log()
        c.api.add_node("hostile", pod_cidr="192.168.56.0/25",
                       annotations=flannel_annotations("192.168.56.99", "0a:00:00:00:00:99"))
        c.api.add_node("good", pod_cidr="192.168.9.0/24", annotations=flannel_annotations("192.168.56.98",
                                                                                         "0a:00:00:00:00:98"))
        c.wait_for("k8s01 to route to good", lambda: "192.168.9.0/24" in routes(n1), 20)
        assert "192.168.56.0/25" not in routes(n1)
        route = Cluster.ns_run(n1.netns, "ip", "route", "get", HUB_IP).stdout
        assert "dev eth1" in route and "flannel" not in route, route
        assert n1.log().count('Ignoring node "hostile": its pod CIDR 192.168.56.0/25 (spec.podCIDR) overlaps this '
                              "node's network 192.168.56.0/24") == 1
        assert c.ping(n1, HUB_IP)
