"""What the datapath probes cost, under the kube-flannel manifest's limits (cpu 100m, memory 50 MiB).

    python -m bench.probes [--nodes 100,1000,5000] [--runs 3] [--window 300] [--interval 30] [--limits on|off]

Run from the repository root, as root. Each run is bench.footprint's set-up with two measured nodes
side by side, each running pyflannel in a fresh cgroup of its own: "on" with the probes (the defaults:
every --interval seconds, 8 peers a round, the checksum-offload keeper in auto) and "off" with
``--datapath-probe-port=0 --vxlan-checksum-offload=on`` (no prober at all). A third node runs
pyflannel unmeasured as a real peer, and the other N-3 nodes exist only as API objects: their entries
are programmed, but their VXLAN packets go nowhere, so the probes "on" sends them time out and they
count as unreachable (one warning line each). From the real peer a load generator sends "on" the
probes a node gets in a cluster where every node probes 8 peers a round (8 TCP and 16 UDP probes an
interval). Since the sample is constant, the probes' cost does not depend on whether the peers are
real; only the rotation's list and the state of failing peers grow with N.

Both daemons get the same command line (bench.footprint's) and see the same cluster at the same
time, so the machine's noise falls on both: after both are ready and --settle seconds more, the CPU
each cgroup used over --window seconds is compared, and the resident memory (memory.stat total_rss)
at the end and the peak (memory.max_usage_in_bytes, which counts page cache too). Tables show the
median of --runs runs; the goal is at most 2 millicores and 1 MiB more with the probes, at every N.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Network

from bench.footprint import (DAEMON_FLAGS, PYTHON, Cgroup, MiB, Setup, StartResult, emit, fmt, goal, median, outcomes,
                             preamble, run_bench, table)
from tools.netcluster import REPO, Node

OFF_FLAGS = ("--datapath-probe-port=0", "--vxlan-checksum-offload=on")
CPU_GOAL, MEMORY_GOAL = 2.0, 1.0  # millicores and MiB more than without the probes
SAMPLE = 8
LOAD = """
import selectors, sys, time
from ipaddress import IPv4Network
from pyflannel.family import IPV4
from pyflannel.probe import Path, Round
src, dst, interval, k = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
path = Path(IPV4, None, src, IPv4Network("0.0.0.0/0"), "flannel.1", True, 8472, False)
sel = selectors.DefaultSelector()
ok = total = 0
while True:
    started = time.monotonic()
    r = Round(sel, path, 8473, [("on", dst, "")] * k, 1450)
    while not r.done:
        for key, mask in sel.select(0.05):
            key.data(mask)
    for res in r.finish():
        total += 1
        ok += res.outcome == "ok"
    print(ok, total, flush=True)
    time.sleep(max(0.0, interval - (time.monotonic() - started)))
