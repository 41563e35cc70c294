"""The local demo: three nodes in network namespaces running pyflannel, a pod on each, pods pinging
across nodes over every family of the stack, a summary of what each node set up, and the first
node's datapath probes as `pyflannel check` shows them. Everything is removed at the end.

    python -m tools.demo [--nodes N] [--dual-stack | --ipv6-only] [--backend vxlan|host-gw] [--hold] [--etcd]

With --etcd the nodes run in etcd mode (IPv4 only) against a real etcd (Debian's etcd-server) in the
hub namespace instead of the Kubernetes API.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from ipaddress import IPv4Network

from tools.netcluster import ETCD_PREFIX, Cluster, Node

PREFIX = "flannel.alpha.coreos.com/"
# family -> (vxlan device, iproute2 flag, iptables-save, annotations)
FAMILIES = {4: ("flannel.1", "-4", "iptables-save", ("backend-data", "public-ip")),
            6: ("flannel-v6.1", "-6", "ip6tables-save", ("backend-v6-data", "public-ipv6"))}


def _lines(node: Node, *cmd: str) -> list[str]:
    return [line for line in Cluster.ns_run(node.netns, *cmd).stdout.splitlines() if line.strip()]


def _families(cluster: Cluster) -> list[int]:
    return [f for f, on in ((4, cluster.ipv4), (6, cluster.ipv6)) if on]


def summary(cluster: Cluster, node: Node, backend: str) -> str:
    """What pyflannel set up on a node: subnet.env, the lease (annotations or etcd key), and per family the
    device and entries."""
    eth1 = node.ip + (" " + node.ip6 if node.ip6 else "")
    ann: dict[str, str] = {}
    if cluster.etcd is not None:
        subnet = IPv4Network(cluster.subnet_env(node)["FLANNEL_SUBNET"], strict=False)
        key = "%s/subnets/%s-%d" % (ETCD_PREFIX, subnet.network_address, subnet.prefixlen)
        value = cluster.etcd.etcdctl("get", "--print-value-only", key).stdout.strip()
        out = ["== %s  (eth1 %s, lease %s)" % (node.name, eth1, subnet)]
        out.append("  subnet.env:   " + " ".join(node.subnet_file.read_text().split()))
        out.append("  etcd:         %s = %s" % (key, value))
    else:
        assert cluster.api is not None
        obj = cluster.api.get_node(node.name)
        ann = obj["metadata"]["annotations"]
        out = ["== %s  (eth1 %s, pod CIDRs %s)" % (node.name, eth1, " ".join(obj["spec"]["podCIDRs"]))]
        out.append("  subnet.env:   " + " ".join(node.subnet_file.read_text().split()))
    for family in _families(cluster):
        dev, flag, save, keys = FAMILIES[family]
        out.append("  -- IPv%d" % family)
        if cluster.etcd is None:
            out.append("  annotations:  " + " ".join("%s=%s" % (k, ann.get(PREFIX + k, "-")) for k in keys))
        if backend == "vxlan":
            out.append("  device:       " + " ".join(_lines(node, "ip", "-br", flag, "addr", "show", "dev", dev,
                                                            "scope", "global")[0].split()))
            cmds = (("routes", ("ip", flag, "route", "show", "dev", dev)),
                    ("neighbours", ("ip", flag, "neigh", "show", "dev", dev, "nud", "permanent")),
                    ("fdb", ("bridge", "fdb", "show", "dev", dev)))
        else:
            cmds = (("routes", ("ip", flag, "route", "show", "dev", "eth1")),)
        for title, cmd in cmds:
            # flannel's entries only: not the kernel's prefix routes nor the test bed's default route
            lines = [line for line in _lines(node, *cmd) if "proto kernel" not in line and not line.startswith("default")]
            for i, line in enumerate(lines):
                out.append("  %-13s %s" % (title + ":" if i == 0 else "", line))
        rules = [line for line in _lines(node, save) if line.startswith("-A") and "flannel" in line]
        out.append("  %-13s %d flannel rules (FLANNEL-POSTRTG, FLANNEL-FWD)" % (save.split("-")[0] + ":", len(rules)))
    return "\n".join(out)


def probe_results(cluster: Cluster, nodes: list[Node]) -> str:
    """The first node's datapath probes, as `pyflannel check` prints them, once every peer was probed."""
    peers = {n.name for n in nodes[1:]}

    def probed() -> bool:
        return all(peers <= {r["name"] for r in fam["recent"]} for fam in cluster.probes(nodes[0])["families"])

    cluster.wait_for("the first round of datapath probes", probed, 60)
    res = cluster.command(nodes[0], "check")
    lines = res.stdout.split("Node checks (pyflannel diagnose):")[0].splitlines()
    return "pyflannel check on %s (its datapath probes; diagnose's node checks follow in the full output):\n%s" % (
        nodes[0].name, "\n".join("  " + line for line in lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    stack = parser.add_mutually_exclusive_group()
    stack.add_argument("--dual-stack", dest="stack", action="store_const", const="dual", default="v4",
                       help="IPv4 and IPv6 (net-conf EnableIPv6, IPv6Network fd00:10:244::/56)")
    stack.add_argument("--ipv6-only", dest="stack", action="store_const", const="v6",
                       help='IPv6 only (net-conf "EnableIPv4": false)')
    parser.add_argument("--backend", choices=("vxlan", "host-gw"), default="vxlan")
    parser.add_argument("--hold", action="store_true", help="keep the cluster until Enter is pressed")
    parser.add_argument("--etcd", action="store_true", help="etcd mode: the leases in a real etcd in the hub")
    args = parser.parse_args()
    if args.etcd and args.stack != "v4":
        parser.error("--etcd runs IPv4 only: leave out --dual-stack and --ipv6-only")
    with tempfile.TemporaryDirectory(prefix="pyflannel-demo-") as tmp, \
            Cluster(tmp, stack=args.stack, backend={"Type": args.backend}, etcd=args.etcd) as cluster:
        mode = "--etcd-endpoints=%s" % cluster.etcd.url if cluster.etcd else "--kube-subnet-mgr"
        print("Starting %d nodes (namespaces %s-*), each running: pyflannel --ip-masq %s --iface=eth1"
              % (args.nodes, cluster.prefix, mode))
        print("net-conf.json: " + cluster.net_conf.read_text())
        nodes = [cluster.add_node("k8s%02d" % (i + 1)) for i in range(args.nodes)]
        for node in nodes:
            cluster.start(node)
        for node in nodes:
            cluster.wait_ready(node)
        pods = [cluster.add_pod(node, "pod%d" % (i + 1)) for i, node in enumerate(nodes)]
        print("Pods: " + ", ".join("%s on %s at %s" % (p.name, p.node.name, " ".join(p.ips)) for p in pods))
        print()
        for node in nodes:
            print(summary(cluster, node, args.backend))
        print()
        failures = total = 0
        for src in pods:
            row = []
            for dst in pods:
                if src is dst:
                    continue
                for ip in dst.ips:
                    ok = cluster.ping(src, ip, count=1)
                    failures += not ok
                    total += 1
                    row.append("%s %s" % (ip, "ok" if ok else "FAILED"))
            print("ping from %s (%s): %s" % (src.name, src.node.name, ", ".join(row)))
        print()
        print(probe_results(cluster, nodes))
        print()
        print("Node log (%s), first lines:" % nodes[0].name)
        for line in nodes[0].log().splitlines()[:14]:
            print("  " + line)
        if args.hold:
            input("\nCluster is up (namespaces: %s). Press Enter to tear it down. " % json.dumps(cluster.namespaces))
        print("\n%s: %d of %d pings answered" % ("OK" if not failures else "FAILED", total - failures, total))
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
