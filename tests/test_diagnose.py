"""``pyflannel diagnose``: each check, with the problem created in a namespace cluster (or a fake /proc)."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyflannel import diagnose, flags
from pyflannel.family import IPV4
from tests.conftest import needs_netns
from tests.fakenetlink import FakeNetlink
from tools.kubeapi import FakeKubeAPI
from tools.netcluster import REPO, Cluster, Node, socket_in_netns

PREFIX = "flannel.alpha.coreos.com/"
NETWORK = "10.244.0.0/16"


def annotations(public_ip: str, backend_type: str = "vxlan", vni: int = 1) -> dict[str, str]:
    """flannel's annotations as a running daemon writes them."""
    return {PREFIX + "kube-subnet-manager": "true", PREFIX + "backend-type": backend_type,
            PREFIX + "public-ip": public_ip,
            PREFIX + "backend-data": json.dumps({"VNI": vni, "VtepMAC": "0a:00:00:00:00:%02x" % vni},
                                                separators=(",", ":"))}


def fail_blocks(out: str) -> list[str]:
    """Each FAIL line with its indented lines, whitespace-normalised."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("FAIL  "):
            current = [line[6:]]
            blocks.append(current)
        elif line.startswith("      ") and current is not None:
            current.append(line.strip())
        else:
            current = None
    return [" ".join(b) for b in blocks]


def the_block(out: str, *needles: str) -> str:
    """The one FAIL block that contains every needle."""
    found = [b for b in fail_blocks(out) if all(n in b for n in needles)]
    assert len(found) == 1, "no single FAIL block with %s in:\n%s" % (needles, out)
    return found[0]


# --- the /proc checks, in-process with a fake /proc ------------------------------------------------

def proc_context(tmp_path: Path, files: dict[str, str]) -> diagnose.Context:
    for rel, value in files.items():
        path = tmp_path / "sys" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return diagnose.Context(flags.parse(["--kube-subnet-mgr"], {}), {}, proc=str(tmp_path))


def test_ip_forward_from_proc(tmp_path: Path) -> None:
    assert isinstance(diagnose.check_ip_forward(proc_context(tmp_path / "on", {"net/ipv4/ip_forward": "1"})), str)
    problems = diagnose.check_ip_forward(proc_context(tmp_path / "off", {"net/ipv4/ip_forward": "0"}))
    assert isinstance(problems, list) and len(problems) == 1
    assert problems[0].what.startswith("IP forwarding is off (net.ipv4.ip_forward = 0)")
    assert "sysctl -w net.ipv4.ip_forward=1" in problems[0].fix
    assert any("/etc/sysctl.d/" in f for f in problems[0].fix)


def test_br_netfilter_from_proc(tmp_path: Path) -> None:
    key = "net/bridge/bridge-nf-call-iptables"
    assert isinstance(diagnose.check_br_netfilter(proc_context(tmp_path / "on", {key: "1"})), str)
    missing = diagnose.check_br_netfilter(proc_context(tmp_path / "none", {"net/ipv4/ip_forward": "1"}))
    assert isinstance(missing, list) and len(missing) == 1
    assert missing[0].what.startswith("the br_netfilter module is not loaded")
    assert "modprobe br_netfilter" in missing[0].fix
    assert any("/etc/modules-load.d/" in f for f in missing[0].fix)
    off = diagnose.check_br_netfilter(proc_context(tmp_path / "off", {key: "0"}))
    assert isinstance(off, list) and "bridge-nf-call-iptables = 0" in off[0].what
    assert any("sysctl -w net.bridge.bridge-nf-call-iptables=1" in f for f in off[0].fix)


def test_free_subnet_skips_used_ones() -> None:
    from ipaddress import IPv4Network as N

    used = [N("10.244.0.0/24"), N("10.244.1.0/24"), N("10.244.3.0/24"), N("10.10.0.0/16")]
    assert diagnose._free_subnet(N(NETWORK), used) == N("10.244.2.0/24")
    assert diagnose._free_subnet(N("10.0.0.0/28"), [N("10.0.0.0/30")]) == N("10.0.0.4/30")
    assert diagnose._free_subnet(N("10.0.0.0/28"), [N("10.0.0.0/28")]) is None


def test_flags_outside_kube_mode_and_bad_prefix() -> None:
    ctx = diagnose.Context(flags.parse(["--kube-annotation-prefix=a/b/c"], {}), {})
    problems = diagnose.check_flags(ctx)
    assert isinstance(problems, list) and len(problems) == 2
    assert problems[0].what.startswith("--kube-subnet-mgr is not set")
    assert "prefix can contain at most single slash" in problems[1].what


def test_bad_flags_exit_2() -> None:
    assert diagnose.main(["--no-such-flag"], {}) == 2


# --- dual-stack, IPv6 and host-gw, in-process: the in-repo API server and a fake kernel --------------

V6_NETWORK = "fd00:10:244::/56"


def pod_cidrs(n: int, *families: str) -> list[str]:
    """Node n's pod CIDRs of the families named ("v4", "v6")."""
    return [{"v4": "10.244.%d.0/24" % n, "v6": "fd00:10:244:%x::/64" % n}[f] for f in families]


