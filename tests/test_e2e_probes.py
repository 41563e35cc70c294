"""End to end, the datapath probes: three pyflannel nodes in network namespaces probing each other
every second through flannel.1, faults injected on the underlay (the hub's bridge drops or corrupts
VXLAN packets with nftables), ``pyflannel check``, and a pod flooding a node's responder."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.conftest import needs_netns
from tools.netcluster import Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns]

FLAGS = ("--datapath-probe-interval=1", "--metrics-port=9101")


def get(node: Node, path: str, port: int = 8471, host: str = "127.0.0.1", netns: str = "") -> tuple[int, str]:
    """GET from inside the node's namespace (or another one): the status and body."""
    code = ("import urllib.request,urllib.error\ntry:\n r=urllib.request.urlopen('http://%s:%d%s',timeout=5)\n"
            " print(r.status);print(r.read().decode())\nexcept urllib.error.HTTPError as e:\n print(e.code)"
            % (host, port, path))
    out = Cluster.ns_run(netns or node.netns, "python3", "-c", code).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def latest(cluster: Cluster, node: Node) -> dict[str, str]:
    """Each peer's last outcome, by name."""
    return {r["name"]: r["outcome"] for r in cluster.probes(node)["families"][0]["recent"]}


def metric(node: Node, sample: str) -> float:
    text = get(node, "/metrics", 9101)[1]
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no %s in:\n%s" % (sample, text))


def hub_rules(cluster: Cluster, *rules: str) -> None:
    """Rules in the hub's bridge (the underlay between the nodes), or none."""
    Cluster.ns_run(cluster.hub, "nft", "delete", "table", "bridge", "underlay", check=False)
    if rules:
        body = "\n".join("    %s" % r for r in rules)
        Cluster.ns_run(cluster.hub, "nft", "-f", "-", input="table bridge underlay {\n  chain forward {\n"
                       "    type filter hook forward priority 0;\n%s\n  }\n}\n" % body)


def wait_line(cluster: Cluster, node: Node, pattern: str, what: str, timeout: float = 30) -> None:
    """Wait for a log line of the node matching the regex ``pattern``; on timeout, show its probe lines."""
    try:
        cluster.wait_for(what, lambda: re.search(pattern, node.log(), re.M), timeout)
    except TimeoutError:
        lines = [line for line in node.log().splitlines() if "probe.py" in line]
        raise AssertionError("timed out waiting for %s; %s's probe lines:\n%s" % (what, node.name, "\n".join(lines)))


def tx_checksum(node: Node) -> str:
    out = Cluster.ns_run(node.netns, "ethtool", "-k", "flannel.1").stdout
    return re.search(r"tx-checksum-ip-generic: (\w+)", out).group(1)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("probes")) as c:
        nodes = [c.add_node(name) for name in ("k8s01", "k8s02", "k8s03")]
        for node in nodes:
            c.start(node, *FLAGS)
        for node in nodes:
            c.wait_ready(node)
        for i, node in enumerate(nodes):
            c.add_pod(node, "pod%d" % (i + 1))
        yield c


def nodes(cluster: Cluster) -> list[Node]:
    return [cluster.nodes[n] for n in ("k8s01", "k8s02", "k8s03")]


def test_every_peer_answers_every_probe_and_check_says_so(cluster: Cluster) -> None:
    n1, n2, n3 = nodes(cluster)
    for node in (n1, n2, n3):
        others = {o.name for o in (n1, n2, n3) if o is not node}
        cluster.wait_for("%s's probes of %s" % (node.name, others),
                         lambda: latest(cluster, node) == {name: "ok" for name in others}, 30)
    fam = cluster.probes(n1)["families"][0]
    assert (fam["device"], fam["address"], fam["mtu"], fam["peers"], fam["problems"]) == (
        "flannel.1", "10.244.1.0", 1450, 2, [])
    r = fam["recent"][-1]
    assert r["tcp"] == "ok" and r["udp"] and r["full_size"] and 0 < r["rtt"] < 1
    assert metric(n1, 'pyflannel_probes_total{family="IPv4",protocol="udp_full_size"}') >= 2
    assert metric(n1, 'pyflannel_probe_rtt_seconds_count{family="IPv4"}') >= 2
    assert metric(n1, 'pyflannel_probe_peers_unreachable{family="IPv4"}') == 0
    assert metric(n1, 'pyflannel_vxlan_tx_checksum_offload{device="flannel.1"}') == 1
    res = cluster.command(n1, "check", *FLAGS)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^ok    IPv4 k8s02 10\.244\.2\.0 \(via 192\.168\.56\.12\): TCP [\d.]+ ms, UDP, full size 1450 bytes",
                     res.stdout, re.M), res.stdout
    assert "\nok    tx checksum offload of flannel.1: on (--vxlan-checksum-offload=auto)\n" in res.stdout
    assert "\nNode checks (pyflannel diagnose):\nok    flags: " in res.stdout


