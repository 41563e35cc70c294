"""pyflannel under oversized and many nodes, within the kube-flannel manifest's limits (cpu 100m, memory 50 MiB).

    python -m bench.hostile [--nodes 5000] [--hostile 10] [--hostile-mb 1.5] [--seconds 30]
                            [--small-nodes 20000] [--runs 1] [--out FILE]

Run from the repository root, as root. Two measurements, each with one real node running pyflannel in
a cgroup with the manifest's limits, and API-only peers (bench.footprint's Setup):

- Hostile nodes: ``--nodes`` realistic nodes, ``--hostile`` of them padded to ``--hostile-mb`` MB each
  (``status.images`` and ``metadata.managedFields`` full of small objects, which cost most when parsed,
  and a 200 KiB annotation under flannel's prefix), in the list at start-up and then updated through the
  API every second each (a new resourceVersion, as a status heartbeat gives it: every update sends the
  whole object down the watch). Figures: start-up, the cgroup's memory peak, and the CPU used over ``--seconds`` of
  updates. Goals: under 40 MiB and 50 millicores.
- Many small nodes: ``--small-nodes`` nodes holding only a pod CIDR and flannel's annotations. Figures:
  start-up, and the memory peak up to 35 s after ready, so that it includes a full reconcile (every 30 s,
  which dumps every route, neighbour and FDB entry); goal: under the 50 MiB limit (never OOM-killed).

Every hostile node has a valid lease: the bench waits until every peer, the hostile ones included, is
in the kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.footprint import MiB, Setup, StartResult, Want, fmt, goal, median, outcomes, preamble, run_bench, table

PREFIX = "flannel.alpha.coreos.com/"
MEMORY_GOAL = 40.0  # MiB, with hostile nodes
CPU_GOAL = 50.0  # millicores, with hostile nodes updated every second
SMALL_MEMORY_GOAL = 50.0  # MiB, many small nodes
HISTORY = 200  # watch events the API server keeps: 1.5 MB events would fill its memory otherwise
FULL_RECONCILE = 35.0  # seconds after ready that cover the first full reconcile (--datapath-resync=30)


def hostile_object(size: int, where: str = "status") -> dict[str, Any]:
    """The padding that makes a node about ``size`` bytes of JSON: small objects, the costliest to parse,
    most of them in ``status.images`` (where a kubelet's bulk is), or with ``where="metadata"`` in its
    managed fields (before the spec, so that no reader can stop short of them)."""
    bulk = int(size * 0.8)
    images = [{"names": ["a"]}] * (bulk // 16 if where == "status" else 0)
    fields = {"f:%07d" % i: {} for i in range(int(size * 0.1 / 14) + (bulk // 14 if where == "metadata" else 0))}
    return {"metadata": {"annotations": {PREFIX + "x-padding": "p" * (200 << 10)},
                         "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                                            "fieldsType": "FieldsV1", "fieldsV1": fields}]},
            "status": {"images": images}}


@dataclasses.dataclass
class HostileResult:
    updates: int = 0
    millicores: float | None = None
    mem_end: float | None = None
    rss_end: float | None = None
    outcome: str = "ok"


class Updater:
    """Updates each hostile node once a second until stopped (FakeKubeAPI.touch_node: encoding 1.5 MB ten
    times a second would take more CPU than this machine has to spare)."""

    def __init__(self, setup: Setup, names: list[str]) -> None:
        self.setup = setup
        self.names = names
        self.updates = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile updates", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(max(0.0, 1.0 - (time.monotonic() % 1.0))):
            for name in self.names:
                self.setup.api.touch_node(name)
                self.updates += 1


def add_hostile(setup: Setup, count: int, size: int, where: str) -> list[str]:
    """Add ``count`` new peers whose nodes are padded to ``size`` bytes; the kernel must hold them too."""
    names = []
    for _ in range(count):
        peer = setup.new_peer()
        node = setup.api.add_node(peer.name, pod_cidr=peer.pod_cidrs, annotations=peer.annotations(),
                                  internal_ip=peer.ip, realistic=True)
        padding = hostile_object(size - len(json.dumps(node)), where)
        setup.api.patch_node(peer.name, padding)
        setup.peers.append(peer)
        setup.kernel.want(Want(peer, True))
        names.append(peer.name)
    return names


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lines: list[str] = []

    def emit(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def run_line(self, label: str, setup: Setup, start: StartResult, after: Any = None) -> None:
        line = ("- %s: subnet.env %s s, all peers %s s, mem peak %s/%s MiB (rss %s), cpu %s s to ready, %s"
                % (label, fmt(start.subnet_env), fmt(start.all_peers), fmt(start.mem_ready, 1), fmt(start.mem_end, 1),
                   fmt(start.rss_end, 1), fmt(start.cpu_ready), start.outcome))
        if after is not None:
            line += "; " + ", ".join("%s %s" % (k.replace("_", " "), fmt(v) if isinstance(v, float) else v)
                                     for k, v in dataclasses.asdict(after).items())
        if start.outcome != "ok" or (after is not None and after.outcome != "ok"):
            line += "\n  log: " + setup.log_tail()
        self.emit(line)

    def hostile(self, run: int) -> tuple[StartResult, HostileResult | None]:
        args = self.args
        with Setup(args.nodes - args.hostile, True) as setup:
            setup.api._history = HISTORY
            names = add_hostile(setup, args.hostile, int(args.hostile_mb * 1e6), args.padding)
            setup.start()
            if run == 0:
                self.emit("daemon command line: `%s`\n" % setup.command_line)
            start = setup.wait_ready(args.timeout, args.settle)
            after = None
            if start.outcome == "ok":
                updater = Updater(setup, names)
                cpu0, t0 = setup.cgroup.cpu_seconds(), time.time()
                updater.start()
                ended = setup.sleep(args.seconds)
                updater.stop()
                wall = time.time() - t0
                after = HostileResult(updates=updater.updates,
                                      millicores=(setup.cgroup.cpu_seconds() - cpu0) / wall * 1000,
                                      mem_end=setup.cgroup.memory_peak() / MiB, rss_end=setup.cgroup.memory_rss() / MiB,
                                      outcome=ended or ("peers missing" if setup.kernel.unmet() else "ok"))
            self.run_line("hostile %d/%d N=%d (%d of %g MB, bulk in %s)" % (
                run + 1, args.runs, args.nodes, args.hostile, args.hostile_mb, args.padding), setup, start, after)
            return start, after

    def small(self, run: int) -> StartResult:
        args = self.args
        with Setup(args.small_nodes, True, realistic=False) as setup:
            setup.start()
            start = setup.wait_ready(args.timeout, max(args.settle, FULL_RECONCILE))
            self.run_line("small %d/%d N=%d" % (run + 1, args.runs, args.small_nodes), setup, start)
            return start

    def main(self) -> None:
        args = self.args
        for line in preamble("pyflannel with hostile and many nodes", "bench.hostile"):
            self.emit(line)
        self.emit("- limits: the manifest's, cpu 100m and memory 50 MiB (bench.footprint's cgroup)")
        self.emit("\n## Runs\n")
        sections = []
        if args.hostile:
            runs = [self.hostile(i) for i in range(args.runs)]
            done = [after for _, after in runs if after is not None]
            mem = median([r.mem_end for r in done])
            mc = median([r.millicores for r in done])
            sections.append("## %d realistic nodes, %d of them padded to %g MB (bulk in %s) and updated every second "
                            "(median of %d)\n\n" % (args.nodes, args.hostile, args.hostile_mb, args.padding, args.runs)
                            + table(
                                ["all peers s", "CPU s to ready", "updates", "mem peak MiB", "goal", "millicores",
                                 "goal", "outcome"],
                                [[fmt(median([s.all_peers for s, _ in runs])), fmt(median([s.cpu_ready for s, _ in runs])),
                                  str(sum(r.updates for r in done)), fmt(mem, 1), goal(mem, MEMORY_GOAL, strict=True),
                                  fmt(mc, 0), goal(mc, CPU_GOAL, strict=True),
                                  outcomes([a.outcome if a else "%s at start-up" % s.outcome for s, a in runs])]]))
        if args.small_nodes:
            starts = [self.small(i) for i in range(args.runs)]
            mem = median([s.mem_end for s in starts])
            sections.append("## %d small nodes (median of %d)\n\n" % (args.small_nodes, args.runs) + table(
                ["all peers s", "CPU s to ready", "mem peak MiB", "goal", "rss MiB", "outcome"],
                [[fmt(median([s.all_peers for s in starts])), fmt(median([s.cpu_ready for s in starts])), fmt(mem, 1),
                  goal(mem, SMALL_MEMORY_GOAL, strict=True), fmt(median([s.rss_end for s in starts]), 1),
                  outcomes([s.outcome for s in starts])]]))
        for section in sections:
            self.emit("\n" + section)
        if args.out:
            Path(args.out).write_text("\n".join(self.lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=5000, help="nodes of the hostile measurement, the padded ones included")
    p.add_argument("--hostile", type=int, default=10, help="padded nodes (0: skip the measurement)")
    p.add_argument("--hostile-mb", type=float, default=1.5, help="size of a padded node's JSON, in MB")
    p.add_argument("--padding", choices=("status", "metadata"), default="status",
                   help="where most of a padded node's bulk is: its status (a kubelet's images), or its managed "
                        "fields")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds of updates measured")
    p.add_argument("--small-nodes", type=int, default=20000, help="nodes of the second measurement (0: skip it)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a daemon may take to be ready")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after ready before the start-up figures")
    p.add_argument("--out", default="", help="also write the report to this file")
    args = p.parse_args(argv)
    if args.nodes <= args.hostile or args.runs < 1:
        p.error("--nodes must be more than --hostile, and --runs at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bench.hostile", Bench(args).main)


if __name__ == "__main__":
    sys.exit(main())
