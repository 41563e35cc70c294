"""pyflannel in nftables mode beside kube-proxy's nftables rules, under the kube-flannel manifest's limits.

    python -m bench.nftables [--services 0,10000] [--limits both|on|off] [--nodes 100] [--idle-seconds 60]
                             [--runs 1]

Run from the repository root, as root. Each run is bench.footprint's set-up (one real node namespace,
the other nodes only as API objects, the daemon in a fresh cgroup with or without the manifest's limits,
cpu 100m and memory 50 MiB, whose figures include the daemon's children) with ``"EnableNFTables": true``
and, loaded into the node's namespace before the daemon starts, kube-proxy's nftables-mode table for S
ClusterIP Services of one endpoint each (``kube_proxy_nft``: a chain per Service and per endpoint, two
rules in each, and the Service's address in a set and a verdict map, as kube-proxy v1.31 writes them).

Each run measures the time from spawn to subnet.env, to every peer's entries and to /readyz (flannel's
tables written), then the CPU over --idle-seconds of idling (the check runs every 5 s, the default),
the cgroup's memory peak (children and page cache included) and OOM kills, the traffic manager's errors
in the daemon's log, whether flannel's tables were in place at the end, and the seconds until a flushed
chain and a deleted table were back (repairs, also under the limits).

Then, per Service count, what the alternatives would cost beside the same ruleset, measured on nft
itself: a check that lists flannel's table with ``nft list table`` (CPU and peak RSS of the child), and a
write in flannel's own commands (``add table`` with a comment, ``add rule``), against pyflannel's
(``flush table`` and each chain with its rules in one ``add chain`` block).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from ipaddress import IPv4Network

from bench.footprint import (DAEMON_FLAGS, LIMITS, Cgroup, IdleResult, MiB, Setup, StartResult, emit, fmt, goal, idle,
                             median, outcomes, preamble, run_bench, table)
from bench.kubeproxy import idle_args, idle_parser

SERVICE_CIDR = IPv4Network("10.96.0.0/12")
ERRORS = ("Failed to setup masq rules", "Failed to ensure nftables rules", "no nftables support",
          "nftables: couldn't setup forward rules")
IDLE_GOAL = 5.0  # millicores, with the limits
MEMORY_GOAL = 2.0  # MiB above the peak without kube-proxy's rules
LOAD_TIMEOUT = 900.0  # seconds for nft -f of kube-proxy's rules (10,000 Services take about 25 s here)
REPAIR_TIMEOUT = 30.0
# flannel v0.28.9's own commands (knftables) for its IPv4 table, for the cost comparison.
FLANNEL_WRITE = """\
add table ip flannel-ipv4 { comment "rules for flannel-ipv4" ; }
add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority 100 ; comment "chain to manage traffic \
masquerading by flannel" ; }
flush chain ip flannel-ipv4 postrtg
add rule ip flannel-ipv4 postrtg meta mark 0x4000 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
add rule ip flannel-ipv4 postrtg ip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
add rule ip flannel-ipv4 postrtg ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
add chain ip flannel-ipv4 forward { type filter hook forward priority 0 ; comment "chain to accept flannel traffic" ; }
flush chain ip flannel-ipv4 forward
add rule ip flannel-ipv4 forward ip saddr 10.244.0.0/16 accept
add rule ip flannel-ipv4 forward ip daddr 10.244.0.0/16 accept
"""


# -- kube-proxy's rules ------------------------------------------------------------------------------


def _hash(text: str) -> str:
    """kube-proxy's chain-name hash: the first 8 characters of the base32 of the text's SHA-256."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:8]


