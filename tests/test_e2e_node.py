"""flannel v0.28.9's node-level behaviour, in one dual-stack cluster of namespaces: the blackhole routes
of --ip-blackhole-route, the node-public-ip annotation with a VXLAN device whose local end is that
address (as flanneld v0.28.9 makes it), and the external interface deleted and re-created with a new
index. Recovery times are printed (``pytest -s``)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from ipaddress import ip_network

import pytest

from tests.conftest import needs_netns
from tests.test_e2e import PREFIX, ip_json
from tests.test_faults_kernel import ReadyzWatch, _readyz
from tools.netcluster import HUB_IP6, Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns]

PUBLIC3 = "192.168.56.113"  # node 3's second address, pinned by its node-public-ip annotation


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("node"), prefix="pfn" + secrets.token_hex(2), stack="dual") as c:
        nodes = [c.add_node(name) for name in ("k8s01", "k8s02", "k8s03")]
        n3 = nodes[2]
        # As an admin pins a multi-homed node, and as flanneld v0.28.9 leaves its device: local end = public IP
        c.api.patch_node(n3.name, {"metadata": {"annotations": {PREFIX + "node-public-ip": PUBLIC3}}})
        Cluster.ns_run(n3.netns, "ip", "addr", "add", PUBLIC3 + "/24", "dev", "eth1")
        Cluster.ns_run(n3.netns, *("ip link add flannel.1 address 0a:58:00:00:00:03 type vxlan id 1 local %s dev eth1 "
                                   "nolearning dstport 8472" % PUBLIC3).split())
        for node in nodes:
            c.start(node, "--ip-blackhole-route")
        for i, node in enumerate(nodes):
            c.wait_ready(node)
            c.add_pod(node, "pod%d" % (i + 1))
        yield c


def blackholes(node: Node) -> list[tuple[str, str, int]]:
    return [(r["dst"], r.get("protocol", ""), r.get("metric", 0))
            for v in ("-4", "-6") for r in ip_json(node, "ip", v, "-j", "-d", "route", "show", "type", "blackhole")]


def entries(cluster: Cluster, node: Node) -> dict[str, set]:
    """What flannel.1 holds for the other nodes, and what their annotations ask for."""
    have = {(r["dst"], r.get("gateway")) for r in ip_json(node, "ip", "-j", "route", "show", "dev", "flannel.1")} | {
        (f["mac"], f.get("dst")) for f in ip_json(node, "bridge", "-j", "fdb", "show", "dev", "flannel.1")
        if f.get("dst")}
    want = set()
    for other in cluster.nodes.values():
        if other is node:
            continue
        obj = cluster.api.get_node(other.name)
        subnet = ip_network(obj["spec"]["podCIDRs"][0])
        ann = obj["metadata"]["annotations"]
        want |= {(str(subnet), str(subnet.network_address)),
                 (json.loads(ann[PREFIX + "backend-data"])["VtepMAC"], ann[PREFIX + "public-ip"])}
    return {"have": have, "want": want}


def pods_ping(cluster: Cluster, a: Node, b: Node) -> bool:
    pa, pb = a.pods[0], b.pods[0]
    return all(cluster.ping(src, dst, count=1, timeout=1) for src, dst in (
        (pa, pb.ip), (pb, pa.ip), (pa, pb.ip6), (pb, pa.ip6)))


def timed(cluster: Cluster, what: str, cond: object, timeout: float = 30) -> float:
    started = time.monotonic()
    cluster.wait_for(what, cond, timeout, 0.02)
    return time.monotonic() - started


def test_blackhole_routes_are_kept_and_the_bridge_route_still_wins(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes["k8s01"], cluster.nodes["k8s02"]
    assert blackholes(n1) == [("10.244.1.0/24", "boot", 1024), ("fd00:10:244:1::/64", "boot", 1024)]
    # the pods' bridge (cni0) routes the node's subnet before the blackhole route does
    assert pods_ping(cluster, n1, n2)
    mark = len(n1.log())
    Cluster.ns_run(n1.netns, "ip", "route", "del", "blackhole", "10.244.1.0/24", "metric", "1024")
    Cluster.ns_run(n1.netns, "ip", "-6", "route", "del", "blackhole", "fd00:10:244:1::/64", "metric", "1024")
    back = timed(cluster, "the blackhole routes back", lambda: len(blackholes(n1)) == 2)
    print("blackhole routes deleted: back after %.2fs (--iptables-resync=1)" % back)
    log = n1.log()[mark:]
    assert log.count("The blackhole route to 10.244.1.0/24 was deleted; added it again") == 1
    assert log.count("The blackhole route to fd00:10:244:1::/64 was deleted; added it again") == 1


def test_another_route_in_the_blackhole_route_s_place_is_said_once_and_left_alone(cluster: Cluster) -> None:
    n2 = cluster.nodes["k8s02"]
    mark = len(n2.log())
    # another agent's route takes the blackhole route's place (same destination and metric), atomically
    Cluster.ns_run(n2.netns, "ip", "route", "replace", "10.244.2.0/24", "dev", "eth1", "metric", "1024")
    time.sleep(3.5)  # three more looks
    said = [line for line in n2.log()[mark:].splitlines() if "Failed to setup blackhole route" in line]
    assert len(said) == 1 and "file exists: another route to 10.244.2.0/24 with metric 1024" in said[0], said
    assert ("10.244.2.0/24", "boot", 1024) not in blackholes(n2)
    Cluster.ns_run(n2.netns, "ip", "route", "del", "10.244.2.0/24", "dev", "eth1", "metric", "1024")
    back = timed(cluster, "the blackhole route back", lambda: ("10.244.2.0/24", "boot", 1024) in blackholes(n2))
    print("blackhole route: back %.2fs after the other route went" % back)


def test_node_public_ip_annotation_and_a_device_on_the_public_ip_are_taken(cluster: Cluster) -> None:
    n1, n3 = cluster.nodes["k8s01"], cluster.nodes["k8s03"]
    ann = cluster.api.get_node(n3.name)["metadata"]["annotations"]
    assert ann[PREFIX + "public-ip"] == PUBLIC3
    log = n3.log()
    assert ("Overriding public ip with '%s' from node annotation '%snode-public-ip'" % (PUBLIC3, PREFIX)) in log
    assert "List of node(k8s03) annotations: map[string]string{" in log
    link = ip_json(n3, "ip", "-j", "-d", "link", "show", "flannel.1")[0]
    assert link["address"] == "0a:58:00:00:00:03" and link["linkinfo"]["info_data"]["local"] == PUBLIC3
    assert json.loads(ann[PREFIX + "backend-data"])["VtepMAC"] == "0a:58:00:00:00:03"
    assert "already exists with incompatible configuration" not in log
    assert "Interface flannel.1 mac address set to:" not in log  # kept, not created
    e = entries(cluster, n1)
    assert e["have"] == e["want"] and ("0a:58:00:00:00:03", PUBLIC3) in e["have"]
    assert pods_ping(cluster, n1, n3)


def test_a_re_created_external_interface_gets_its_devices_and_entries_back(cluster: Cluster) -> None:
    """A VLAN, bond or tailscale0 restarted: eth1 deleted (the kernel deletes flannel.1 and flannel-v6.1 with
    it) and created again with a new index, its MAC and its addresses."""
    n1, n2 = cluster.nodes["k8s01"], cluster.nodes["k8s02"]
    eth1 = ip_json(n1, "ip", "-j", "link", "show", "eth1")[0]
    peer = "%sv1" % cluster.prefix
    mark = len(n1.log())
    Cluster.ns_run(n1.netns, "ip", "link", "del", "eth1")
    cluster.wait_for("/readyz 503", lambda: "503" in _readyz(n1), 10)
    cluster.wait_for("the error", lambda: "flannel.1 was deleted and could not be restored: external interface eth1 not "
                                          "found; waiting for it" in n1.log()[mark:], 10)
    watch = ReadyzWatch(n1)
    Cluster.ns_run(n1.netns, "ip", "link", "add", "eth1", "address", eth1["address"], "type", "veth",
                   "peer", "name", peer, "netns", cluster.hub)
    Cluster.ns_run(cluster.hub, "ip", "link", "set", peer, "master", "br0", "up")
    Cluster.ns_run(n1.netns, "ip", "addr", "add", n1.ip + "/24", "dev", "eth1")
    Cluster.ns_run(n1.netns, "ip", "addr", "add", "%s/64" % n1.ip6, "dev", "eth1")
    started = time.monotonic()
    Cluster.ns_run(n1.netns, "ip", "link", "set", "eth1", "up")
    Cluster.ns_run(n1.netns, "ip", "-6", "route", "add", "default", "via", HUB_IP6, "dev", "eth1")

    def restored() -> bool:
        e = entries(cluster, n1)
        v6 = ip_json(n1, "ip", "-j", "link", "show", "flannel-v6.1")
        return e["have"] == e["want"] and bool(v6) and "UP" in v6[0]["flags"]

    cluster.wait_for("flannel.1, flannel-v6.1 and their entries back", restored, 30, 0.02)
    kernel = time.monotonic() - started
    cluster.wait_for("pods to ping", lambda: pods_ping(cluster, n1, n2), 30, 0)
    pinged = time.monotonic() - started
    cluster.wait_for("/readyz 200", lambda: "200" in _readyz(n1), 10)
    statuses = watch.close()
    print("external interface re-created: devices and entries back %.2fs after it came up, pods ping after %.2fs, "
          "/readyz answered %s meanwhile" % (kernel, pinged, sorted(statuses)))
    new = ip_json(n1, "ip", "-j", "link", "show", "eth1")[0]["ifindex"]
    link = ip_json(n1, "ip", "-j", "-d", "link", "show", "flannel.1")[0]
    assert new != eth1["ifindex"] and link["linkinfo"]["info_data"]["link"] == "eth1"
    ann = cluster.api.get_node(n1.name)["metadata"]["annotations"]
    assert link["address"] == json.loads(ann[PREFIX + "backend-data"])["VtepMAC"]  # the MAC the others know
    log = n1.log()[mark:]
    assert "External interface eth1 was re-created (index %d, was %d); flannel.1 follows it" % (
        new, eth1["ifindex"]) in log
    for device, family in (("flannel.1", "IPv4"), ("flannel-v6.1", "IPv6")):
        # one line a state it went through: gone, then back without its address (or not, if that was quick)
        said = [line.split("] ", 1)[1] for line in log.splitlines() if "%s was deleted and could not" % device in line]
        assert said[0] == "%s was deleted and could not be restored: external interface eth1 not found; waiting " \
                          "for it" % device, said
        assert said[1:] in ([], ["%s was deleted and could not be restored: error getting %s addresses for eth1: no %s "
                                 "address found for given interface; waiting for it" % (device, family, family)]), said
    assert blackholes(n1) == [("10.244.1.0/24", "boot", 1024), ("fd00:10:244:1::/64", "boot", 1024)]