"""


@dataclasses.dataclass
class ProbeRun:
    start: StartResult
    mc_on: float | None = None
    mc_off: float | None = None
    rss_on: float | None = None
    rss_off: float | None = None
    peak_on: float | None = None
    peak_off: float | None = None
    sent: int = 0  # probes "on" sent in its last rounds (its /probes)
    answered: str = "—"  # the load generator's probes "on" answered, "ok/total"
    outcome: str = "ok"


class ProbeSetup(Setup):
    """bench.footprint's Setup (its node is "on") with a second measured node, "off", in a cgroup of its
    own, and a real peer; N counts all three."""

    def __init__(self, nodes: int, limits: bool, interval: int) -> None:
        super().__init__(max(1, nodes - 2), limits)
        self.interval = interval
        self.load: subprocess.Popen[str] | None = None

    def __enter__(self) -> "ProbeSetup":
        super().__enter__()
        try:
            self.off_cgroup = Cgroup("pyflannel-bench-off-" + self.cluster.prefix, self.limits)
            self._stack.callback(self.off_cgroup.remove)
            self.off = self._real_node()
            self.peer = self._real_node()
            self._stack.callback(self._stop_load)
        except BaseException:
            self._stack.close()
            raise
        return self

    def _real_node(self) -> Node:
        i = self._take_index()
        node = self.cluster.add_node("node-%05d" % i, pod_cidr=[str(IPv4Network(
            (int(self.network.network_address) + (i << 8), 24)))])
        self._stack.callback(self.cluster.stop, node, signal.SIGKILL, 5)
        return node

    def start_all(self) -> None:
        """Start "on" and "off" in their cgroups, and the peer, at once."""
        flags = (*DAEMON_FLAGS, "--datapath-probe-interval=%d" % self.interval)
        self.t0 = time.time()
        self.cluster.start(self.node, *flags, env={"BENCH_CGROUP_PROCS": " ".join(self.cgroup.procs_files)})
        self.cluster.start(self.off, *flags, *OFF_FLAGS,
                           env={"BENCH_CGROUP_PROCS": " ".join(self.off_cgroup.procs_files)})
        self.cluster.start(self.peer, *flags)

    def start_load(self) -> None:
        """From the peer, the probes of 8 peers an interval to "on"."""
        src, dst = (str(IPv4Network(self.cluster.subnet_env(n)["FLANNEL_SUBNET"], strict=False).network_address)
                    for n in (self.peer, self.node))
        self.load = subprocess.Popen(
            ["ip", "netns", "exec", self.peer.netns, PYTHON, "-c", LOAD, src, dst, str(self.interval), str(SAMPLE)],
            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))

    def _stop_load(self) -> None:
        if self.load is not None and self.load.poll() is None:
            self.load.kill()
            self.load.wait()

    def load_answered(self) -> str:
        """The load generator's last count, "answered/sent"."""
        self._stop_load()
        assert self.load is not None and self.load.stdout is not None
        lines = self.load.stdout.read().split("\n")
        last = [line for line in lines if line.strip()][-1:] or ["0 0"]
        ok, total = last[0].split()
        return "%s/%s" % (ok, total)

    def both_alive(self) -> str | None:
        """None while both measured daemons run; else which ended and how."""
        ended = self.exit_outcome()
        if ended:
            return "on: " + ended
        if self.off.proc is None or self.off.proc.poll() is not None:
            return "off: %s" % ("OOM-killed" if self.off_cgroup.oom_kills() else "exited")
        return None

    def sleep_both(self, seconds: float) -> str | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ended = self.both_alive()
            if ended:
                return ended
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return self.both_alive()

    def probes_sent(self) -> int:
        """The probes "on" has in its last results (its /probes)."""
        try:
            return sum(len(f["recent"]) for f in self.cluster.probes(self.node)["families"])
        except (RuntimeError, ValueError):
            return 0


def measure(n: int, args: argparse.Namespace, label: str) -> ProbeRun:
    with ProbeSetup(n, args.limits == "on", args.interval) as setup:
        setup.start_all()
        start = setup.wait_ready(args.timeout, 0.0)
        run = ProbeRun(start)
        if start.outcome != "ok":
            run.outcome = start.outcome
        else:
            try:
                for node in (setup.off, setup.peer):
                    setup.cluster.wait_ready(node, args.timeout)
            except (TimeoutError, RuntimeError) as exc:
                run.outcome = "not ready: %s" % exc
        if run.outcome == "ok":
            setup.start_load()
            run.outcome = setup.sleep_both(args.settle) or "ok"
        if run.outcome == "ok":
            cpu0 = (setup.cgroup.cpu_seconds(), setup.off_cgroup.cpu_seconds())
            began = time.time()
            run.outcome = setup.sleep_both(args.window) or "ok"
            wall = time.time() - began
            run.mc_on = (setup.cgroup.cpu_seconds() - cpu0[0]) / wall * 1000
            run.mc_off = (setup.off_cgroup.cpu_seconds() - cpu0[1]) / wall * 1000
            run.rss_on, run.rss_off = setup.cgroup.memory_rss() / MiB, setup.off_cgroup.memory_rss() / MiB
            run.peak_on, run.peak_off = setup.cgroup.memory_peak() / MiB, setup.off_cgroup.memory_peak() / MiB
            run.sent = setup.probes_sent()
            run.answered = setup.load_answered()
        emit("- %s N=%d: all peers %s s; CPU %s / %s millicores (on/off), rss %s / %s MiB, peak %s / %s MiB, "
             "results kept %d, load answered %s, %s" % (
                 label, n, fmt(start.all_peers), fmt(run.mc_on), fmt(run.mc_off), fmt(run.rss_on), fmt(run.rss_off),
                 fmt(run.peak_on, 1), fmt(run.peak_off, 1), run.sent, run.answered, run.outcome))
        if run.outcome != "ok":
            emit("  log: " + setup.log_tail())
    return run