def host_gw_annotations(n: int, v4: str = "", v6: str = "") -> dict[str, str]:
    """What a host-gw daemon writes in dual-stack for node n (public IPs 192.168.56.1n and fd56::1n by default)."""
    return {PREFIX + "kube-subnet-manager": "true", PREFIX + "backend-type": "host-gw",
            PREFIX + "backend-data": "null", PREFIX + "public-ip": v4 or "192.168.56.%d" % (10 + n),
            PREFIX + "backend-v6-data": "null", PREFIX + "public-ipv6": v6 or "fd56::%d" % (10 + n)}


class Node6:
    """This node (k8s01) as diagnose sees it: the API server with the other nodes, a fake kernel with eth1
    (192.168.56.11/24, fd56::11/64, an IPv6 default route), a /proc with forwarding on, net-conf.json and
    subnet.env for a dual-stack host-gw network."""

    def __init__(self, tmp_path: Path, api: FakeKubeAPI, url: str) -> None:
        self.tmp, self.api, self.url = tmp_path, api, url
        self.nl = FakeNetlink()
        self.nl.ip_link_add("eth1").flags |= diagnose.IFF_LOWER_UP  # a carrier, which the fake kernel leaves out
        self.nl.ip_addr_add("eth1", "192.168.56.11/24")
        self.nl.ip_addr_add("eth1", "fd56::11/64")
        self.nl.ip_route_add("0.0.0.0/0", "192.168.56.1", "eth1")
        self.nl.ip_route_add("::/0", "fd56::1", "eth1")
        self.proc = {"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1",
                     "net/bridge/bridge-nf-call-iptables": "1", "net/bridge/bridge-nf-call-ip6tables": "1"}
        self.conf = {"Network": NETWORK, "IPv6Network": V6_NETWORK, "EnableIPv6": True, "Backend": {"Type": "host-gw"}}
        self.env = ("FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=%s\n"
                    "FLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n"
                    % (NETWORK, V6_NETWORK))
        for n in (1, 2, 3):
            self.add(n, pod_cidrs(n, "v4", "v6"), host_gw_annotations(n))

    def add(self, n: int, cidrs: list[str], ann: dict[str, str]) -> None:
        self.api.add_node("k8s%02d" % n, pod_cidr=cidrs[0], annotations=ann)
        self.api.patch_node("k8s%02d" % n, {"spec": {"podCIDRs": cidrs}})

    def context(self) -> diagnose.Context:
        """A Context over the state as it is now."""
        for rel, value in self.proc.items():
            path = self.tmp / "proc" / "sys" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value + "\n")
        (self.tmp / "net-conf.json").write_text(json.dumps(self.conf))
        (self.tmp / "subnet.env").write_text(self.env)
        opts = flags.parse(["--kube-subnet-mgr", "--iface=eth1", "--kube-api-url=%s" % self.url,
                            "--net-config-path=%s" % (self.tmp / "net-conf.json"),
                            "--subnet-file=%s" % (self.tmp / "subnet.env")], {})
        return diagnose.Context(opts, {"NODE_NAME": "k8s01"}, proc=str(self.tmp / "proc"), nl=self.nl)


@pytest.fixture
def node6(tmp_path: Path) -> Iterator[Node6]:
    api = FakeKubeAPI()
    url = api.start()
    try:
        yield Node6(tmp_path, api, url)
    finally:
        api.stop()


def problems_of(result: diagnose.Result) -> list[str]:
    """A check's problems as text (headline, explanation and fixes), [] when it passed."""
    if isinstance(result, str):
        return []
    return [" ".join([p.what.replace("\n", " ")] + p.fix) for p in result]


