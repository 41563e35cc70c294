"""End to end in etcd mode: pyflannel processes in network namespaces keep their leases in a real etcd
(Debian's etcd-server, in the hub namespace), pods attached by the real CNI plugins ping across nodes."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tests.conftest import needs_netns
from tests.test_e2e import datapath
from tools.netcluster import ETCD_PORT, ETCD_PREFIX, Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns,
              pytest.mark.skipif(shutil.which("etcd") is None, reason="needs Debian's etcd-server")]

SUBNETS = ETCD_PREFIX + "/subnets/"
# A node's lease exactly as flanneld v0.20.2 writes it, for a node that is not running.
FLANNELD_KEY = SUBNETS + "10.244.77.0-24"
FLANNELD_VALUE = ('{"PublicIP":"192.168.56.77","PublicIPv6":null,"BackendType":"vxlan",'
                  '"BackendData":{"VNI":1,"VtepMAC":"9a:1c:2b:3d:4e:5f"}}')


def etcd_leases(cluster: Cluster) -> dict[str, dict]:
    """The leases in etcd, by subnet."""
    assert cluster.etcd is not None
    out = cluster.etcd.etcdctl("get", "--prefix", SUBNETS).stdout.splitlines()
    return {out[i][len(SUBNETS):].replace("-", "/"): json.loads(out[i + 1]) for i in range(0, len(out), 2)}


def own_subnet(node: Node) -> str:
    env = dict(line.split("=", 1) for line in node.subnet_file.read_text().splitlines())
    return str(IPv4Network(env["FLANNEL_SUBNET"], strict=False))


def expected(cluster: Cluster, node: Node) -> dict[str, set]:
    """What node's flannel.1 should hold: an entry for every other lease in etcd."""
    mine = own_subnet(node)
    routes, neigh, fdb = set(), set(), set()
    for subnet, attrs in etcd_leases(cluster).items():
        if subnet == mine:
            continue
        gw = subnet.split("/")[0]
        mac = attrs["BackendData"]["VtepMAC"]
        routes.add((subnet, gw))
        neigh.add((gw, mac))
        fdb.add((mac, attrs["PublicIP"]))
    return {"routes": routes, "neigh": neigh, "fdb": fdb}


def wait_converged(cluster: Cluster, nodes: list[Node], timeout: float = 30) -> float:
    """Wait until every node's datapath matches the leases in etcd; the seconds it took."""
    start = time.monotonic()
    for node in nodes:
        try:
            cluster.wait_for("%s's datapath to match the leases in etcd" % node.name,
                             lambda node=node: datapath(node) == expected(cluster, node), timeout)
        except TimeoutError:
            print("%s has %s\nwants %s\n%s" % (node.name, datapath(node), expected(cluster, node), cluster.logs()))
            raise
    return time.monotonic() - start


def all_ping(cluster: Cluster) -> bool:
    pods = [p for n in cluster.nodes.values() for p in n.pods]
    return all(cluster.ping(a, b.ip) for a in pods for b in pods if a.node is not b.node)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("etcd-cluster"), etcd=True) as c:
        # The nodes take random subnets below 10.244.64.0, so the leases written by hand above it are free.
        assert c.etcd is not None
        c.etcd.etcdctl("put", ETCD_PREFIX + "/config", json.dumps({**json.loads(c.net_conf.read_text()),
                                                                   "SubnetMax": "10.244.63.0"}))
        c.start_nodes_with_pods("n1", "n2", "n3")
        yield c


def test_leases_are_flanneld_json_and_pods_ping_across_nodes(cluster: Cluster) -> None:
    leases = etcd_leases(cluster)
    nodes = list(cluster.nodes.values())
    assert {own_subnet(n) for n in nodes} == set(leases)
    for node in nodes:
        attrs = leases[own_subnet(node)]
        mac = Cluster.ns_run(node.netns, "cat", "/sys/class/net/flannel.1/address").stdout.strip()
        raw = cluster.etcd.etcdctl("get", "--print-value-only", SUBNETS + own_subnet(node).replace("/", "-")).stdout
        assert raw.strip() == ('{"PublicIP":"%s","PublicIPv6":null,"BackendType":"vxlan",'
                               '"BackendData":{"VNI":1,"VtepMAC":"%s"}}' % (node.ip, mac))
        assert attrs["PublicIP"] == node.ip
        log = node.log()
        assert "Created subnet manager: Etcd Local Manager with Previous Subnet: None" in log
        assert "Allocated lease (ip: %s ipv6: ::/0) to current node (%s)" % (own_subnet(node), node.ip) in log
    wait_converged(cluster, nodes)
    assert all_ping(cluster)