def kube_proxy_nft(services: int, cluster_cidr: str) -> str:
    """The ``nft -f`` input of kube-proxy's (nftables mode) ``ip kube-proxy`` table for ``services``
    ClusterIP Services, each with one TCP port and one endpoint."""
    net = IPv4Network(cluster_cidr)
    lines = ['add table ip kube-proxy { comment "rules for kube-proxy" ; }']
    for chain, hook in (("filter-prerouting", "filter hook prerouting priority -110"),
                        ("filter-input", "filter hook input priority -110"),
                        ("filter-forward", "filter hook forward priority -110"),
                        ("filter-output", "filter hook output priority -110"),
                        ("filter-output-post-dnat", "filter hook output priority -90"),
                        ("nat-prerouting", "nat hook prerouting priority -100"),
                        ("nat-output", "nat hook output priority -100"),
                        ("nat-postrouting", "nat hook postrouting priority 100")):
        lines.append("add chain ip kube-proxy %s { type %s ; }" % (chain, hook))
    for chain in ("masquerading", "mark-for-masquerade", "services", "service-endpoints-check",
                  "nodeport-endpoints-check", "firewall-check", "reject-chain", "cluster-ips-check", "nodeports"):
        lines.append("add chain ip kube-proxy " + chain)
    lines += [
        'add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }',
        "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; "
        'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
        'add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort '
        'traffic" ; }',
        "add rule ip kube-proxy nat-prerouting jump services",
        "add rule ip kube-proxy nat-output jump services",
        "add rule ip kube-proxy nat-postrouting jump masquerading",
        "add rule ip kube-proxy masquerading meta mark & 0x00004000 == 0 return",
        "add rule ip kube-proxy masquerading meta mark set meta mark ^ 0x00004000",
        "add rule ip kube-proxy masquerading masquerade fully-random",
        "add rule ip kube-proxy mark-for-masquerade meta mark set meta mark | 0x00004000",
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check",
        "add rule ip kube-proxy filter-forward ct state new jump firewall-check",
        "add rule ip kube-proxy filter-output ct state new jump service-endpoints-check",
        "add rule ip kube-proxy filter-output ct state new jump firewall-check",
        "add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check",
        "add rule ip kube-proxy filter-input ct state new jump service-endpoints-check",
        "add rule ip kube-proxy reject-chain reject",
    ]
    for i in range(services):
        name = "bench-%d/svc-%05d" % (i // 1000, i)
        ip = SERVICE_CIDR.network_address + 10 + i
        endpoint = net.network_address + (1 << 8) + (i // 250 << 8) + i % 250 + 2
        svc = "service-%s-%s/tcp/http" % (_hash(name + "tcp"), name)
        sep = "endpoint-%s-%s/tcp/http__%s/8080" % (_hash(name + str(endpoint)), name, endpoint)
        lines += [
            "add chain ip kube-proxy " + svc,
            "add chain ip kube-proxy " + sep,
            "add rule ip kube-proxy %s ip daddr %s tcp dport 80 ip saddr != %s jump mark-for-masquerade"
            % (svc, ip, cluster_cidr),
            "add rule ip kube-proxy %s numgen random mod 1 vmap { 0 : goto %s }" % (svc, sep),
            "add rule ip kube-proxy %s ip saddr %s jump mark-for-masquerade" % (sep, endpoint),
            "add rule ip kube-proxy %s meta l4proto tcp dnat to %s:8080" % (sep, endpoint),
            "add element ip kube-proxy cluster-ips { %s }" % ip,
            "add element ip kube-proxy service-ips { %s . tcp . 80 : goto %s }" % (ip, svc),
        ]
    return "\n".join(lines) + "\n"


def load(netns: str, services: int, cluster_cidr: str) -> float:
    """Load kube-proxy's table into the namespace; the seconds it took."""
    started = time.monotonic()
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=kube_proxy_nft(services, cluster_cidr),
                   text=True, check=True, capture_output=True, timeout=LOAD_TIMEOUT)
    return time.monotonic() - started


def nft_cost(netns: str, *args: str, stdin: str = "", times: int = 1) -> tuple[float, float]:
    """(CPU ms per run, peak memory MB) of ``nft args`` in the namespace, run ``times`` times.

    Each run is measured in a cgroup of its own that the shell joins before it execs nft: a child's
    maximum RSS would count the bench's own pages, which a fork shares until the exec."""
    cpu, peak = 0.0, 0.0
    for i in range(times):
        cgroup = Cgroup("pyflannel-nftcost-%d-%d" % (os.getpid(), i), False)
        try:
            script = 'for f in %s; do echo $$ > "$f"; done; exec ip netns exec %s nft "$@"' % (
                " ".join(map(shlex.quote, cgroup.procs_files)), shlex.quote(netns))
            subprocess.run(["sh", "-c", script, "sh", *args], input=stdin, text=True, check=True, capture_output=True,
                           timeout=LOAD_TIMEOUT)
            cpu += cgroup.cpu_seconds() * 1000
            peak = max(peak, cgroup.memory_peak() / MiB)
        finally:
            cgroup.remove()
    return cpu / times, peak


def flannel_tables_in_place(netns: str) -> bool:
    """flannel's IPv4 table holds its two chains with their eight rules."""
    res = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", "ip", "flannel-ipv4"],
                         capture_output=True, text=True, timeout=60)
    return res.returncode == 0 and res.stdout.count(" return\n") == 4 and res.stdout.count(" accept\n") == 2 and \
        res.stdout.count(" masquerade") == 2