def test_probe_results_are_served_only_on_this_host(cluster: Cluster) -> None:
    n1 = nodes(cluster)[0]
    pod = n1.pods[0].netns
    assert get(n1, "/healthz", host="10.244.1.1", netns=pod)[0] == 200
    assert get(n1, "/probes", host="10.244.1.1", netns=pod)[0] == 404
    assert get(n1, "/probes", host=n1.ip)[0] == 200  # the node's own address, from the node


def test_an_unreachable_peer_is_said_once_then_its_recovery(cluster: Cluster) -> None:
    n1, n2, n3 = nodes(cluster)
    line = ("IPv4 peer k8s03 (10.244.3.0, via 192.168.56.13) is unreachable through flannel.1: no answer to TCP or UDP "
            "probes (2 rounds in a row); pods here cannot reach its pods; fix: allow UDP 8472 (VXLAN)")
    try:
        hub_rules(cluster, "ip saddr 192.168.56.13 udp dport 8472 drop")
        wait_line(cluster, n1, re.escape(line), "the unreachable line")
        assert metric(n1, 'pyflannel_probe_peers_unreachable{family="IPv4"}') == 1
        res = cluster.command(n1, "check", *FLAGS)
        assert res.returncode == 1
        assert ("\nFAIL  IPv4 peer k8s03 (10.244.3.0, via 192.168.56.13) is unreachable through flannel.1: no answer to "
                "TCP or UDP probes\n") in res.stdout, res.stdout
        assert "\n      Pods on this node cannot reach the pods of k8s03.\n" in res.stdout
    finally:
        hub_rules(cluster)
    wait_line(cluster, n1, re.escape("IPv4 peer k8s03 (10.244.3.0) is reachable again through flannel.1 (round trip"),
              "the recovery line")
    assert n1.log().count(line) == 1
    assert metric(n1, 'pyflannel_probe_peers_unreachable{family="IPv4"}') == 0


def test_lost_full_size_packets_are_said_with_the_mtu_fix(cluster: Cluster) -> None:
    n1 = nodes(cluster)[0]
    try:
        hub_rules(cluster, "ip saddr 192.168.56.12 udp dport 8472 meta length > 1000 drop")
        wait_line(cluster, n1, re.escape("IPv4 full-size packets (1450 bytes, DF) through flannel.1 are lost while "
                                         "small ones pass, to k8s02: the network between the nodes carries less than "
                                         "flannel.1's MTU; fix: set \"MTU\" in net-conf.json's Backend"),
                  "the full-size line")
        assert metric(n1, 'pyflannel_probe_peers_degraded{family="IPv4",problem="full_size"}') == 1
    finally:
        hub_rules(cluster)
    wait_line(cluster, n1, "IPv4 full-size probes through flannel.1 pass again", "the full-size probes to pass")