def test_a_healthy_dual_stack_host_gw_node_has_only_ok_lines(node6: Node6) -> None:
    out = io.StringIO()
    assert diagnose.run(node6.context(), out) == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert all(line.startswith("ok    ") for line in lines), out.getvalue()
    assert "ok    every node's public IP is on this node's L2 network (eth1: 192.168.56.0/24; fd56::/64)" in lines
    assert "ok    MTU: eth1 1500, pods 1500 (host-gw: the interface's MTU)" in lines


def test_a_healthy_ipv6_only_host_gw_node_has_only_ok_lines(node6: Node6) -> None:
    for n in (1, 2, 3):
        node6.api.delete_node("k8s%02d" % n)
        node6.add(n, pod_cidrs(n, "v6"), host_gw_annotations(n, v4="0.0.0.0"))  # flanneld's v6-only host-gw row
    node6.conf["EnableIPv4"] = False
    node6.env = "FLANNEL_IPV6_NETWORK=%s\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1500\n" \
                "FLANNEL_IPMASQ=true\n" % V6_NETWORK
    node6.proc["net/ipv4/ip_forward"] = "0"  # not needed
    out = io.StringIO()
    assert diagnose.run(node6.context(), out) == 0, out.getvalue()
    assert "ok    every node's public IP is on this node's L2 network (eth1: fd56::/64)" in out.getvalue().splitlines()


@pytest.mark.netns
@needs_netns
@pytest.mark.parametrize("stack,backend", [("dual", "vxlan"), ("v6", "vxlan"), ("dual", "host-gw")])
def test_healthy_nodes_of_each_stack_and_backend_have_only_ok_lines(tmp_path: Path, stack: str, backend: str) -> None:
    with Cluster(tmp_path, backend={"Type": backend}, stack=stack) as c:
        nodes = [c.add_node("k8s%02d" % i) for i in (1, 2)]
        for n in nodes:
            c.start(n)
        for n in nodes:
            c.wait_ready(n)
        code, out = run_diagnose(c, nodes[0])
    assert code == 0 and all(line.startswith("ok    ") for line in out.splitlines()), out


def test_nodes_without_an_ipv6_pod_cidr_in_a_dual_stack_network(node6: Node6) -> None:
    node6.api.delete_node("k8s01")
    node6.add(1, pod_cidrs(1, "v4"), host_gw_annotations(1))
    node6.add(4, pod_cidrs(4, "v4"), host_gw_annotations(4))
    ctx = node6.context()
    [own] = problems_of(diagnose.check_own_pod_cidr(ctx))
    assert own.startswith('node "k8s01" (this node) has no IPv6 pod CIDR (')
    assert "10.244.1.0/24), but net-conf.json enables IPv6 (IPv6Network %s)" % V6_NETWORK in own
    for text in (own, *problems_of(diagnose.check_other_pod_cidrs(ctx))):
        assert "--cluster-cidr=%s,%s" % (NETWORK, V6_NETWORK) in text
        assert "kubeadm init --pod-network-cidr=%s,%s" % (NETWORK, V6_NETWORK) in text
    [others] = problems_of(diagnose.check_other_pod_cidrs(ctx))
    assert others.startswith("nodes without an IPv6 pod CIDR, which net-conf.json enables (IPv6Network %s): "
                             "k8s04 (10.244.4.0/24)" % V6_NETWORK)


def test_ipv6_enabled_on_an_interface_without_a_global_ipv6_address_or_default_route(node6: Node6) -> None:
    assert problems_of(diagnose.check_ipv6_interface(node6.context())) == []
    node6.nl.ip_route_del("::/0")
    node6.nl.ip_addr_flush("eth1")
    node6.nl.ip_addr_add("eth1", "192.168.56.11/24")
    node6.nl.ip_addr_add("eth1", "fe80::11/64")
    link_local, no_default = problems_of(diagnose.check_ipv6_interface(node6.context()))
    assert link_local.startswith("interface eth1 has no global IPv6 address, only the link-local fe80::11")
    assert no_default.startswith("this node has no IPv6 default route")
    assert "ip -6 route add default via <router> dev eth1" in no_default
    node6.conf = {"Network": NETWORK, "Backend": {"Type": "host-gw"}}
    assert diagnose.check_ipv6_interface(node6.context()) == "IPv6 is not enabled in net-conf.json"


