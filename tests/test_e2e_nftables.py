"""End to end in nftables mode (``"EnableNFTables": true``): a dual-stack cluster of two nodes running
pyflannel in network namespaces, one pod on each. flannel's tables as v0.28.9 writes them, pods reaching
each other and the underlay (masqueraded) over both families, tables flushed or deleted put back within
one --iptables-resync, switching modes in both directions leaving no rule of the other, and a node
without nft."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.conftest import needs_netns
from tests.e2e_families import flannel_rules, pod_ip, source_seen_by_hub, underlay_ip
from tests.test_nftables import SPEC_V4, SPEC_V6
from tools.netcluster import Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns]


def set_mode(cluster: Cluster, nftables: bool) -> None:
    """net-conf.json's EnableNFTables, for the daemons started from now on."""
    conf = json.loads(cluster.net_conf.read_text())
    conf["EnableNFTables"] = nftables
    cluster.net_conf.write_text(json.dumps(conf))


def ruleset(node: Node) -> str:
    return Cluster.ns_run(node.netns, "nft", "list", "ruleset").stdout


def flannel_tables(node: Node) -> str:
    """flannel's two tables as ``nft list table`` prints them, IPv4 first ('' for a missing one)."""
    return "".join(Cluster.ns_run(node.netns, "nft", "list", "table", family, name, check=False).stdout
                   for family, name in (("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("nftables"), stack="dual") as c:
        set_mode(c, True)
        c.start_nodes_with_pods("k8s01", "k8s02")
        yield c


def test_ruleset_is_flannel_s(cluster: Cluster) -> None:
    """k8s01 has spec §4.2's pod CIDRs (10.244.1.0/24, fd00:10:244:1::/64): its whole nftables ruleset is
    flannel's text, and no iptables rule of flannel's exists."""
    n1 = cluster.nodes["k8s01"]
    assert ruleset(n1) == SPEC_V4 + SPEC_V6
    assert flannel_rules(n1, 4) == flannel_rules(n1, 6) == []
    log = n1.log()
    for line in ("Cleaning-up unused traffic manager rules", "Cleaning-up iptables rules...",
                 "Starting flannel in nftables mode...", "nftables: setting up masking rules (ipv4)",
                 "nftables: setting up masking rules (ipv6)", "Changing default FORWARD chain policy to ACCEPT (ipv6)"):
        assert "] " + line + "\n" in log, line


def test_pods_reach_each_other_and_the_underlay_masqueraded(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes["k8s01"], cluster.nodes["k8s02"]
    p1, p2 = n1.pods[0], n2.pods[0]
    for family in (4, 6):
        assert cluster.ping(p1, pod_ip(p2, family), count=2) and cluster.ping(p2, pod_ip(p1, family), count=2)
        seen, echoed = source_seen_by_hub(cluster, p1, family)
        assert seen == echoed == underlay_ip(n1, family), "IPv%d: the hub saw %r" % (family, seen)


@pytest.mark.parametrize("damage", [
    ["flush", "ruleset"], ["delete", "table", "ip", "flannel-ipv4"],
    ["flush", "chain", "ip6", "flannel-ipv6", "postrtg"],
], ids=["flush-ruleset", "delete-table", "flush-chain"])
def test_flushed_or_deleted_rules_come_back(cluster: Cluster, damage: list[str]) -> None:
    """Within one --iptables-resync (1 s here); flannel v0.28.9 writes its tables once and never looks again."""
    n1 = cluster.nodes["k8s01"]
    Cluster.ns_run(n1.netns, "nft", *damage)
    removed = time.monotonic()
    cluster.wait_for("flannel's tables to come back", lambda: flannel_tables(n1) == SPEC_V4 + SPEC_V6, 20, 0.05)
    print("nft %s: flannel's tables back in %.2fs (--iptables-resync=1)" % (" ".join(damage),
                                                                           time.monotonic() - removed))
    assert cluster.ping(n1.pods[0], pod_ip(cluster.nodes["k8s02"].pods[0], 4))


def test_switching_modes_leaves_no_rule_of_the_other(cluster: Cluster) -> None:
    """k8s02 restarted in iptables mode, then in nftables mode again: each start removes the other
    mode's rules, of both families."""
    n2 = cluster.nodes["k8s02"]
    try:
        for nftables in (False, True):
            cluster.stop(n2)
            set_mode(cluster, nftables)
            cluster.start(n2)
            cluster.wait_ready(n2)
            if nftables:
                cluster.wait_for("the iptables rules to go", lambda: flannel_rules(n2, 4) == flannel_rules(n2, 6) == [],
                                 20)
                assert "table ip flannel-ipv4" in ruleset(n2) and "table ip6 flannel-ipv6" in ruleset(n2)
            else:
                cluster.wait_for("flannel's tables to go", lambda: "flannel" not in ruleset(n2), 20)
                assert len(flannel_rules(n2, 4)) == len(flannel_rules(n2, 6)) == 10
            assert cluster.ping(n2.pods[0], pod_ip(cluster.nodes["k8s01"].pods[0], 6), count=2)
    finally:
        set_mode(cluster, True)
    log = n2.log()
    assert "] Deleted nftables table ip flannel-ipv4\n" in log and "] Deleted nftables table ip6 flannel-ipv6\n" in log
    assert "] Deleted ip6tables's chain FLANNEL-FWD and 1 rule(s) jumping to it from FORWARD\n" in log


def test_without_nft_the_node_says_so_and_is_not_ready(cluster: Cluster) -> None:
    """A node whose PATH has no nft: one error line naming the fix, /readyz 503, /healthz 200."""
    n3 = cluster.add_node("k8s03")
    path = n3.dir / "bin"
    path.mkdir()
    for name in ("ip", "iptables", "iptables-restore", "ip6tables", "ip6tables-restore"):
        found = shutil.which(name)
        assert found is not None
        (path / name).symlink_to(found)
    cluster.start(n3, env={"PATH": str(path)})
    try:
        cluster.wait_for("the error line", lambda: "] no nftables support: " in n3.log(), 30)
        assert "(nftables mode needs the nft binary; \"EnableNFTables\": false selects iptables mode)" in n3.log()
        assert (status(n3, "/readyz"), status(n3, "/healthz")) == (503, 200)
        assert n3.proc is not None and n3.proc.poll() is None
    finally:
        cluster.stop(n3)


def status(node: Node, path: str) -> int:
    res = Cluster.ns_run(node.netns, "python3", "-c",
                         "import urllib.request,urllib.error\n"
                         "try: print(urllib.request.urlopen('http://127.0.0.1:8471%s', timeout=5).status)\n"
                         "except urllib.error.HTTPError as e: print(e.code)" % path)
    return int(res.stdout.strip() or 0)