def time_to_repair(setup: Setup, *damage: str) -> float | None:
    """Seconds from ``nft damage`` until flannel's tables are in place again (None: not within the timeout)."""
    netns = setup.node.netns
    subprocess.run(["ip", "netns", "exec", netns, "nft", *damage], check=True, capture_output=True, timeout=60)
    started = time.monotonic()
    while time.monotonic() - started < REPAIR_TIMEOUT:
        if flannel_tables_in_place(netns):
            return time.monotonic() - started
        time.sleep(0.05)
    return None


# -- the runs ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    services: int
    limits: bool


@dataclasses.dataclass
class RunResult:
    start: StartResult
    ready: float | None  # seconds from spawn to /readyz
    idle: IdleResult | None
    repairs: tuple[float | None, float | None]  # flushed chain, deleted table
    oom_kills: int
    errors: int
    rules_ok: bool


def run(case: Case, args: argparse.Namespace, label: str) -> RunResult:
    """One daemon beside kube-proxy's table: start it, let it idle, damage its rules, read the figures."""
    with Setup(args.nodes, case.limits) as setup:
        loaded = load(setup.node.netns, case.services, str(setup.network))
        conf = json.loads(setup.cluster.net_conf.read_text())
        setup.cluster.net_conf.write_text(json.dumps({**conf, "EnableNFTables": True}))
        setup.start()
        start = setup.wait_ready(args.timeout, 0)
        ready = None
        if start.outcome == "ok":
            try:
                setup.cluster.wait_ready(setup.node, args.timeout)
                ready = time.time() - setup.t0
            except (TimeoutError, RuntimeError):
                start.outcome = setup.exit_outcome() or "never ready"
        after = None
        repairs: tuple[float | None, float | None] = (None, None)
        if ready is not None:
            setup.sleep(args.settle)
            after = idle(setup, args.idle_seconds)
            repairs = (time_to_repair(setup, "flush", "chain", "ip", "flannel-ipv4", "postrtg"),
                       time_to_repair(setup, "delete", "table", "ip", "flannel-ipv4"))
        log = setup.node.log()
        res = RunResult(start, ready, after, repairs, setup.cgroup.oom_kills(), sum(log.count(e) for e in ERRORS),
                        flannel_tables_in_place(setup.node.netns))
        if ready is None:
            emit("  log: " + setup.log_tail())
    line = "- %s S=%d (loaded in %.0f s) limits=%s: subnet.env %s s, ready %s s" % (
        label, case.services, loaded, "on" if case.limits else "off", fmt(start.subnet_env), fmt(ready))
    if after is not None:
        line += ", idle %s millicores, mem peak %s MiB, repairs %s s / %s s" % (
            fmt(after.millicores, 1), fmt(after.mem_end, 1), fmt(repairs[0]), fmt(repairs[1]))
    rules = "in place" if res.rules_ok else "MISSING"
    emit(line + ", OOM kills %d, errors %d, rules %s, %s" % (res.oom_kills, res.errors, rules,
                                                              after.outcome if after else start.outcome))
    return res


def row(case: Case, runs: list[RunResult], base_memory: float | None) -> list[str]:
    """One table row; ``base_memory`` is the median memory peak of the same case without kube-proxy's rules."""
    done = [r.idle for r in runs if r.idle is not None]
    mc = median([r.millicores for r in done])
    mem = median([r.mem_end for r in done])
    delta = mem - base_memory if mem is not None and base_memory is not None else None
    oom = sum(r.oom_kills for r in runs)
    return ["{:,}".format(case.services), "on" if case.limits else "off",
            fmt(median([r.start.subnet_env for r in runs])), fmt(median([r.ready for r in runs])),
            fmt(mc, 1), goal(mc, IDLE_GOAL) if case.limits else "", fmt(mem, 1),
            ("%+.1f" % delta if delta is not None else "—") + (" " + goal(delta, MEMORY_GOAL) if case.limits else ""),
            fmt(median([r.repairs[0] for r in runs])), fmt(median([r.repairs[1] for r in runs])),
            str(oom) + ((" ✓" if oom == 0 else " ✗") if case.limits else ""), str(sum(r.errors for r in runs)),
            "yes" if all(r.rules_ok for r in runs) else "no",
            outcomes([r.idle.outcome if r.idle else r.start.outcome for r in runs])]