def test_ipv6_enabled_on_an_interface_without_any_ipv6_address(node6: Node6) -> None:
    node6.nl.ip_addr_flush("eth1")
    node6.nl.ip_addr_add("eth1", "192.168.56.11/24")
    [problem] = problems_of(diagnose.check_interface(node6.context()))
    assert problem.startswith("interface eth1 has no IPv6 address net-conf.json enables IPv6")
    assert "failed to find IPv6 address for interface eth1" in problem


def test_host_gw_peers_on_another_l2_network(node6: Node6) -> None:
    node6.add(4, pod_cidrs(4, "v4", "v6"), host_gw_annotations(4, v4="10.9.9.9", v6="fd99::9"))
    v4, v6 = problems_of(diagnose.check_host_gw_l2(node6.context()))
    assert v4.startswith("nodes whose IPv4 public IP is not on this node's L2 network (eth1: 192.168.56.0/24): "
                         "k8s04 (10.9.9.9)")
    assert v6.startswith("nodes whose IPv6 public IP is not on this node's L2 network (eth1: fd56::/64): "
                         "k8s04 (fd99::9)")
    assert '"DirectRouting": true' in v4 and PREFIX + "public-ipv6" in v6
    node6.conf["Backend"] = {"Type": "vxlan"}
    assert isinstance(diagnose.check_host_gw_l2(node6.context()), str)


def test_ipv6_forwarding_off(node6: Node6) -> None:
    node6.proc["net/ipv6/conf/all/forwarding"] = "0"
    [problem] = problems_of(diagnose.check_ip_forward(node6.context()))
    assert problem.startswith("IP forwarding is off (net.ipv6.conf.all.forwarding = 0)")
    assert "sysctl -w net.ipv6.conf.all.forwarding=1" in problem and "net.ipv6.conf.eth1.accept_ra=2" in problem
    node6.conf = {"Network": NETWORK, "Backend": {"Type": "host-gw"}}  # IPv4 only: not looked at
    assert diagnose.check_ip_forward(node6.context()) == "IP forwarding is on (net.ipv4.ip_forward = 1)"


# --- in a namespace cluster --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """k8s01 and k8s02 run pyflannel; k8s03 is a node namespace without a daemon, with the annotations
    and subnet.env a daemon would have written (but no flannel.1 yet)."""
    with Cluster(tmp_path_factory.mktemp("diagnose"), network=NETWORK) as c:
        for name in ("k8s01", "k8s02"):
            c.start(c.add_node(name))
        n3 = c.add_node("k8s03")
        assert c.api is not None
        c.api.patch_node("k8s03", {"metadata": {"annotations": annotations(n3.ip)}})
        n3.subnet_file.write_text("FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\n"
                                  "FLANNEL_IPMASQ=true\n" % NETWORK)
        for name in ("k8s01", "k8s02"):
            c.wait_ready(c.nodes[name])
        yield c


def run_diagnose(cluster: Cluster, node: Node, *extra: str, iface: str = "eth1", subnet_file: str | Path | None = None,
                 net_conf: str | Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``pyflannel diagnose`` with the daemon's flags inside the node's namespace; exit code and stdout."""
    args = [sys.executable, "-m", "pyflannel", "diagnose", "--kube-subnet-mgr", "--iface=%s" % iface,
            "--kubeconfig-file=%s" % cluster.kubeconfig, "--net-config-path=%s" % (net_conf or cluster.net_conf),
            "--subnet-file=%s" % (subnet_file or node.subnet_file), *extra]
    penv = {k: v for k, v in os.environ.items()
            if k not in ("NODE_NAME", "POD_NAME", "POD_NAMESPACE") and not k.startswith("FLANNELD_")}
    penv.update(NODE_NAME=node.name, PYTHONPATH=str(REPO))
    penv.update(env or {})
    res = cluster.ns_run(node.netns, *args, check=False, env=penv, timeout=60)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, res.stdout


@contextmanager
def api_nodes(cluster: Cluster, *nodes: tuple[str, str | None, dict[str, str] | None]) -> Iterator[None]:
    """Nodes that exist only in the API, for as long as the block runs."""
    assert cluster.api is not None
    try:
        for name, pod_cidr, ann in nodes:
            cluster.api.add_node(name, pod_cidr=pod_cidr, annotations=ann)
        yield
    finally:
        for name, _, _ in nodes:
            if name in cluster.api.node_names():
                cluster.api.delete_node(name)


