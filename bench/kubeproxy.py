"""pyflannel's iptables check beside kube-proxy's rules, under the kube-flannel manifest's limits.

    python -m bench.kubeproxy [--services 0,10000,20000] [--backends nft,legacy] [--limits both|on|off]
                              [--designs new,old] [--nodes 100] [--idle-seconds 60] [--runs 1]

Run from the repository root, as root. Each run is bench.footprint's set-up (one real node namespace,
the other nodes only as API objects, the daemon in a fresh cgroup with or without the manifest's limits,
cpu 100m and memory 50 MiB, whose figures include the daemon's children) with kube-proxy's iptables-mode
rules for S ClusterIP Services of one endpoint each loaded into the node's namespace before the daemon
starts (``kube_proxy_restore``: about five nat rules and two chains a Service, as kube-proxy v1.28 writes
them). The rules are loaded with the backend's own iptables-restore (iptables-nft-restore or
iptables-legacy-restore), and the daemon finds that backend's iptables, iptables-save and
iptables-restore first on its PATH.

The design "new" is this tree. "old" is the pyflannel package as it was at --baseline (default 0f9d847,
the last commit whose check saved whole tables with iptables-save, and whose rules were flanneld
v0.20.2's). Until flannel v0.28.9's rules came in, "old" was this tree with only that commit's
iptables.py, so that the two differed in the iptables check alone; the results of 2026-11-29 were
measured so.

Each run measures the time from spawn to subnet.env and to every peer's route, neighbour and FDB entry,
then the CPU over --idle-seconds of idling (the iptables check runs every 5 s, the default), the
cgroup's memory peak (memory.max_usage_in_bytes, children and page cache included), the cgroup's
OOM-kill count (children included), the iptables errors in the daemon's log, and whether flannel's
rules were in place at the end. Tables show medians of --runs runs.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from ipaddress import IPv4Network
from pathlib import Path

from bench.footprint import (DAEMON_FLAGS, LIMITS, OOM, IdleResult, Setup, StartResult, emit, fmt, goal, idle, median,
                             outcomes, preamble, run_bench, table)
from tools.netcluster import REPO

BASELINE = "0f9d847"
BACKENDS = {"nft": "xtables-nft-multi", "legacy": "xtables-legacy-multi"}
SERVICE_CIDR = IPv4Network("10.96.0.0/12")  # kube-apiserver's default --service-cluster-ip-range
ERRORS = ("Failed to ensure iptables rules", "Failed to bootstrap IPTables")
IDLE_GOAL = 5.0  # millicores, with the limits, on nf_tables
MEMORY_GOAL = 2.0  # MiB above the peak without kube-proxy's rules
LOAD_TIMEOUT = 120.0  # seconds for one iptables-restore while loading kube-proxy's rules
LOAD_RULES = 5000  # rules per iptables-restore while loading

# kube-proxy's jumps from the built-in chains (pkg/proxy/iptables/proxier.go, iptablesJumpChains): (table,
# chain, rule), inserted first with `iptables -I` when `iptables -C` does not find them.
JUMPS = (
    ("filter", "INPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service '
                        'portals" -j KUBE-EXTERNAL-SERVICES'),
    ("filter", "FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service '
                          'portals" -j KUBE-EXTERNAL-SERVICES'),
    ("filter", "INPUT", '-m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS'),
    ("filter", "FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
                          '-j KUBE-SERVICES'),
    ("filter", "OUTPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
                         '-j KUBE-SERVICES'),
    ("filter", "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
    ("filter", "FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
                          '-j KUBE-PROXY-FIREWALL'),
    ("nat", "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "POSTROUTING", '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'),
)


# -- kube-proxy's rules ------------------------------------------------------------------------------


def _hash(text: str) -> str:
    """kube-proxy's chain-name suffix: the first 16 characters of the base32 of the text's SHA-256."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def kube_proxy_restore(services: int, cluster_cidr: str, jumps: bool = True) -> str:
    """The iptables-restore --noflush input of a kube-proxy (iptables mode) full sync for ``services``
    ClusterIP Services, each with one TCP port and one endpoint, in the filter and nat tables.

    ``jumps`` adds kube-proxy's jumps from the built-in chains (kube-proxy inserts them with ``iptables
    -I``, separately); a sync that repeats leaves them out, since declaring kube-proxy's chains flushes only
    those.
    """
    chains, rules = [], []
    for i in range(services):
        name = "bench-%d/svc-%05d:http" % (i // 1000, i)
        ip = SERVICE_CIDR.network_address + 10 + i
        endpoint = "%s:8080" % (IPv4Network(cluster_cidr).network_address + (1 << 8) + (i // 250 << 8) + i % 250 + 2)
        svc, sep = "KUBE-SVC-" + _hash(name + "tcp"), "KUBE-SEP-" + _hash(name + "tcp" + endpoint)
        chains += [svc, sep]
        match = '-m comment --comment "%s cluster IP" -m tcp -p tcp -d %s --dport 80' % (name, ip)
        rules += [
            "-A KUBE-SERVICES %s -j %s" % (match, svc),
            "-A %s %s ! -s %s -j KUBE-MARK-MASQ" % (svc, match, cluster_cidr),
            '-A %s -m comment --comment "%s -> %s" -j %s' % (svc, name, endpoint, sep),
            "-A %s -m comment --comment %s -s %s -j KUBE-MARK-MASQ" % (sep, name, endpoint.split(":")[0]),
            "-A %s -m comment --comment %s -m tcp -p tcp -j DNAT --to-destination %s" % (sep, name, endpoint),
        ]

    def inserted(tbl: str) -> list[str]:
        return ["-I %s 1 %s" % (chain, rule) for t, chain, rule in JUMPS if t == tbl] if jumps else []

    lines = [
        "*filter",
        *(":%s - [0:0]" % c for c in ("KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD",
                                       "KUBE-PROXY-FIREWALL")),
        *inserted("filter"),
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        "--ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
        "*nat",
        *(":%s - [0:0]" % c for c in ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ",
                                       *chains)),
        *inserted("nat"),
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        *rules,
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in '
        'this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def binary(backend: str, name: str) -> str:
    """The backend's binary for ``name`` (iptables, iptables-save, iptables-restore), e.g. iptables-nft-save."""
    return name.replace("iptables", "iptables-" + backend, 1)


def split(restore: str, rules: int) -> list[str]:
    """``restore`` (iptables-restore --noflush input) as several inputs of at most ``rules`` rules a table
    that leave the same tables behind, applied in order.

    iptables-nft-restore's time grows with the square of a transaction's size: 20,000 Services take
    150 s in one transaction and a few seconds in pieces. A chain is declared (which creates or flushes
    it) in the piece that first names it; chains no rule names, in the first piece.
    """
    pieces: list[str] = []
    for block in restore.split("COMMIT\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        header, body = lines[0], lines[1:]
        declared = {line.split()[0][1:]: line for line in body if line.startswith(":")}
        ordered = [line for line in body if line.startswith(("-A ", "-I "))]
        named = {w for line in ordered for w in line.split()}
        pending = [line for chain, line in declared.items() if chain not in named]
        for start in range(0, max(len(ordered), 1), rules):
            chunk = ordered[start:start + rules]
            for line in chunk:
                words = line.split()
                for chain in (words[1], words[words.index("-j") + 1] if "-j" in words else ""):
                    if chain in declared:
                        pending.append(declared.pop(chain))
            pieces.append("\n".join([header, *pending, *chunk, "COMMIT"]) + "\n")
            pending = []
    return pieces


def load(netns: str, backend: str, services: int, cluster_cidr: str) -> None:
    """Load kube-proxy's rules for ``services`` Services into the namespace (in pieces, see ``split``)."""
    for piece in split(kube_proxy_restore(services, cluster_cidr), LOAD_RULES):
        subprocess.run(["ip", "netns", "exec", netns, binary(backend, "iptables-restore"), "--noflush", "--wait"],
                       input=piece, text=True, check=True, capture_output=True, timeout=LOAD_TIMEOUT)


def backend_bin(directory: Path, backend: str) -> Path:
    """A directory whose iptables, iptables-save and iptables-restore are the backend's multi-call binary."""
    multi = shutil.which(BACKENDS[backend])
    if multi is None:
        raise RuntimeError("%s not found: install Debian's iptables package" % BACKENDS[backend])
    directory.mkdir()
    for name in ("iptables", "iptables-save", "iptables-restore"):
        (directory / name).symlink_to(multi)
    return directory


def baseline_tree(directory: Path, commit: str) -> Path:
    """The pyflannel package as it was at ``commit``."""
    directory.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "pyflannel"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def flannel_rules_in_place(netns: str, backend: str, rules: int) -> bool:
    """FLANNEL-POSTRTG holds its ``rules`` rules (6 as flannel v0.28.9 writes them, 5 in v0.20.2) and
    POSTROUTING jumps to it once."""
    def listing(chain: str) -> list[str]:
        res = subprocess.run(["ip", "netns", "exec", netns, binary(backend, "iptables"), "--wait", "-t", "nat",
                              "-S", chain], capture_output=True, text=True, timeout=120)
        return res.stdout.splitlines() if res.returncode == 0 else []

    own = [line for line in listing("FLANNEL-POSTRTG") if line.startswith("-A ")]
    jumps = [line for line in listing("POSTROUTING") if line.endswith("-j FLANNEL-POSTRTG")]
    return len(own) == rules and len(jumps) == 1


# -- the runs ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str
    services: int
    limits: bool
    design: str


@dataclasses.dataclass
class RunResult:
    start: StartResult
    idle: IdleResult | None
    oom_kills: int
    errors: int  # iptables error lines in the daemon's log
    rules_ok: bool


def run(case: Case, args: argparse.Namespace, work: Path, pythonpath: dict[str, dict[str, str]],
        label: str) -> RunResult:
    """One daemon beside kube-proxy's rules: start it, let it idle, read the figures."""
    with Setup(args.nodes, case.limits) as setup:
        load(setup.node.netns, case.backend, case.services, str(setup.network))
        bindir = work / ("bin-" + case.backend)
        setup.env.update(pythonpath[case.design], PATH="%s:%s" % (bindir, os.environ.get("PATH", "")))
        setup.start()
        start = setup.wait_ready(args.timeout, args.settle)
        after = idle(setup, args.idle_seconds) if start.outcome == "ok" else None
        log = setup.node.log()
        res = RunResult(start, after, setup.cgroup.oom_kills(), sum(log.count(e) for e in ERRORS),
                        flannel_rules_in_place(setup.node.netns, case.backend, 6 if case.design == "new" else 5))
        if start.outcome != "ok":
            emit("  log: " + setup.log_tail())
    line = "- %s %s S=%d limits=%s %s: subnet.env %s s, all peers %s s" % (
        label, case.backend, case.services, "on" if case.limits else "off", case.design, fmt(start.subnet_env),
        fmt(start.all_peers))
    if after is not None:
        line += ", idle %s millicores, mem peak %s MiB" % (fmt(after.millicores, 1), fmt(after.mem_end, 1))
    emit(line + ", OOM kills %d, iptables errors %d, rules %s, %s" % (res.oom_kills, res.errors, "in place"
         if res.rules_ok else "MISSING", after.outcome if after else start.outcome))
    return res


def row(case: Case, runs: list[RunResult], base_memory: float | None) -> list[str]:
    """One table row; ``base_memory`` is the median memory peak of the same case without kube-proxy's rules."""
    done = [r.idle for r in runs if r.idle is not None]
    mc = median([r.millicores for r in done])
    mem = median([r.mem_end for r in done])
    delta = mem - base_memory if mem is not None and base_memory is not None else None
    gated = case.limits and case.design == "new" and case.backend == "nft"  # where the goals apply
    oom = sum(r.oom_kills for r in runs)
    outcome = outcomes([r.idle.outcome if r.idle else r.start.outcome for r in runs])
    return [case.backend, "{:,}".format(case.services), "on" if case.limits else "off", case.design,
            fmt(median([r.start.subnet_env for r in runs])), fmt(median([r.start.all_peers for r in runs])),
            fmt(mc, 1), goal(mc, IDLE_GOAL) if gated else "", fmt(mem, 1),
            ("%+.1f" % delta if delta is not None else "—") + (" " + goal(delta, MEMORY_GOAL) if gated else ""),
            str(oom) + ((" ✓" if oom == 0 else " ✗") if case.limits else ""),
            str(sum(r.errors for r in runs)), "yes" if all(r.rules_ok for r in runs) else "no", outcome]


def idle_parser(module: str, doc: str, services: str) -> argparse.ArgumentParser:
    """The options of an idle benchmark beside kube-proxy's rules (this one's and bench.nftables')."""
    p = argparse.ArgumentParser(prog="python -m " + module, description=doc.split("\n\n")[0])
    p.add_argument("--services", default=services, help="comma-separated Service counts")
    p.add_argument("--limits", choices=("both", "on", "off"), default="both")
    p.add_argument("--nodes", type=int, default=100, help="nodes in the cluster (the daemon's and N-1 API-only)")
    p.add_argument("--runs", type=int, default=1, help="runs per figure; tables show medians")
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a daemon may take to be ready")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after ready before idling starts")
    return p


def idle_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``p``'s arguments with the Service counts and limit modes as lists."""
    args = p.parse_args(argv)
    args.service_counts = [int(n) for n in args.services.split(",") if n.strip()]
    args.modes = {"both": [True, False], "on": [True], "off": [False]}[args.limits]
    if any(n < 0 for n in args.service_counts) or args.runs < 1 or args.nodes < 1:
        p.error("counts must not be negative")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = idle_parser("bench.kubeproxy", __doc__, "0,10000,20000")
    p.add_argument("--backends", default="nft,legacy", help="comma-separated: nft, legacy")
    p.add_argument("--designs", default="new,old", help="comma-separated: new (this tree), old (--baseline's check)")
    p.add_argument("--baseline", default=BASELINE, help="the commit whose pyflannel is the old design")
    args = idle_args(p, argv)
    args.backend_list = [b for b in args.backends.split(",") if b]
    args.design_list = [d for d in args.designs.split(",") if d]
    if not set(args.backend_list) <= set(BACKENDS) or not set(args.design_list) <= {"new", "old"}:
        p.error("backends are nft and legacy, designs new and old")
    return args


def bench(args: argparse.Namespace) -> None:
    for line in [*preamble("pyflannel beside kube-proxy's rules", "bench.kubeproxy"), LIMITS]:
        emit(line)
    emit("- daemon: kube-flannel's command line with %s, %d nodes; old design: pyflannel of %s"
         % (" ".join(DAEMON_FLAGS), args.nodes, args.baseline))
    emit("- kube-proxy: S ClusterIP Services with one endpoint each, about 5 S + 10 nat rules and 2 S + 4 chains")
    emit("\n## Runs\n")
    with tempfile.TemporaryDirectory(prefix="pyflannel-kubeproxy-") as tmp:
        work = Path(tmp)
        for backend in args.backend_list:
            backend_bin(work / ("bin-" + backend), backend)
        pythonpath = {"new": {"PYTHONPATH": str(REPO)}}
        if "old" in args.design_list:
            # PYTHONSAFEPATH keeps the daemon's working directory (this tree) off sys.path.
            old = baseline_tree(work / "baseline", args.baseline)
            pythonpath["old"] = {"PYTHONPATH": str(old), "PYTHONSAFEPATH": "1"}
        results: dict[Case, list[RunResult]] = {}
        for backend in args.backend_list:
            for services in args.service_counts:
                for limits in args.modes:
                    for design in args.design_list:
                        case = Case(backend, services, limits, design)
                        results[case] = [run(case, args, work, pythonpath, "run %d/%d" % (i + 1, args.runs))
                                         for i in range(args.runs)]
    rows = []
    for case, runs in results.items():
        base = results.get(dataclasses.replace(case, services=0))
        base_memory = median([r.idle.mem_end for r in base if r.idle is not None]) if base else None
        rows.append(row(case, runs, base_memory))
    emit("\n## Idle beside kube-proxy's rules: %d nodes, iptables check every 5 s, %g s (median of %d)\n"
         % (args.nodes, args.idle_seconds, args.runs))
    emit(table(["backend", "Services", "limits", "design", "subnet.env s", "all peers s", "idle millicores", "goal",
                "mem peak MiB", "vs 0 Services MiB", "OOM kills", "iptables errors", "rules in place", "outcome"],
               rows))
    emit("\nGoals (the issue's, under the limits, nf_tables, this tree): idle ≤ %g millicores, memory peak within "
         "%g MiB of the peak without kube-proxy's rules, no OOM kill. OOM kills count the daemon's children too; "
         "the outcome is the daemon's own (%s if it was killed). \"rules in place\": FLANNEL-POSTRTG and its jump "
         "were there at the end." % (IDLE_GOAL, MEMORY_GOAL, OOM))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bench.kubeproxy", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
