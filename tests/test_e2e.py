"""End to end: pyflannel processes in network namespaces, pods attached by the real CNI plugins,
packets crossing VXLAN, and an API server with real state."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from tests.conftest import needs_netns
from tests.e2e_families import source_seen_by_hub
from tools.netcluster import Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns]

PREFIX = "flannel.alpha.coreos.com/"


def ip_json(node: Node, *args: str) -> list[dict]:
    out = Cluster.ns_run(node.netns, *args).stdout
    return json.loads(out) if out.strip() else []


def datapath(node: Node) -> dict[str, set]:
    """The node's flannel.1 routes, neighbours and FDB entries."""
    return {
        "routes": {(r["dst"], r.get("gateway")) for r in ip_json(node, "ip", "-j", "route", "show", "dev", "flannel.1")},
        "neigh": {(n["dst"], n.get("lladdr")) for n in ip_json(node, "ip", "-j", "neigh", "show", "dev", "flannel.1")},
        "fdb": {(f["mac"], f.get("dst")) for f in ip_json(node, "bridge", "-j", "fdb", "show", "dev", "flannel.1")
                if f.get("dst")},
    }


def expected_entries(cluster: Cluster, node: Node, others: list[Node]) -> dict[str, set]:
    routes, neigh, fdb = set(), set(), set()
    for other in others:
        ann = cluster.api.get_node(other.name)["metadata"]["annotations"]
        mac = json.loads(ann[PREFIX + "backend-data"])["VtepMAC"]
        subnet = IPv4Network(cluster.api.get_node(other.name)["spec"]["podCIDR"])
        routes.add((str(subnet), str(subnet.network_address)))
        neigh.add((str(subnet.network_address), mac))
        fdb.add((mac, other.ip))
    return {"routes": routes, "neigh": neigh, "fdb": fdb}


def iptables_save(node: Node) -> str:
    return Cluster.ns_run(node.netns, "iptables-save").stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as c:
        c.start_nodes_with_pods("k8s01", "k8s02", "k8s03")
        yield c


def base_nodes(cluster: Cluster) -> list[Node]:
    return [cluster.nodes[n] for n in ("k8s01", "k8s02", "k8s03")]


def wait_datapath(cluster: Cluster, node: Node, others: list[Node], timeout: float = 20) -> None:
    want = expected_entries(cluster, node, others)
    cluster.wait_for("%s's datapath to match %s" % (node.name, [o.name for o in others]),
                     lambda: datapath(node) == want, timeout)


def test_startup_writes_flanneld_state(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    env = n1.subnet_file.read_text()
    assert env == "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    ann = cluster.api.get_node("k8s01")["metadata"]["annotations"]
    assert ann[PREFIX + "kube-subnet-manager"] == "true"
    assert ann[PREFIX + "backend-type"] == "vxlan"
    assert ann[PREFIX + "public-ip"] == n1.ip
    assert re.fullmatch(r'\{"VNI":1,"VtepMAC":"([0-9a-f]{2}:){5}[0-9a-f]{2}"\}', ann[PREFIX + "backend-data"])
    conditions = cluster.api.get_node("k8s01")["status"]["conditions"]
    assert {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}.items() <= \
        [c for c in conditions if c["type"] == "NetworkUnavailable"][0].items()
    link = ip_json(n1, "ip", "-j", "-d", "link", "show", "flannel.1")[0]
    assert link["mtu"] == 1450
    info = link["linkinfo"]["info_data"]
    assert (info["id"], info["local"], info["port"], info.get("learning")) == (1, n1.ip, 8472, False)
    addrs = ip_json(n1, "ip", "-j", "-4", "addr", "show", "dev", "flannel.1")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs] == [("10.244.1.0", 32)]
    for node in (n1, n2, n3):
        wait_datapath(cluster, node, [o for o in (n1, n2, n3) if o is not node])
    saved = iptables_save(n1)
    assert '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG' in saved
    assert '-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN' in saved
    assert '-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT' in saved


def test_pods_ping_across_nodes(cluster: Cluster) -> None:
    pods = [p for n in base_nodes(cluster) for p in n.pods]
    for src in pods:
        for dst in pods:
            if src is not dst:
                assert cluster.ping(src, dst.ip, count=2), "%s cannot reach %s" % (src.name, dst.name)


def test_pod_traffic_to_the_underlay_is_masqueraded(cluster: Cluster) -> None:
    n1 = base_nodes(cluster)[0]
    assert source_seen_by_hub(cluster, n1.pods[0], 4) == (n1.ip, n1.ip)


