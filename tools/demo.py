"""The local demo: three nodes in network namespaces running pyflannel, a pod on each, pods pinging
across nodes through VXLAN, and a summary of what each node set up. Everything is removed at the end.

    python -m tools.demo [--nodes N] [--hold] [--etcd]

With --etcd the nodes run in etcd mode against a real etcd (Debian's etcd-server) in the hub
namespace instead of the Kubernetes API.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from ipaddress import IPv4Network

from tools.netcluster import ETCD_PREFIX, Cluster, Node


def _lines(node: Node, *cmd: str) -> list[str]:
    return [line for line in Cluster.ns_run(node.netns, *cmd).stdout.splitlines() if line.strip()]


def summary(cluster: Cluster, node: Node) -> str:
    """What pyflannel set up on a node: subnet.env, the lease, the device, and the per-node kernel entries."""
    if cluster.etcd is not None:
        subnet = IPv4Network(cluster.subnet_env(node)["FLANNEL_SUBNET"], strict=False)
        key = "%s/subnets/%s-%d" % (ETCD_PREFIX, subnet.network_address, subnet.prefixlen)
        value = cluster.etcd.etcdctl("get", "--print-value-only", key).stdout.strip()
        out = ["== %s  (eth1 %s, lease %s)" % (node.name, node.ip, subnet)]
        out.append("  subnet.env:   " + " ".join(node.subnet_file.read_text().split()))
        out.append("  etcd:         %s = %s" % (key, value))
    else:
        ann = cluster.api.get_node(node.name)["metadata"]["annotations"]
        out = ["== %s  (eth1 %s, pod CIDR %s)" % (node.name, node.ip,
                                                  cluster.api.get_node(node.name)["spec"]["podCIDR"])]
        out.append("  subnet.env:   " + " ".join(node.subnet_file.read_text().split()))
        out.append("  annotation:   backend-data=%s public-ip=%s" % (ann["flannel.alpha.coreos.com/backend-data"],
                                                                   ann["flannel.alpha.coreos.com/public-ip"]))
    out.append("  device:       " + " ".join(_lines(node, "ip", "-br", "addr", "show", "dev", "flannel.1")[0].split()))
    for title, cmd in (("routes", ("ip", "route", "show", "dev", "flannel.1")),
                       ("neighbours", ("ip", "neigh", "show", "dev", "flannel.1")),
                       ("fdb", ("bridge", "fdb", "show", "dev", "flannel.1"))):
        for i, line in enumerate(_lines(node, *cmd)):
            out.append("  %-13s %s" % (title + ":" if i == 0 else "", line))
    rules = [line for line in _lines(node, "iptables-save") if line.startswith("-A") and "flannel" in line]
    out.append("  iptables:     %d flannel rules (FLANNEL-POSTRTG, FLANNEL-FWD)" % len(rules))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--hold", action="store_true", help="keep the cluster until Enter is pressed")
    parser.add_argument("--etcd", action="store_true", help="etcd mode: the leases in a real etcd in the hub")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyflannel-demo-") as tmp, Cluster(tmp, etcd=args.etcd) as cluster:
        mode = "--etcd-endpoints=%s" % cluster.etcd.url if cluster.etcd else "--kube-subnet-mgr"
        print("Starting %d nodes (namespaces %s-*), each running: pyflannel --ip-masq %s --iface=eth1"
              % (args.nodes, cluster.prefix, mode))
        nodes = [cluster.add_node("k8s%02d" % (i + 1)) for i in range(args.nodes)]
        for node in nodes:
            cluster.start(node)
        for node in nodes:
            cluster.wait_ready(node)
        pods = [cluster.add_pod(node, "pod%d" % (i + 1)) for i, node in enumerate(nodes)]
        print("Pods: " + ", ".join("%s on %s at %s" % (p.name, p.node.name, p.ip) for p in pods))
        print()
        for node in nodes:
            print(summary(cluster, node))
        print()
        failures = 0
        for src in pods:
            row = []
            for dst in pods:
                if src is dst:
                    continue
                ok = cluster.ping(src, dst.ip, count=1)
                failures += not ok
                row.append("%s %s" % (dst.name, "ok" if ok else "FAILED"))
            print("ping from %s (%s): %s" % (src.name, src.node.name, ", ".join(row)))
        print()
        print("Node log (%s), first lines:" % nodes[0].name)
        for line in nodes[0].log().splitlines()[:12]:
            print("  " + line)
        if args.hold:
            input("\nCluster is up (namespaces: %s). Press Enter to tear it down. " % json.dumps(cluster.namespaces))
        print("\n%s: %d of %d pings answered" % ("OK" if not failures else "FAILED",
                                                 len(pods) * (len(pods) - 1) - failures, len(pods) * (len(pods) - 1)))
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