@pytest.mark.netns
@needs_netns
def test_healthy_node_has_only_ok_lines(cluster: Cluster) -> None:
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"])
    lines = out.splitlines()
    assert code == 0, out
    assert lines and all(line.startswith("ok    ") for line in lines), out
    assert len(lines) == len(diagnose.CHECKS)
    assert 'ok    this node is "k8s01" (from NODE_NAME)' in lines
    assert "ok    UDP port 8472 is in use by flannel.1, flannel's own VXLAN device" in lines
    assert any(line.startswith("ok    MTU: eth1 1500, flannel.1 1450, pods 1450") for line in lines), out


@pytest.mark.netns
@needs_netns
def test_node_name_from_pod_via_the_api(cluster: Cluster) -> None:
    assert cluster.api is not None
    cluster.api.add_pod("kube-flannel", "kube-flannel-ds-x1", "k8s01")
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"],
                             env={"NODE_NAME": "", "POD_NAME": "kube-flannel-ds-x1", "POD_NAMESPACE": "kube-flannel"})
    assert code == 0, out
    assert 'ok    this node is "k8s01" (from the spec of pod kube-flannel/kube-flannel-ds-x1)' in out


@pytest.mark.netns
@needs_netns
def test_no_node_name(cluster: Cluster) -> None:
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"], env={"NODE_NAME": ""})
    assert code == 1
    block = the_block(out, "cannot tell which node this is")
    assert "env variables POD_NAME and POD_NAMESPACE must be set" in block and "fieldRef: spec.nodeName" in block
    assert "skip  this node's pod CIDR: needs this node's name" in out


@pytest.mark.netns
@needs_netns
def test_node_not_in_the_cluster(cluster: Cluster) -> None:
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"], env={"NODE_NAME": "k8s99"})
    assert code == 1
    assert 'failed to acquire lease: node "k8s99" not found' in the_block(out, '"k8s99"', "does not exist")


@pytest.mark.netns
@needs_netns
def test_nodes_without_pod_cidr(cluster: Cluster, tmp_path: Path) -> None:
    with api_nodes(cluster, ("k8s09", None, None), ("k8s10", None, None)):
        code, out = run_diagnose(cluster, cluster.nodes["k8s03"], subnet_file=tmp_path / "subnet.env",
                                 env={"NODE_NAME": "k8s09"})
    assert code == 1
    own = the_block(out, 'node "k8s09" (this node) has no pod CIDR')
    assert 'failed to acquire lease: node "k8s09" pod cidr not assigned' in own
    assert "--allocate-node-cidrs=true --cluster-cidr=%s" % NETWORK in own
    assert "kubeadm init --pod-network-cidr=%s" % NETWORK in own
    assert "kubectl patch node k8s09" in own and '"podCIDR":"10.244.0.0/24"' in own
    assert "FAIL  other nodes without a pod CIDR: k8s10" in out.splitlines()
    others = the_block(out, "other nodes without a pod CIDR: k8s10")
    assert "--allocate-node-cidrs=true" in others and "--pod-network-cidr=%s" % NETWORK in others


@pytest.mark.netns
@needs_netns
def test_pod_cidr_outside_the_network(cluster: Cluster) -> None:
    with api_nodes(cluster, ("k8s11", "10.10.1.0/24", annotations("192.168.56.211"))):
        code, out = run_diagnose(cluster, cluster.nodes["k8s01"])
    assert code == 1
    block = the_block(out, "pod CIDRs outside the Network %s of net-conf.json: k8s11 (10.10.1.0/24)" % NETWORK)
    assert "--cluster-cidr" in block and "Network agree" in block
    assert 'doesn\'t contain "10.10.1.0/24" PodCIDR of the "k8s11" node' in block
    assert len(fail_blocks(out)) == 1, out


@pytest.mark.netns
@needs_netns
def test_subnet_env_from_another_network(cluster: Cluster, tmp_path: Path) -> None:
    stale = tmp_path / "subnet.env"
    stale.write_text("FLANNEL_NETWORK=10.100.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n"
                     "FLANNEL_IPMASQ=true\n")
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"], subnet_file=stale)
    assert code == 1
    block = the_block(out, "says FLANNEL_NETWORK=10.100.0.0/16, but net-conf.json's Network is %s" % NETWORK)
    assert "stale" in block and "from the old network" in block and "restart pyflannel" in block
    assert len(fail_blocks(out)) == 1, out