def test_node_without_pod_cidr_waits_then_joins(cluster: Cluster) -> None:
    n4 = cluster.add_node("k8s04", pod_cidr=None)
    cluster.start(n4)
    try:
        cluster.wait_for("the pod CIDR error", lambda: 'failed to acquire lease: node "k8s04" pod cidr not assigned'
                         in n4.log(), 30)
        cluster.wait_for("the hint", lambda: "--allocate-node-cidrs=true" in n4.log(), 5)
        log = n4.log()
        assert "--cluster-cidr=10.244.0.0/16" in log and "--pod-network-cidr=10.244.0.0/16" in log
        time.sleep(1)
        assert n4.proc is not None and n4.proc.poll() is None, "pyflannel must keep waiting, not exit"
        assert not n4.subnet_file.exists()
        cluster.api.set_pod_cidr("k8s04", "10.244.4.0/24")
        cluster.wait_ready(n4, 30)
        pod = cluster.add_pod(n4, "pod4")
        for other in base_nodes(cluster):
            wait_datapath(cluster, other, [o for o in base_nodes(cluster) + [n4] if o is not other])
            assert cluster.ping(pod, other.pods[0].ip, count=2)
    finally:
        cluster.stop(n4)


def test_sigterm_while_waiting_for_a_pod_cidr_exits_cleanly(cluster: Cluster) -> None:
    n6 = cluster.add_node("k8s06", pod_cidr=None)
    cluster.start(n6)
    cluster.wait_for("the pod CIDR error", lambda: "pod cidr not assigned" in n6.log(), 30)
    started = time.monotonic()
    assert cluster.stop(n6, signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    cluster.api.delete_node("k8s06")


def test_deleted_node_entries_disappear(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    assert "k8s04" in cluster.api.node_names()
    cluster.api.delete_node("k8s04")
    for node in (n1, n2, n3):
        wait_datapath(cluster, node, [o for o in (n1, n2, n3) if o is not node])
        assert not any(r[0] == "10.244.4.0/24" for r in datapath(node)["routes"])


def test_hand_deleted_entries_come_back(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    want = expected_entries(cluster, n1, [n2, n3])
    mac2 = json.loads(cluster.api.get_node("k8s02")["metadata"]["annotations"][PREFIX + "backend-data"])["VtepMAC"]
    Cluster.ns_run(n1.netns, "ip", "route", "del", "10.244.2.0/24")
    Cluster.ns_run(n1.netns, "ip", "neigh", "del", "10.244.2.0", "dev", "flannel.1")
    Cluster.ns_run(n1.netns, "bridge", "fdb", "del", mac2, "dev", "flannel.1", "dst", n2.ip)
    cluster.wait_for("the datapath to be repaired", lambda: datapath(n1) == want, 15)
    assert cluster.ping(n1.pods[0], n2.pods[0].ip, count=2)


def test_flushed_iptables_rules_come_back(cluster: Cluster) -> None:
    n1 = base_nodes(cluster)[0]
    before = iptables_save(n1)
    Cluster.ns_run(n1.netns, "iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    Cluster.ns_run(n1.netns, "iptables", "-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment",
                   "flanneld forward", "-j", "FLANNEL-FWD")
    cluster.wait_for("the rules to come back", lambda: _rules(iptables_save(n1)) == _rules(before), 10)


def _rules(saved: str) -> list[str]:
    return sorted(line for line in saved.splitlines() if line.startswith("-A") and "flannel" in line)


def test_restart_is_hitless_and_duplicates_nothing(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    rules = _rules(iptables_save(n1))
    entries = datapath(n1)
    patches = cluster.api.count("PATCH", "/api/v1/nodes/k8s01")
    started = time.monotonic()
    assert cluster.stop(n1, signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    assert "Exiting cleanly" in n1.log()
    # SIGTERM leaves the datapath in place: pods keep their network during a rolling update.
    assert datapath(n1) == entries and _rules(iptables_save(n1)) == rules
    assert cluster.ping(n1.pods[0], n2.pods[0].ip)
    cluster.start(n1)
    cluster.wait_ready(n1)
    time.sleep(1.5)
    assert datapath(n1) == entries
    assert _rules(iptables_save(n1)) == rules
    assert len(ip_json(n1, "ip", "-j", "route", "show", "dev", "flannel.1")) == 2
    # Only the NetworkUnavailable condition is written again; the annotations did not change.
    assert cluster.api.count("PATCH", "/api/v1/nodes/k8s01") == patches + 1


def test_nodes_deleted_while_down_are_cleaned_up(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    n5 = cluster.add_node("k8s05")
    cluster.start(n5)
    cluster.wait_ready(n5)
    wait_datapath(cluster, n1, [n2, n3, n5])
    cluster.stop(n1)
    cluster.stop(n5)
    cluster.api.delete_node("k8s05")
    # A stray entry on flannel.1 (left by hand or by an older daemon) goes too.
    Cluster.ns_run(n1.netns, "ip", "route", "add", "10.244.99.0/24", "via", "10.244.99.0", "dev", "flannel.1", "onlink")
    cluster.start(n1)
    cluster.wait_ready(n1)
    wait_datapath(cluster, n1, [n2, n3])


def test_watch_drops_410_and_500_lose_nothing(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    api = cluster.api
    api.drop_watches()
    api.add_node("ghost1", pod_cidr="10.244.101.0/24", annotations={
        PREFIX + "kube-subnet-manager": "true", PREFIX + "backend-type": "vxlan", PREFIX + "public-ip": "192.168.56.201",
        PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"0a:00:00:00:00:01"}'})
    cluster.wait_for("ghost1's route", lambda: ("10.244.101.0/24", "10.244.101.0") in datapath(n1)["routes"], 15)
    # Every watch drops and the next attempts get 500; ghost1 goes while they are down, and then the
    # history goes too: the watches get 410 Gone and re-list, which is how they learn of the deletion.
    api.fail_next("GET", r"^/api/v1/nodes\?.*watch=", status=500, count=3)
    api.drop_watches()
    api.delete_node("ghost1")
    api.compact()
    cluster.wait_for("ghost1's route to go", lambda: all(r[0] != "10.244.101.0/24" for r in datapath(n1)["routes"]), 30)
    wait_datapath(cluster, n1, [n2, n3])
    # Three daemons share the injected failures, so look at them all.
    logs = "".join(n.log() for n in (n1, n2, n3))
    assert "Failed to watch nodes" in logs or "Failed to list nodes" in logs
    assert "listing the nodes again" in logs


def test_garbage_annotations_are_reported_and_skipped(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    api = cluster.api
    good = {PREFIX + "kube-subnet-manager": "true", PREFIX + "backend-type": "vxlan",
            PREFIX + "public-ip": "192.168.56.202", PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"0a:00:00:00:00:02"}'}
    api.add_node("junk1", pod_cidr="10.244.102.0/24", annotations=dict(good, **{PREFIX + "backend-data": "{{{"}))
    api.add_node("junk2", pod_cidr="10.244.103.0/24", annotations=dict(good, **{PREFIX + "public-ip": "not-an-ip"}))
    api.add_node("junk3", pod_cidr="10.244.104.0/24", annotations=dict(good, **{PREFIX + "backend-type": "host-gw"}))
    api.add_node("junk4", pod_cidr="garbage", annotations=good)
    try:
        cluster.wait_for("the errors", lambda: all(s in n1.log() for s in (
            "error decoding subnet lease JSON", 'Error turning node "junk2" to lease: Invalid IP address format',
            "ignoring non-vxlan v4Subnet(10.244.104.0/24)", 'Error turning node "junk4" to lease')), 15)
        time.sleep(1)
        wait_datapath(cluster, n1, [n2, n3])
        assert cluster.ping(n1.pods[0], n3.pods[0].ip)
        api.patch_node("junk1", {"metadata": {"annotations": {PREFIX + "backend-data": good[PREFIX + "backend-data"]}}})
        cluster.wait_for("junk1's route once fixed", lambda: ("10.244.102.0/24", "10.244.102.0") in datapath(n1)["routes"], 15)
    finally:
        for name in ("junk1", "junk2", "junk3", "junk4"):
            api.delete_node(name)
    wait_datapath(cluster, n1, [n2, n3])


def scrape(node: Node, port: int, path: str) -> str:
    code = ("import urllib.request,sys\ntry:\n r=urllib.request.urlopen('http://127.0.0.1:%d%s',timeout=3)\n"
            " print(r.status);print(r.read().decode())\nexcept urllib.error.HTTPError as e:\n print(e.code);print(e.read().decode())"
            % (port, path))
    return Cluster.ns_run(node.netns, "python3", "-c", code).stdout


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no metric %s in:\n%s" % (name, text))


def test_health_and_metrics_endpoints(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    assert scrape(n2, 8471, "/healthz") == "200\nflanneld is running\n"
    assert scrape(n2, 8471, "/readyz") == "200\nflanneld is ready\n"
    assert scrape(n2, 8471, "/nope").startswith("404\n404 page not found")
    cluster.stop(n2)
    cluster.start(n2, "--metrics-port=9101")
    cluster.wait_ready(n2)
    text = scrape(n2, 9101, "/metrics")
    assert metric(text, "pyflannel_ready") == 1
    assert metric(text, "pyflannel_leases") == 2
    assert 'pyflannel_build_info{version="' in text
    api = cluster.api
    api.add_node("metrics1", pod_cidr="10.244.110.0/24", annotations={
        PREFIX + "kube-subnet-manager": "true", PREFIX + "backend-type": "vxlan", PREFIX + "public-ip": "192.168.56.210",
        PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"0a:00:00:00:01:10"}'})
    cluster.wait_for("the new route", lambda: ("10.244.110.0/24", "10.244.110.0") in datapath(n2)["routes"], 10)
    api.delete_node("metrics1")
    cluster.wait_for("the route to go", lambda: all(r[0] != "10.244.110.0/24" for r in datapath(n2)["routes"]), 10)
    text = scrape(n2, 9101, "/metrics")
    assert metric(text, "pyflannel_network_programming_duration_seconds_count") >= 2
    assert metric(text, 'pyflannel_lease_events_total{type="added"}') >= 3
    assert metric(text, 'pyflannel_lease_events_total{type="removed"}') >= 1
    assert metric(text, "pyflannel_iptables_resyncs_total") >= 1
    assert metric(text, "pyflannel_datapath_reconciles_total") >= 1


def test_a_node_set_up_as_flanneld_does_interoperates(cluster: Cluster) -> None:
    """A rolling migration: a node whose state is what flanneld v0.20.2 writes (spec §10), made here with
    iproute2 and a node-status patch, and pyflannel nodes reach each other's pods."""
    n1, n2, n3 = base_nodes(cluster)
    fl = cluster.add_node("k8s07")
    subnet = IPv4Network(cluster.api.get_node("k8s07")["spec"]["podCIDR"])
    gw = str(subnet.network_address)
    mac = "6e:4b:3c:91:a2:10"
    for cmd in (f"ip link add flannel.1 address {mac} type vxlan id 1 local {fl.ip} dev eth1 nolearning",
                f"ip addr add {gw}/32 dev flannel.1", "ip link set flannel.1 up"):
        Cluster.ns_run(fl.netns, *cmd.split())
    for peer in (n1, n2, n3):
        ann = cluster.api.get_node(peer.name)["metadata"]["annotations"]
        peer_mac = json.loads(ann[PREFIX + "backend-data"])["VtepMAC"]
        peer_net = IPv4Network(cluster.api.get_node(peer.name)["spec"]["podCIDR"])
        peer_gw = str(peer_net.network_address)
        for cmd in (f"ip neigh replace {peer_gw} lladdr {peer_mac} dev flannel.1 nud permanent",
                    f"bridge fdb replace {peer_mac} dev flannel.1 dst {peer.ip} self permanent",
                    f"ip route replace {peer_net} via {peer_gw} dev flannel.1 onlink"):
            Cluster.ns_run(fl.netns, *cmd.split())
    fl.subnet_file.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=%s/%d\nFLANNEL_MTU=1450\n"
                              "FLANNEL_IPMASQ=true\n" % (subnet.network_address + 1, subnet.prefixlen))
    # flanneld's patch of nodes/<name>/status, byte for byte as in spec §3.2.
    cluster.api.patch_node("k8s07", {"metadata": {"annotations": {
        PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"%s"}' % mac, PREFIX + "backend-type": "vxlan",
        PREFIX + "kube-subnet-manager": "true", PREFIX + "public-ip": fl.ip}}})
    pod = cluster.add_pod(fl, "pod7")
    try:
        for node in (n1, n2, n3):
            wait_datapath(cluster, node, [o for o in (n1, n2, n3, fl) if o is not node])
            assert cluster.ping(pod, node.pods[0].ip, count=2), "flanneld-style pod cannot reach %s" % node.name
            assert cluster.ping(node.pods[0], pod.ip, count=2)
    finally:
        cluster.api.delete_node("k8s07")


def test_incompatible_device_is_recreated_with_the_advertised_mac(cluster: Cluster) -> None:
    n1, n2, n3 = base_nodes(cluster)
    mac = json.loads(cluster.api.get_node("k8s02")["metadata"]["annotations"][PREFIX + "backend-data"])["VtepMAC"]
    cluster.stop(n2)
    Cluster.ns_run(n2.netns, "ip", "link", "del", "flannel.1")
    Cluster.ns_run(n2.netns, "ip", "link", "add", "flannel.1", "type", "vxlan", "id", "2", "local", n2.ip,
                   "dev", "eth1", "dstport", "8472")
    cluster.start(n2)
    cluster.wait_ready(n2)
    assert '"flannel.1" already exists with incompatible configuration: vni: 2 vs 1; recreating device' in n2.log()
    link = ip_json(n2, "ip", "-j", "-d", "link", "show", "flannel.1")[0]
    assert link["linkinfo"]["info_data"]["id"] == 1
    assert link["address"] == mac, "a re-created device keeps the MAC the other nodes know"
    wait_datapath(cluster, n2, [n1, n3])
    assert cluster.ping(n2.pods[0], n1.pods[0].ip, count=2)
    assert cluster.ping(n3.pods[0], n2.pods[0].ip, count=2)