def test_a_lease_written_by_hand_in_flanneld_format_is_programmed(cluster: Cluster) -> None:
    nodes = list(cluster.nodes.values())
    cluster.etcd.etcdctl("put", FLANNELD_KEY, FLANNELD_VALUE)
    took = wait_converged(cluster, nodes)
    for node in nodes:
        assert ("10.244.77.0/24", "10.244.77.0") in datapath(node)["routes"]
        assert ("9a:1c:2b:3d:4e:5f", "192.168.56.77") in datapath(node)["fdb"]
    print("a hand-written flanneld lease was programmed on every node in %.1fs" % took)
    # Garbage next to it is skipped with a warning; removing the lease removes its entries.
    cluster.etcd.etcdctl("put", SUBNETS + "10.244.78.0-24", '{"PublicIP":"not an IP"}')
    cluster.etcd.etcdctl("del", FLANNELD_KEY)
    cluster.etcd.etcdctl("del", SUBNETS + "10.244.78.0-24")
    wait_converged(cluster, nodes)
    assert all(("10.244.77.0/24", "10.244.77.0") not in datapath(n)["routes"] for n in nodes)
    assert all("Ignoring bad subnet node: 10.244.78.0-24: PublicIP: Invalid IP address format" in n.log()
               for n in nodes)


def test_a_node_that_joins_later_is_seen_by_everyone(cluster: Cluster) -> None:
    # flanneld v0.20.2 programmed none of the leases created after a node had started.
    late = cluster.add_node("n4")
    cluster.start(late)
    cluster.wait_ready(late)
    cluster.add_pod(late, "pod4")
    took = wait_converged(cluster, list(cluster.nodes.values()))
    print("the late node was programmed everywhere %.1fs after it was ready" % took)
    assert all_ping(cluster)


def test_etcd_down_for_a_while_loses_no_lease_and_no_datapath(cluster: Cluster) -> None:
    assert cluster.etcd is not None
    nodes = list(cluster.nodes.values())
    before = etcd_leases(cluster)
    cluster.etcd.stop()
    down = time.monotonic()
    try:
        # The datapath stays while etcd is away.
        while time.monotonic() - down < 30:
            assert all_ping(cluster)
            time.sleep(2)
    finally:
        cluster.etcd.start()
    back = time.monotonic()
    assert etcd_leases(cluster) == before
    assert all(n.proc is not None and n.proc.poll() is None for n in nodes)
    # A lease written after the restart reaches every node: their watches came back.
    cluster.etcd.etcdctl("put", FLANNELD_KEY, FLANNELD_VALUE)
    wait_converged(cluster, nodes, 60)
    print("etcd down for %.0fs; a new lease reached every node %.1fs after etcd was back" % (back - down,
                                                                                              time.monotonic() - back))
    cluster.etcd.etcdctl("del", FLANNELD_KEY)
    wait_converged(cluster, nodes)
    assert all_ping(cluster)


def test_a_black_holed_etcd_connection_is_detected_and_a_compacted_revision_survived(cluster: Cluster) -> None:
    assert cluster.etcd is not None
    node = cluster.nodes["n1"]
    others = [n for n in cluster.nodes.values() if n is not node]
    # Packets between n1 and etcd vanish, both ways, without a reset: as a dead link or NAT would.
    rules = [["INPUT", "-s", node.ip, "-p", "tcp", "--dport", str(ETCD_PORT), "-j", "DROP"],
             ["OUTPUT", "-d", node.ip, "-p", "tcp", "--sport", str(ETCD_PORT), "-j", "DROP"]]
    mark = len(node.log())
    for rule in rules:
        Cluster.ns_run(cluster.hub, "iptables", "-I", *rule)
    blocked = time.monotonic()
    try:
        cluster.etcd.etcdctl("put", FLANNELD_KEY, FLANNELD_VALUE)
        wait_converged(cluster, others)
        cluster.wait_for("n1 to notice its dead etcd connection", lambda: "Watch subnets: " in node.log()[mark:],
                         120, 0.5)
        print("n1 noticed the black-holed etcd connection after %.1fs" % (time.monotonic() - blocked))
        # While n1 is cut off, the lease changes again and etcd compacts its history past n1's revision.
        cluster.etcd.etcdctl("put", FLANNELD_KEY, FLANNELD_VALUE.replace("4e:5f", "4e:60"))
        rev = json.loads(cluster.etcd.etcdctl("-w", "json", "get", FLANNELD_KEY).stdout)["header"]["revision"]
        cluster.etcd.etcdctl("compaction", str(rev))
    finally:
        for rule in rules:
            Cluster.ns_run(cluster.hub, "iptables", "-D", *rule)
    unblocked = time.monotonic()
    took = wait_converged(cluster, [node], 120)
    print("n1 re-listed the compacted leases and programmed them %.1fs after the network came back" % took)
    assert "etcd index outside history window" in node.log()[mark:]
    cluster.etcd.etcdctl("del", FLANNELD_KEY)
    wait_converged(cluster, list(cluster.nodes.values()))