@pytest.mark.netns
@needs_netns
def test_subnet_env_of_another_pod_cidr(cluster: Cluster, tmp_path: Path) -> None:
    other = tmp_path / "subnet.env"
    other.write_text("FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
                     % NETWORK)
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"], subnet_file=other)
    assert code == 1
    block = the_block(out, "has FLANNEL_SUBNET for 10.244.7.0/24, but this node's pod CIDR is 10.244.1.0/24")
    assert "restart pyflannel" in block
    assert len(fail_blocks(out)) == 1, out


@pytest.mark.netns
@needs_netns
def test_subnet_env_missing(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "flannel" / "subnet.env"
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"], subnet_file=path,
                             env={"POD_NAME": "kube-flannel-ds-x1", "POD_NAMESPACE": "kube-flannel"})
    assert code == 1
    block = the_block(out, "%s does not exist" % path)
    assert "CoreDNS" in block and "ContainerCreating" in block and "CrashLoopBackOff" in block
    assert "failed to load flannel 'subnet.env' file: open %s: no such file or directory" % path in block
    assert "on every pod ADD" in block
    assert "kubectl -n kube-flannel logs kube-flannel-ds-x1" in block
    assert "skip  subnet.env's FLANNEL_NETWORK: needs an existing subnet.env" in out


@pytest.mark.netns
@needs_netns
def test_interface_missing(cluster: Cluster) -> None:
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"], iface="eth9")
    assert code == 1
    block = the_block(out, "no interface matches --iface=eth9")
    assert "Could not find valid interface matching eth9" in block
    assert "eth1 (192.168.56.11)" in block
    assert "skip  MTU: needs a usable network interface" in out


@pytest.mark.netns
@needs_netns
def test_interface_without_ipv4_or_down(cluster: Cluster) -> None:
    n1 = cluster.nodes["k8s01"]
    Cluster.ns_run(n1.netns, "ip", "link", "add", "dg0", "type", "veth", "peer", "name", "dg1")
    try:
        code, out = run_diagnose(cluster, n1, iface="dg0")
        Cluster.ns_run(n1.netns, "ip", "addr", "add", "192.168.57.1/24", "dev", "dg0")
        down_code, down = run_diagnose(cluster, n1, iface="dg0")
    finally:
        Cluster.ns_run(n1.netns, "ip", "link", "del", "dg0")
    assert code == 1
    block = the_block(out, "interface dg0 has no IPv4 address")
    assert "failed to find IPv4 address for interface dg0" in block and "--iface" in block
    assert down_code == 1
    assert "ip link set dev dg0 up" in the_block(down, "interface dg0 is down")


