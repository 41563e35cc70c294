"""The local demo: three nodes in network namespaces running pyflannel, a pod on each, pods pinging
across nodes over every family of the stack, and a summary of what each node set up. Everything is
removed at the end.

    python -m tools.demo [--nodes N] [--dual-stack | --ipv6-only] [--backend vxlan|host-gw] [--hold]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from tools.netcluster import Cluster, Node

PREFIX = "flannel.alpha.coreos.com/"
# family -> (vxlan device, iproute2 flag, iptables-save, annotations)
FAMILIES = {4: ("flannel.1", "-4", "iptables-save", ("backend-data", "public-ip")),
            6: ("flannel-v6.1", "-6", "ip6tables-save", ("backend-v6-data", "public-ipv6"))}


def _lines(node: Node, *cmd: str) -> list[str]:
    return [line for line in Cluster.ns_run(node.netns, *cmd).stdout.splitlines() if line.strip()]


def _families(cluster: Cluster) -> list[int]:
    return [f for f, on in ((4, cluster.ipv4), (6, cluster.ipv6)) if on]


def summary(cluster: Cluster, node: Node, backend: str) -> str:
    """What pyflannel set up on a node: subnet.env, annotations, and per family the device and entries."""
    assert cluster.api is not None
    obj = cluster.api.get_node(node.name)
    ann = obj["metadata"]["annotations"]
    eth1 = node.ip + (" " + node.ip6 if node.ip6 else "")
    out = ["== %s  (eth1 %s, pod CIDRs %s)" % (node.name, eth1, " ".join(obj["spec"]["podCIDRs"]))]
    out.append("  subnet.env:   " + " ".join(node.subnet_file.read_text().split()))
    for family in _families(cluster):
        dev, flag, save, keys = FAMILIES[family]
        out.append("  -- IPv%d" % family)
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyflannel-demo-") as tmp, \
            Cluster(tmp, stack=args.stack, backend={"Type": args.backend}) as cluster:
        print("Starting %d nodes (namespaces %s-*), each running: pyflannel --ip-masq --kube-subnet-mgr --iface=eth1"
              % (args.nodes, cluster.prefix))
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
        print("Node log (%s), first lines:" % nodes[0].name)
        for line in nodes[0].log().splitlines()[:14]:
            print("  " + line)
        if args.hold:
            input("\nCluster is up (namespaces: %s). Press Enter to tear it down. " % json.dumps(cluster.namespaces))
        print("\n%s: %d of %d pings answered" % ("OK" if not failures else "FAILED", total - failures, total))
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
