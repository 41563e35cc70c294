"""pyflannel's start-up in etcd mode under the kube-flannel manifest's limits (cpu 100m, memory 50 MiB).

    python -m bench.etcd [--leases 0,1000,5000] [--runs 3] [--limits on|off]

Run from the repository root, as root. Each run builds a tools.netcluster.Cluster in etcd mode (a
real etcd in the hub namespace) holding N other nodes' leases in flanneld's JSON, then starts ONE
real node's pyflannel in a fresh cgroup (bench.footprint's) and measures spawn -> /readyz (subnet.env
written and every lease's route, neighbour and FDB entry programmed), the cgroup's CPU seconds and
memory peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.footprint import PYTHON, Cgroup, cgroup_wrapper
from tools.netcluster import ETCD_PREFIX, Cluster

TXN_OPS = 100  # etcd's default limit is 128 operations a transaction


def put_leases(cluster: Cluster, n: int) -> None:
    """N leases of nodes that exist only in etcd, written as flanneld writes them."""
    assert cluster.etcd is not None
    puts = []
    for i in range(n):
        a, b = divmod(i + 1, 250)
        value = {"PublicIP": "192.168.%d.%d" % (100 + a, b + 1), "PublicIPv6": None, "BackendType": "vxlan",
                 "BackendData": {"VNI": 1, "VtepMAC": "0a:58:00:00:%02x:%02x" % (a, b)}}
        puts.append("put %s/subnets/10.%d.%d.0-24 %s\n" % (ETCD_PREFIX, 1 + a, b, json.dumps(json.dumps(value))))
    for start in range(0, n, TXN_OPS):
        cluster.etcd.etcdctl("txn", input="\n" + "".join(puts[start:start + TXN_OPS]) + "\n\n", timeout=60)


def run(n: int, limits: bool) -> tuple[float, float, float]:
    """Seconds to ready, CPU seconds and memory peak (MiB) of one start-up with N other leases."""
    with tempfile.TemporaryDirectory(prefix="pyflannel-bench-etcd-") as tmp:
        wrapper = cgroup_wrapper(Path(tmp) / "python-in-cgroup", PYTHON)
        with Cluster(Path(tmp) / "c", network="10.0.0.0/8", etcd=True, python=str(wrapper)) as cluster:
            put_leases(cluster, n)
            node = cluster.add_node("node")
            cgroup = Cgroup("pyflannel-bench-etcd", limits)
            try:
                start = time.monotonic()
                cluster.start(node, "--iptables-resync=5", "--datapath-resync=30",
                              env={"BENCH_CGROUP_PROCS": " ".join(cgroup.procs_files)})
                cluster.wait_ready(node, timeout=120)
                ready = time.monotonic() - start
                routes = Cluster.ns_run(node.netns, "ip", "route", "show", "dev", "flannel.1").stdout.splitlines()
                assert len(routes) == n, (len(routes), n)
                return ready, cgroup.cpu_seconds(), cgroup.memory_peak() / (1 << 20)
            finally:
                cluster.stop(node)
                cgroup.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leases", default="0,1000,5000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limits", choices=("on", "off"), default="on")
    args = parser.parse_args(argv)
    print("| other leases | ready (subnet.env and every lease programmed) | CPU to ready | memory peak |")
    print("|---|---|---|---|")
    for n in (int(x) for x in args.leases.split(",")):
        runs = [run(n, args.limits == "on") for _ in range(args.runs)]
        ready, cpu, mem = (statistics.median(r[i] for r in runs) for i in range(3))
        print("| %d | %.2f s | %.2f s | %.1f MiB |" % (n, ready, cpu, mem), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