def costs(services: int) -> list[str]:
    """One row of the cost comparison, in a namespace of its own with kube-proxy's table and flannel's."""
    netns = "pfnftcost-%d" % os.getpid()
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        load(netns, services, "10.244.0.0/16")
        _, write_flannel = nft_cost(netns, "-f", "-", stdin=FLANNEL_WRITE)
        _, write_ours = nft_cost(netns, "-f", "-", stdin=_ours())
        list_cpu, list_rss = nft_cost(netns, "list", "table", "ip", "flannel-ipv4", times=10)
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)
    return ["{:,}".format(services), fmt(list_cpu, 1), fmt(list_rss, 1), fmt(write_flannel, 1), fmt(write_ours, 1)]


def _ours() -> str:
    """pyflannel's write of the same table, once it exists: its chains refilled, each in one block."""
    return ("flush table ip flannel-ipv4\n"
            'add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority 100 ; comment "chain to manage '
            'traffic masquerading by flannel" ; meta mark 0x4000 return ; ip saddr 10.244.1.0/24 ip daddr '
            "10.244.0.0/16 return ; ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return ; ip saddr != 10.244.1.0/24 "
            "ip daddr 10.244.0.0/16 return ; ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random "
            "; ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random ; }\n"
            'add chain ip flannel-ipv4 forward { type filter hook forward priority 0 ; comment "chain to accept '
            'flannel traffic" ; ip saddr 10.244.0.0/16 accept ; ip daddr 10.244.0.0/16 accept ; }\n')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return idle_args(idle_parser("bench.nftables", __doc__, "0,10000"), argv)


def bench(args: argparse.Namespace) -> None:
    for line in [*preamble("pyflannel in nftables mode beside kube-proxy's nftables rules", "bench.nftables"), LIMITS]:
        emit(line)
    emit("- daemon: kube-flannel's command line with %s, \"EnableNFTables\": true, %d nodes"
         % (" ".join(DAEMON_FLAGS), args.nodes))
    emit("- kube-proxy: table ip kube-proxy, S ClusterIP Services of one endpoint each: 2 S chains, 4 S rules, "
         "S set and map elements")
    emit("\n## Runs\n")
    results: dict[Case, list[RunResult]] = {}
    for services in args.service_counts:
        for limits in args.modes:
            case = Case(services, limits)
            results[case] = [run(case, args, "run %d/%d" % (i + 1, args.runs)) for i in range(args.runs)]
    rows = []
    for case, runs in results.items():
        base = results.get(dataclasses.replace(case, services=0))
        base_memory = median([r.idle.mem_end for r in base if r.idle is not None]) if base else None
        rows.append(row(case, runs, base_memory))
    emit("\n## Idle beside kube-proxy's nftables rules: %d nodes, check every 5 s, %g s (median of %d)\n"
         % (args.nodes, args.idle_seconds, args.runs))
    emit(table(["Services", "limits", "subnet.env s", "ready s", "idle millicores", "goal", "mem peak MiB",
                "vs 0 Services MiB", "flushed chain back s", "deleted table back s", "OOM kills", "errors",
                "rules in place", "outcome"], rows))
    emit("\nGoals (under the limits): idle ≤ %g millicores, memory peak within %g MiB of the peak without "
         "kube-proxy's rules, no OOM kill. OOM kills count the daemon's children too. \"rules in place\": flannel's "
         "IPv4 table held its chains and rules at the end; the repairs are timed from the damage with the "
         "check every 5 s." % (IDLE_GOAL, MEMORY_GOAL))
    emit("\n## What nft itself costs beside kube-proxy's table (nft %s)\n" % subprocess.run(
        ["nft", "--version"], capture_output=True, text=True).stdout.split()[1])
    emit(table(["Services", "nft list table: CPU ms", "nft list table: peak MB", "flannel's write: peak MB",
                "pyflannel's write: peak MB"], [costs(n) for n in args.service_counts]))
    emit("\nA check through `nft list table ip flannel-ipv4` (10 runs, CPU per run) would grow with kube-proxy's "
         "chains; pyflannel reads flannel's tables over netlink instead. flannel's write (`add table` with a "
         "comment and `add rule`) makes nft read every table's chains and sets; pyflannel's (`flush table`, "
         "chains with their rules in `add chain` blocks, the table created over netlink) does not.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bench.nftables", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