def test_the_checksum_offload_bug_is_seen_and_auto_turns_the_offload_off(cluster: Cluster) -> None:
    """k8s01's VXLAN packets that carry TCP arrive with a bad UDP checksum, as with the offload bug:
    its eth1 computes checksums in software, and the hub changes a byte of the inner TCP header
    after that. Pings and UDP pass; the receivers drop the rest and count Udp InCsumErrors."""
    n1, n2, n3 = nodes(cluster)
    assert tx_checksum(n1) == "on"
    Cluster.ns_run(n1.netns, "ethtool", "-K", "eth1", "tx", "off")
    try:
        hub_rules(cluster, "ip saddr 192.168.56.11 udp dport 8472 @th,312,8 6 @th,480,8 set 0x55")
        wait_line(cluster, n1, r"IPv4 TCP probes through flannel.1 fail while UDP passes, to k8s0[23](, k8s0[23])?"
                  r".*: the VXLAN checksum-offload bug; turned off tx checksum offload on flannel.1 \(as ethtool -K "
                  r"flannel.1 tx-checksum-ip-generic off; --vxlan-checksum-offload=auto\)$", "k8s01 to turn it off")
        assert tx_checksum(n1) == "off"
        wait_line(cluster, n2, r"the kernel counted \d+ UDP checksum errors \(Udp InCsumErrors\) in the last 2 rounds "
                  r"while flannel.1 carried traffic", "k8s02 to see the checksum errors")
        # Here the corruption goes on with the offload off: said once more, as not the offload bug.
        wait_line(cluster, n1, r"with tx checksum offload off on flannel.1: if every node has it off, something "
                  r"between the nodes drops or corrupts VXLAN packets", "the line saying it is not the offload")
        res = cluster.command(n1, "check", *FLAGS)
        assert re.search(r"^ok    tx checksum offload of flannel.1: off, turned off when the checksum-offload bug "
                         r"was seen: IPv4 TCP probes", res.stdout, re.M), res.stdout
        assert metric(n1, 'pyflannel_vxlan_tx_checksum_offload{device="flannel.1"}') == 0
    finally:
        hub_rules(cluster)
        Cluster.ns_run(n1.netns, "ethtool", "-K", "eth1", "tx", "on")
    wait_line(cluster, n1, "The VXLAN checksum errors are no longer seen", "the errors to end")
    cluster.wait_for("every probe to pass", lambda: latest(cluster, n1) == {"k8s02": "ok", "k8s03": "ok"}, 30)


def test_offload_off_turns_it_off_at_start_and_after_the_device_comes_back(cluster: Cluster) -> None:
    n3 = nodes(cluster)[2]
    cluster.stop(n3)
    Cluster.ns_run(n3.netns, "ip", "link", "del", "flannel.1")  # a fresh device, with the kernel's offload
    cluster.start(n3, *FLAGS, "--vxlan-checksum-offload=off")
    cluster.wait_ready(n3)
    assert "Turned off tx checksum offload on flannel.1 (as ethtool -K flannel.1 tx-checksum-ip-generic off, " \
           "--vxlan-checksum-offload=off)\n" in n3.log()
    assert tx_checksum(n3) == "off"
    Cluster.ns_run(n3.netns, "ip", "link", "del", "flannel.1")
    wait_line(cluster, n3, re.escape("--vxlan-checksum-offload=off) again: the device was re-created"),
              "the offload to be turned off again")
    assert tx_checksum(n3) == "off"
    cluster.wait_for("k8s03's probes", lambda: latest(cluster, n3) == {"k8s01": "ok", "k8s02": "ok"}, 30)


def test_a_pod_flooding_the_responder_gets_bounded_answers(cluster: Cluster) -> None:
    n1 = nodes(cluster)[0]
    flood = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
magic = b"pyflprb1"
junk = [b"GET / HTTP/1.0\\r\\n\\r\\n", magic, magic + b"\\0" * 9300]
for data in junk:
    s.sendto(data, ("10.244.1.0", 8473))
time.sleep(0.5)
stray = 0
while True:
    try:
        s.recv(65536); stray += 1
    except BlockingIOError:
        break
sizes, start, sent = set(), time.monotonic(), 0
while time.monotonic() - start < 2:
    try:
        s.sendto(magic + sent.to_bytes(8, "big") + b"\\0" * 1000, ("10.244.1.0", 8473)); sent += 1
    except BlockingIOError:
        time.sleep(0.001)
time.sleep(0.5)
answers = 0
while True:
    try:
        sizes.add(len(s.recv(65536))); answers += 1
    except BlockingIOError:
        break
print(stray, sent, answers, sorted(sizes), round(time.monotonic() - start, 2))
"""
    stray, sent, answers, sizes, elapsed = Cluster.ns_run(n1.pods[0].netns, "python3", "-c", flood).stdout.split(" ", 4)
    assert stray == "0", "junk, a bare magic and an oversized datagram get no answer"
    assert int(sent) > 1000
    assert 0 < int(answers) <= 100 + 50 * float(elapsed.split()[-1]) + 1
    assert sizes.startswith("[1016]"), "an answer is the request, never more"
    assert get(n1, "/healthz")[0] == 200