def test_sigterm_exits_cleanly_and_a_restart_keeps_the_lease(cluster: Cluster) -> None:
    # flanneld v0.20.2 panicked in its lease watch on SIGTERM.
    node = cluster.nodes["n2"]
    subnet = own_subnet(node)
    value = etcd_leases(cluster)[subnet]
    start = time.monotonic()
    assert cluster.stop(node, signal.SIGTERM) == 0
    assert time.monotonic() - start < 5
    assert "Exiting cleanly..." in node.log() and "Traceback" not in node.log()
    # As after a reboot: the device is gone. The new one keeps the VtepMAC of the lease.
    Cluster.ns_run(node.netns, "ip", "link", "del", "flannel.1")
    cluster.start(node)
    cluster.wait_ready(node)
    assert own_subnet(node) == subnet
    assert "Found lease (ip: %s ipv6: ::/0) for current IP (%s), reusing" % (subnet, node.ip) in node.log()
    assert etcd_leases(cluster)[subnet] == value
    wait_converged(cluster, list(cluster.nodes.values()))
    assert all_ping(cluster)


def test_a_deleted_lease_stops_the_daemon_as_flanneld_does(cluster: Cluster) -> None:
    node = cluster.nodes["n4"]
    cluster.etcd.etcdctl("del", SUBNETS + own_subnet(node).replace("/", "-"))
    assert node.proc is not None
    assert node.proc.wait(10) == 0
    assert "Lease has been revoked. Shutting down daemon." in node.log()
    assert "Exiting cleanly..." in node.log()
    cluster.nodes.pop("n4")
    wait_converged(cluster, list(cluster.nodes.values()))


def test_host_gw_in_etcd_mode(tmp_path: Path) -> None:
    # The per-family backends run under either subnet manager: host-gw's leases carry no BackendData,
    # as flanneld writes them, and the routes go via the peers' public IPs.
    with Cluster(tmp_path, etcd=True, backend={"Type": "host-gw"}) as c:
        a, b = c.add_node("h1"), c.add_node("h2")
        for node in (a, b):
            c.start(node)
        for node in (a, b):
            c.wait_ready(node)
        leases = etcd_leases(c)
        assert leases == {
            own_subnet(n): {"PublicIP": n.ip, "PublicIPv6": None, "BackendType": "host-gw"} for n in (a, b)}
        route = Cluster.ns_run(a.netns, "ip", "route", "show", own_subnet(b)).stdout
        assert "via %s dev eth1" % b.ip in route
        pa, pb = c.add_pod(a, "pa"), c.add_pod(b, "pb")
        assert c.ping(pa, pb.ip) and c.ping(pb, pa.ip)


def test_a_dual_stack_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    # Etcd mode is IPv4-only: the daemon says which key to change and waits for a config it runs.
    with Cluster(tmp_path, etcd=True, stack="dual") as c:
        node = c.add_node("d1")
        c.start(node)
        c.wait_for("the refusal", lambda: "Couldn't fetch network config: EnableIPv6: pyflannel's etcd mode runs "
                   "IPv4 only; set it to false (dual-stack runs with --kube-subnet-mgr)" in node.log())
        assert c.etcd is not None
        c.etcd.etcdctl("put", ETCD_PREFIX + "/config", json.dumps({"Network": str(c.network),
                                                                    "Backend": {"Type": "vxlan"}}))
        c.wait_ready(node)
        assert node.log().count("EnableIPv6: pyflannel's etcd mode") == 1
        assert list(etcd_leases(c)) == [own_subnet(node)]