@pytest.mark.netns
@needs_netns
def test_network_containing_the_node_address(cluster: Cluster, tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(json.dumps({"Network": "192.168.0.0/16", "Backend": {"Type": "vxlan"}}))
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"], net_conf=conf)
    assert code == 1
    block = the_block(out, "the Network 192.168.0.0/16 contains this node's own address 192.168.56.11 (on eth1)")
    assert "--cluster-cidr" in block


@pytest.mark.netns
@needs_netns
def test_vxlan_port_taken(cluster: Cluster) -> None:
    n3 = cluster.nodes["k8s03"]
    code, out = run_diagnose(cluster, n3)
    assert code == 0 and "ok    UDP port 8472 is free for flannel.1" in out, out
    sock = socket_in_netns(n3.netns, ("0.0.0.0", 8472), socket.SOCK_DGRAM)
    try:
        code, out = run_diagnose(cluster, n3)
    finally:
        sock.close()
    assert code == 1
    block = the_block(out, "UDP port 8472 (VXLAN) is taken by something other than flannel.1")
    assert "ss -ulpn 'sport = :8472'" in block and '"Port"' in block


@pytest.mark.netns
@needs_netns
def test_mtu_larger_than_the_underlay_allows(cluster: Cluster) -> None:
    n3 = cluster.nodes["k8s03"]
    Cluster.ns_run(n3.netns, "ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "eth1",
                   "local", n3.ip, "dstport", "8472")
    Cluster.ns_run(n3.netns, "ip", "link", "set", "eth1", "mtu", "1400")
    try:
        code, out = run_diagnose(cluster, n3)
    finally:
        Cluster.ns_run(n3.netns, "ip", "link", "del", "flannel.1")
        Cluster.ns_run(n3.netns, "ip", "link", "set", "eth1", "mtu", "1500")
    assert code == 1
    device = the_block(out, "flannel.1 has MTU 1450, more than eth1's MTU 1400 allows (1350")
    assert "ip link set dev flannel.1 mtu 1350" in device
    changed = the_block(out, "says FLANNEL_MTU=1450, but eth1's MTU 1400 gives 1350")
    assert "MTU changed since pyflannel started" in changed
    assert len(fail_blocks(out)) == 2, out


@pytest.mark.netns
@needs_netns
def test_ip_forward_off(cluster: Cluster) -> None:
    n3 = cluster.nodes["k8s03"]
    Cluster.ns_run(n3.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    try:
        code, out = run_diagnose(cluster, n3)
    finally:
        Cluster.ns_run(n3.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    assert code == 1
    block = the_block(out, "IP forwarding is off (net.ipv4.ip_forward = 0)")
    assert "fix: sysctl -w net.ipv4.ip_forward=1" in block
    assert len(fail_blocks(out)) == 1, out


@pytest.mark.netns
@needs_netns
def test_nodes_with_another_backend_or_vni(cluster: Cluster) -> None:
    with api_nodes(cluster, ("k8s12", "10.244.12.0/24", annotations("192.168.56.212", backend_type="host-gw")),
                   ("k8s13", "10.244.13.0/24", annotations("192.168.56.213", vni=2))):
        code, out = run_diagnose(cluster, cluster.nodes["k8s01"])
    assert code == 1
    kind = the_block(out, "nodes whose annotation %sbackend-type is not vxlan: k8s12 (host-gw)" % PREFIX)
    assert "Backend.Type" in kind
    vni = the_block(out, "nodes with another VXLAN VNI than this node's 1", "k8s13 (VNI 2)")
    assert "Backend.VNI" in vni
    assert len(fail_blocks(out)) == 2, out


@pytest.mark.netns
@needs_netns
def test_unregistered_node(cluster: Cluster) -> None:
    with api_nodes(cluster, ("k8s14", "10.244.14.0/24", None)):
        code, out = run_diagnose(cluster, cluster.nodes["k8s01"])
    assert code == 1
    assert "kubectl -n kube-flannel get pods -o wide" in the_block(out, "nodes flannel has not registered: k8s14")


@pytest.mark.netns
@needs_netns
def test_api_unreachable(cluster: Cluster) -> None:
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"], "--kube-api-url=http://192.168.56.1:1")
    assert code == 1
    block = the_block(out, "cannot reach the API server at http://192.168.56.1:1")
    assert "Connection refused" in block and "curl -k http://192.168.56.1:1/version" in block
    assert "skip  this node's pod CIDR: needs the node list from the API server" in out
    assert "ok    interface eth1 (192.168.56.11, MTU 1500)" in out
    assert ('ok    this node is "k8s01" (from NODE_NAME; not checked against the cluster, that needs the node list '
            "from the API server)") in out.splitlines()


@pytest.mark.netns
@needs_netns
def test_api_forbidden(cluster: Cluster) -> None:
    assert cluster.api is not None
    # The whole list is forbidden; this node is read as the daemon reads it, by a list with a field selector.
    cluster.api.fail_next("GET", r"^/api/v1/nodes\?(?!.*fieldSelector)", status=403)
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"])
    assert code == 1
    block = the_block(out, "the API server at http://192.168.56.1:6443 forbids listing the nodes (HTTP 403)")
    assert "nodes: list, watch; nodes/status: patch; pods: get" in block and "get, list" not in block
    assert "kubectl auth can-i list nodes" in block and "watch nodes" in block
    assert "skip  other nodes' backend: needs the node list from the API server" in out
    assert 'ok    node "k8s01" has the pod CIDR 10.244.1.0/24' in out.splitlines(), out


@pytest.mark.netns
@needs_netns
def test_net_conf_invalid(cluster: Cluster, tmp_path: Path) -> None:
    bad = tmp_path / "net-conf.json"
    bad.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"},}')
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"], net_conf=bad)
    assert code == 1
    block = the_block(out, "net-conf.json is invalid: error parsing subnet config: %s:" % bad)
    assert "kube-flannel-cfg" in block
    assert "skip  VXLAN UDP port: needs a valid net-conf.json" in out


@pytest.mark.netns
@needs_netns
def test_mtu_from_net_conf(cluster: Cluster, tmp_path: Path) -> None:
    n3 = cluster.nodes["k8s03"]
    conf = tmp_path / "net-conf.json"
    conf.write_text(json.dumps({"Network": NETWORK, "Backend": {"Type": "vxlan", "MTU": 1400}}))
    code, out = run_diagnose(cluster, n3, net_conf=conf)
    assert code == 1
    assert "restart pyflannel on this node so that it writes FLANNEL_MTU=1350" in \
        the_block(out, "says FLANNEL_MTU=1450, but net-conf.json's MTU 1400 gives 1350")
    assert len(fail_blocks(out)) == 1, out
    conf.write_text(json.dumps({"Network": NETWORK, "Backend": {"Type": "vxlan", "MTU": 9000}}))
    code, out = run_diagnose(cluster, n3, net_conf=conf)
    assert code == 1
    block = the_block(out, "net-conf.json's Backend MTU 9000 is more than eth1's MTU 1500: pyflannel uses 1500 "
                           "(flannel.1 and the pods 1450)")
    assert "flanneld would give the pods MTU 8950" in block
    assert len(fail_blocks(out)) == 1, out


@pytest.mark.netns
@needs_netns
def test_net_conf_multi_network_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(json.dumps({"Network": NETWORK, "Networks": ["10.99.0.0/16"], "Backend": {"Type": "vxlan"}}))
    code, out = run_diagnose(cluster, cluster.nodes["k8s01"], net_conf=conf)
    assert code == 1
    the_block(out, "net-conf.json is invalid: Networks: 10.99.0.0/16 differs from Network %s" % NETWORK)


def test_br_netfilter_for_ipv6_and_what_the_daemon_does(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(json.dumps({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00::/56",
                                "Backend": {"Type": "vxlan"}}))
    ctx = proc_context(tmp_path / "v6", {"net/bridge/bridge-nf-call-iptables": "1"})
    ctx.opts = flags.parse(["--kube-subnet-mgr", "--net-config-path=%s" % conf], {})
    missing = diagnose.check_br_netfilter(ctx)
    assert isinstance(missing, list) and len(missing) == 1
    assert "bridge-nf-call-ip6tables is missing" in missing[0].what
    assert "pyflannel waits for it, not ready (/readyz 503), after logging `Failed to check br_netfilter: stat " \
           in missing[0].what
    (tmp_path / "v6" / "sys" / "net" / "bridge" / "bridge-nf-call-ip6tables").write_text("0\n")
    off = diagnose.check_br_netfilter(ctx)
    assert isinstance(off, list) and off[0].what.startswith(
        "bridged traffic bypasses ip6tables (net.bridge.bridge-nf-call-ip6tables = 0)")
    assert off[0].fix == ["sysctl -w net.bridge.bridge-nf-call-ip6tables=1, and put net.bridge.bridge-nf-call-ip6tables "
                          "= 1 into /etc/sysctl.d/99-kubernetes.conf"]


def test_the_interface_check_takes_the_node_public_ip_annotation(node6: Node6) -> None:
    node6.nl.ip_link_add("eth2").flags |= diagnose.IFF_LOWER_UP
    node6.nl.ip_addr_add("eth2", "192.168.57.11/24")
    node6.api.patch_node("k8s01", {"metadata": {"annotations": {PREFIX + "node-public-ip": "192.168.57.11"}}})
    ctx = node6.context()
    ctx.opts = flags.parse(["--kube-subnet-mgr", "--kube-api-url=%s" % node6.url], {})  # no --iface
    assert ctx.interface().name == "eth2" and str(ctx.interface().addrs[IPV4].ext_addr) == "192.168.57.11"
    node6.api.patch_node("k8s01", {"metadata": {"annotations": {PREFIX + "node-public-ip": "eth2"}}})
    ctx = node6.context()
    assert problems_of(diagnose.check_interface(ctx))[0].count(
        "pyflannel stops with `Failed to find any valid interface to use: invalid public IP address: eth2 (node "
        "annotation 'flannel.alpha.coreos.com/node-public-ip')`") == 1