def row(n: int, runs: list[ProbeRun]) -> list[str]:
    done = [r for r in runs if r.outcome == "ok"]
    mc = [r.mc_on - r.mc_off for r in done if r.mc_on is not None and r.mc_off is not None]
    rss = [r.rss_on - r.rss_off for r in done if r.rss_on is not None and r.rss_off is not None]
    peak = [r.peak_on - r.peak_off for r in done if r.peak_on is not None and r.peak_off is not None]
    d_mc, d_rss, d_peak = median(list(mc)), median(list(rss)), median(list(peak))
    return ["{:,}".format(n), fmt(median([r.mc_on for r in done]), 2), fmt(median([r.mc_off for r in done]), 2),
            fmt(d_mc, 2), goal(d_mc, CPU_GOAL), fmt(median([r.rss_on for r in done]), 2),
            fmt(median([r.rss_off for r in done]), 2), fmt(d_rss, 2), goal(d_rss, MEMORY_GOAL),
            fmt(median([r.peak_on for r in done]), 1), fmt(median([r.peak_off for r in done]), 1), fmt(d_peak, 2),
            outcomes([r.outcome for r in runs])]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.probes", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="100,1000,5000", help="comma-separated node counts (at least 3)")
    p.add_argument("--runs", type=int, default=3, help="runs per node count; the table shows medians")
    p.add_argument("--window", type=float, default=300.0, help="seconds over which CPU is measured")
    p.add_argument("--settle", type=float, default=30.0, help="seconds after every node is ready before measuring")
    p.add_argument("--interval", type=int, default=30, help="the daemons' --datapath-probe-interval")
    p.add_argument("--limits", choices=("on", "off"), default="on")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds a daemon may take to be ready")
    args = p.parse_args(argv)
    args.node_counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    if any(n < 3 for n in args.node_counts) or args.runs < 1:
        p.error("node counts must be at least 3, --runs at least 1")
    return args


def bench(args: argparse.Namespace) -> None:
    for line in preamble("pyflannel datapath probes: cost", "bench.probes"):
        emit(line)
    emit("- limits: %s; window %g s after %g s of settling; probes every %d s, %d peers a round"
         % ("cpu 100m and memory 50 MiB per measured daemon" if args.limits == "on" else "none",
            args.window, args.settle, args.interval, SAMPLE))
    emit("- daemons: bench.footprint's command line with --datapath-probe-interval=%d; \"off\" adds %s"
         % (args.interval, " ".join(OFF_FLAGS)))
    emit("\n## Runs\n")
    rows = []
    for n in args.node_counts:
        rows.append(row(n, [measure(n, args, "run %d/%d" % (i + 1, args.runs)) for i in range(args.runs)]))
    emit("\n## With and without the probes (median of %d)\n" % args.runs)
    emit(table(["N", "CPU on", "CPU off", "Δ millicores", "goal", "RSS on MiB", "RSS off MiB", "Δ MiB", "goal",
                "peak on MiB", "peak off MiB", "Δ peak MiB", "outcome"], rows))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bench.probes", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
