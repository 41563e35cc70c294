"""pyflannel's footprint against the kube-flannel manifest's limits (cpu 100m, memory 50 MiB).

    python -m bench.footprint [--nodes 1,100,1000,5000] [--runs 3] [--limits both|on|off] [--churn] [--idle]
                              [--stack v4|dual|v6]

Run from the repository root, as root. Each run builds a tools.netcluster.Cluster with ONE real node
namespace running pyflannel and N-1 other nodes that exist only as realistic node objects in the
in-repo API server, added before the daemon starts. The daemon runs in a fresh cpu + cpuacct + memory
cgroup (beneath this process's own cgroups), joined before it execs; with limits that cgroup has
cpu.cfs_quota_us=10000 per cpu.cfs_period_us=100000 and memory.limit_in_bytes=50M. A netlink monitor
(bench.nlmon) in the node's namespace, outside the cgroup, timestamps every change of flannel.1's
routes, neighbours and FDB entries (with --stack dual or v6, of flannel-v6.1's IPv6 ones too: a
dual-stack peer counts as in the kernel once all six of its entries are).

Start-up runs measure spawn -> subnet.env, spawn -> every peer's route + neighbour + FDB entry, the
cgroup's memory peak then and after --settle seconds, and CPU seconds to ready. --churn drives node
adds, VtepMAC changes and deletes through the API and measures API write -> kernel latency; --idle
measures CPU with nothing changing. Tables show the median of --runs runs next to the issue's goals.

The daemon gets the kube-flannel command line (--ip-masq --kube-subnet-mgr --iface=eth1) plus the
Cluster's test flags, whose resync periods are put back to the defaults (--iptables-resync=5
--datapath-resync=30) so that the figures are those of the manifest's daemon. It reaches the API
server with --kube-api-url (plain HTTP, no kubeconfig), which costs what a DaemonSet pod's in-cluster
service account costs but for TLS, and runs under the project's virtualenv (.venv, made by
scripts/setup.sh) when there is one, as in the image. memory.max_usage_in_bytes counts page cache as
well as RSS (the per-run lines give both).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from types import FrameType
from typing import Any

from tools.netcluster import REPO, Cluster, Node

PREFIX = "flannel.alpha.coreos.com/"
# IP version -> (vxlan device, backend-data annotation, public-ip annotation)
FAMILY = {4: ("flannel.1", PREFIX + "backend-data", PREFIX + "public-ip"),
          6: ("flannel-v6.1", PREFIX + "backend-v6-data", PREFIX + "public-ipv6")}
STACK_FAMILIES = {"v4": (4,), "dual": (4, 6), "v6": (6,)}
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
DAEMON_FLAGS = ("--iptables-resync=5", "--datapath-resync=30")
CPU_QUOTA_US, CPU_PERIOD_US = 10_000, 100_000
MEMORY_LIMIT = 50 << 20
MiB = 1 << 20
POLL = 0.01  # seconds between checks of subnet.env, the monitor and the daemon
DRAIN = 10.0  # seconds after the last churn write by which every change must be in the kernel
OOM = "OOM-killed"

# flanneld v0.20.2 on a machine like this one, from the issue: (limits, N) -> figures.
REFERENCE = (
    ("on", 1, "1.34", "—", "9.5", "ok"),
    ("on", 100, "1.48", "1.81", "14.4", "ok"),
    ("on", 1000, "—", "—", "—", OOM),
    ("off", 1000, "—", "1.30", "56", "ok"),
    ("on", 5000, "—", "—", "—", OOM),
    ("off", 5000, "—", "3.21", "212", "ok"),
)


# -- cgroups ------------------------------------------------------------------------------------------


def own_cgroup(controller: str) -> str:
    """This process's cgroup path in a v1 hierarchy, e.g. '/' or '/some/group'."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise RuntimeError("no cgroup v1 %s hierarchy" % controller)


class Cgroup:
    """A fresh cpu, cpuacct and memory cgroup beneath this process's own; ``remove()`` deletes it."""

    CONTROLLERS = ("cpu", "cpuacct", "memory")

    def __init__(self, name: str, limits: bool) -> None:
        self.paths: dict[str, Path] = {}
        try:
            for controller in self.CONTROLLERS:
                path = Path("/sys/fs/cgroup", controller, own_cgroup(controller).lstrip("/"), name)
                path.mkdir()
                self.paths[controller] = path
            if limits:
                self._write("cpu", "cpu.cfs_period_us", CPU_PERIOD_US)
                self._write("cpu", "cpu.cfs_quota_us", CPU_QUOTA_US)
                self._write("memory", "memory.limit_in_bytes", MEMORY_LIMIT)
        except BaseException:
            self.remove()
            raise

    def _write(self, controller: str, name: str, value: int) -> None:
        (self.paths[controller] / name).write_text(str(value))

    def _read(self, controller: str, name: str) -> str:
        return (self.paths[controller] / name).read_text()

    @property
    def procs_files(self) -> list[str]:
        """The cgroup.procs files a process writes its pid to, to join, as seen from any mount namespace.

        ``ip netns exec`` mounts a sysfs of the namespace's own on /sys, without the cgroup hierarchies;
        /proc/<this pid>/root/ reaches them through this process's mount namespace.
        """
        return ["/proc/%d/root%s" % (os.getpid(), p / "cgroup.procs") for p in self.paths.values()]

    def cpu_seconds(self) -> float:
        return int(self._read("cpuacct", "cpuacct.usage")) / 1e9

    def memory_peak(self) -> int:
        return int(self._read("memory", "memory.max_usage_in_bytes"))

    def memory_rss(self) -> int:
        stat = dict(line.split() for line in self._read("memory", "memory.stat").splitlines())
        return int(stat["total_rss"])

    def oom_kills(self) -> int:
        control = dict(line.split() for line in self._read("memory", "memory.oom_control").splitlines())
        return int(control.get("oom_kill", 0))

    def remove(self) -> None:
        """Kill whatever is left in the cgroup (only processes this bench started), then delete it."""
        for path in reversed(list(self.paths.values())):
            for _ in range(50):
                try:
                    for pid in (path / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY until the killed processes are reaped
                    time.sleep(0.1)
            else:
                print("warning: could not remove %s" % path, file=sys.stderr)
        self.paths.clear()


def cgroup_wrapper(path: Path, python: str) -> Path:
    """A stand-in for the daemon's Python that joins $BENCH_CGROUP_PROCS' cgroups, then execs Python.

    ``ip netns exec`` execs it in the process Popen made, so the daemon is in the cgroup from its first
    instruction on, and nothing else of this bench is.
    """
    path.write_text('#!/bin/sh\nfor f in $BENCH_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done\n'
                    'exec %s "$@"\n' % shlex.quote(python))
    path.chmod(0o755)
    return path


# -- the kernel as the netlink monitor reports it ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
    """One family's part of a peer: its pod CIDR, public IP and VtepMAC."""

    subnet: IPv4Network | IPv6Network
    ip: str
    mac: str

    @property
    def route(self) -> str:
        return str(self.subnet)

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address)


@dataclasses.dataclass(frozen=True)
class Peer:
    """A node that exists only as an API object, with a part per family (IPv4 first)."""

    name: str
    parts: tuple[Part, ...]

    @property
    def pod_cidrs(self) -> list[str]:
        return [p.route for p in self.parts]

    @property
    def ip(self) -> str:
        return self.parts[0].ip

    def annotations(self) -> dict[str, str]:
        ann = {PREFIX + "kube-subnet-manager": "true", PREFIX + "backend-type": "vxlan"}
        for part in self.parts:
            _, data_key, ip_key = FAMILY[part.subnet.version]
            ann[ip_key] = part.ip
            ann[data_key] = json.dumps({"VNI": 1, "VtepMAC": part.mac}, separators=(",", ":"))
        return ann


@dataclasses.dataclass(frozen=True)
class Want:
    """What the kernel should hold for a peer: its three entries, or none of them.

    ``since`` is the time of the API write that asked for it (None for the state before start-up).
    """

    peer: Peer
    present: bool
    change: str = ""
    since: float | None = None

    def keys(self) -> tuple[tuple[str, str], ...]:
        return tuple(k for p in self.peer.parts for k in (("r", p.route), ("n", p.gateway), ("f", p.mac)))


class Kernel:
    """The vxlan devices' routes, neighbours and FDB entries, from a bench.nlmon process in the namespace,
    and when each peer's wanted state was first met (with the monitor's timestamps)."""

    def __init__(self, netns: str, devices: tuple[str, ...]) -> None:
        self.routes: set[str] = set()
        self.neigh: dict[str, str] = {}
        self.fdb: dict[str, set[str]] = {}
        self.overflow = False
        self.wants: dict[str, Want] = {}
        self.met_count = 0
        self.all_met_at: float | None = None
        self.latencies: list[tuple[str, float]] = []  # (change, seconds) for wants with a ``since``
        self._met: set[str] = set()
        self._by_key: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "bench.nlmon", *devices],
                                     stdout=subprocess.PIPE, text=True, cwd=str(REPO))
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the netlink monitor did not start")
        self._reader = threading.Thread(target=self._read, name="nlmon", daemon=True)
        self._reader.start()

    def close(self) -> None:
        """Stop the monitor."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def _met_now(self, want: Want) -> bool:
        if want.present:
            return all(p.route in self.routes and self.neigh.get(p.gateway) == p.mac and p.ip in self.fdb.get(p.mac, ())
                       for p in want.peer.parts)
        return all(p.route not in self.routes and p.gateway not in self.neigh and p.ip not in self.fdb.get(p.mac, ())
                   for p in want.peer.parts)

    def _update(self, name: str, was: bool, stamp: float) -> None:
        now = self._met_now(self.wants[name])
        self.met_count += now - was
        if now and name not in self._met:
            self._met.add(name)
            want = self.wants[name]
            if want.since is not None:
                self.latencies.append((want.change, stamp - want.since))
        if self.all_met_at is None and self.wants and self.met_count == len(self.wants):
            self.all_met_at = stamp

    def want(self, want: Want) -> None:
        """Expect ``want`` for its peer from now on, replacing what was expected before."""
        name = want.peer.name
        with self._lock:
            old = self.wants.get(name)
            if old is not None:
                self.met_count -= self._met_now(old)
                for key in old.keys():
                    self._by_key.pop(key, None)
            self._met.discard(name)
            self.wants[name] = want
            for key in want.keys():
                self._by_key[key] = name
            self._update(name, False, time.time())

    def pending(self, name: str) -> bool:
        """True while the latest want for ``name`` has not been met."""
        with self._lock:
            return name in self.wants and name not in self._met

    def unmet(self) -> list[Want]:
        """The wants not met yet."""
        with self._lock:
            return [w for name, w in self.wants.items() if name not in self._met]

    def stale(self) -> int:
        """How many of the device's entries no present peer accounts for."""
        with self._lock:
            present = [p for w in self.wants.values() if w.present for p in w.peer.parts]
            routes = {p.route for p in present}
            neigh = {p.gateway: p.mac for p in present}
            fdb = {(p.mac, p.ip) for p in present}
            return (len(self.routes - routes) + sum(neigh.get(ip) != m for ip, m in self.neigh.items())
                    + sum((m, ip) not in fdb for m, ips in self.fdb.items() for ip in ips))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            stamp = float(parts[0])
            with self._lock:
                if parts[1] == "overflow":
                    self.overflow = True
                elif parts[1] == "reset":
                    self._forget(parts[2] == FAMILY[6][0])
                    self.met_count = sum(self._met_now(w) for w in self.wants.values())
                else:
                    op, kind, key, value = parts[1:5]
                    name = self._by_key.get((kind, key))
                    was = name is not None and self._met_now(self.wants[name])
                    self._apply(op == "+", kind, key, value)
                    if name is not None:
                        self._update(name, was, stamp)

    def _forget(self, ipv6: bool) -> None:
        """A device went away: forget its family's entries (an IPv6 one's addresses have a colon)."""
        self.routes = {r for r in self.routes if (":" in r) != ipv6}
        self.neigh = {ip: mac for ip, mac in self.neigh.items() if (":" in ip) != ipv6}
        for mac in list(self.fdb):
            self.fdb[mac] = {ip for ip in self.fdb[mac] if (":" in ip) != ipv6}
            if not self.fdb[mac]:
                del self.fdb[mac]

    def _apply(self, add: bool, kind: str, key: str, value: str) -> None:
        if kind == "r":
            (self.routes.add if add else self.routes.discard)(key)
        elif kind == "n":
            if add:
                self.neigh[key] = value
            else:
                self.neigh.pop(key, None)
        elif add:
            self.fdb.setdefault(key, set()).add(value)
        elif key in self.fdb:
            self.fdb[key].discard(value)
            if not self.fdb[key]:
                del self.fdb[key]


# -- one cluster -------------------------------------------------------------------------------------


@dataclasses.dataclass
class StartResult:
    """One start-up: seconds from spawn, MiB, CPU seconds; None where not reached."""

    subnet_env: float | None = None
    all_peers: float | None = None
    mem_ready: float | None = None
    mem_end: float | None = None
    rss_end: float | None = None
    cpu_ready: float | None = None
    cpu_end: float | None = None
    ended: float | None = None  # seconds from spawn to the daemon's exit, if it exited
    outcome: str = "ok"


class Setup:
    """A Cluster with one real node, its daemon in a fresh cgroup, N-1 API-only peers and a monitor.

    Used as a context manager: everything it made is removed on exit, also on errors and Ctrl-C.
    """

    def __init__(self, nodes: int, limits: bool, spare: int = 0, stack: str = "v4", realistic: bool = True) -> None:
        """``realistic=False``: the peers' nodes hold only their pod CIDRs, flannel's annotations and an address."""
        self.nodes = nodes
        self.limits = limits
        self.stack = stack
        self.realistic = realistic
        # /24 and /64 pod CIDRs: 10.244.0.0/16 and fd00:10:244::/56 hold 256 of them, 10.0.0.0/8 and
        # fd00:10::/40 (as many as 10.0.0.0/8) are used beyond that.
        small = nodes + spare < 256
        self.network = IPv4Network("10.244.0.0/16" if small else "10.0.0.0/8")
        self.ipv6_network = IPv6Network("fd00:10:244::/56" if small else "fd00:10::/40")
        self._stack = contextlib.ExitStack()
        self._next_index = 1
        self._next_mac = 1
        self.t0 = 0.0
        self.ended_at: float | None = None
        self.env: dict[str, str] = {}  # more environment for the daemon

    def __enter__(self) -> "Setup":
        stack = self._stack
        try:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyflannel-bench-")))
            wrapper = cgroup_wrapper(tmp / "python-in-cgroup", PYTHON)
            self.cluster = stack.enter_context(Cluster(tmp / "cluster", network=str(self.network), python=str(wrapper),
                                                       kubeconfig=False, stack=self.stack,
                                                       ipv6_network=str(self.ipv6_network)))
            self.cgroup = Cgroup("pyflannel-bench-" + self.cluster.prefix, self.limits)
            stack.callback(self.cgroup.remove)
            self.node: Node = self.cluster.add_node("node-%05d" % self._take_index())
            stack.callback(self._stop_daemon)  # before the cgroup goes; Cluster.close() comes after both
            self.peers = [self.new_peer() for _ in range(self.nodes - 1)]
            api = self.cluster.api
            assert api is not None
            self.api = api
            for peer in self.peers:
                api.add_node(peer.name, pod_cidr=peer.pod_cidrs, annotations=peer.annotations(), internal_ip=peer.ip,
                             realistic=self.realistic)
            self.kernel = Kernel(self.node.netns, tuple(FAMILY[f][0] for f in STACK_FAMILIES[self.stack]))
            stack.callback(self.kernel.close)
            for peer in self.peers:
                self.kernel.want(Want(peer, True))
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _stop_daemon(self) -> None:
        self.cluster.stop(self.node, signal.SIGKILL, timeout=5)

    def _take_index(self) -> int:
        i, self._next_index = self._next_index, self._next_index + 1
        return i

    def new_mac(self) -> str:
        i, self._next_mac = self._next_mac, self._next_mac + 1
        return "0a:58:%02x:%02x:%02x:%02x" % (i >> 24 & 255, i >> 16 & 255, i >> 8 & 255, i & 255)

    def new_peer(self) -> Peer:
        """The next peer: per family the next /24 or /64 of the network, a unique fake public IP (never
        sent to) and a VtepMAC."""
        i = self._take_index()
        parts = []
        for family in STACK_FAMILIES[self.stack]:
            if family == 4:
                subnet: IPv4Network | IPv6Network = IPv4Network((int(self.network.network_address) + (i << 8), 24))
                ip = "192.168.%d.%d" % (100 + i // 254, i % 254 + 1)
            else:
                subnet = IPv6Network((int(self.ipv6_network.network_address) + (i << 64), 64))
                ip = "fd57::%x" % i
            parts.append(Part(subnet, ip, self.new_mac()))
        return Peer("node-%05d" % i, tuple(parts))

    def with_new_macs(self, peer: Peer) -> Peer:
        """The peer after its vxlan devices were re-created: a new VtepMAC in every family."""
        return dataclasses.replace(peer, parts=tuple(dataclasses.replace(p, mac=self.new_mac()) for p in peer.parts))

    def start(self) -> None:
        """Spawn the daemon (in the cgroup) and note the time."""
        env = {**self.env, "BENCH_CGROUP_PROCS": " ".join(self.cgroup.procs_files)}
        self.t0 = time.time()
        self.cluster.start(self.node, *DAEMON_FLAGS, env=env)

    @property
    def command_line(self) -> str:
        """The command the daemon was spawned with."""
        assert self.node.proc is not None
        return shlex.join(self.node.proc.args)  # type: ignore[arg-type]

    def exit_outcome(self) -> str | None:
        """None while the daemon runs; else how it ended (noting when that was first seen)."""
        proc = self.node.proc
        if proc is None or proc.poll() is None:
            return None
        if self.ended_at is None:
            self.ended_at = time.time()
        if self.cgroup.oom_kills():
            return OOM
        return "killed by signal %d" % -proc.returncode if proc.returncode < 0 else "exited %d" % proc.returncode

    def sleep(self, seconds: float) -> str | None:
        """Sleep, watching the daemon; its exit outcome if it ended meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ended = self.exit_outcome()
            if ended:
                return ended
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.exit_outcome()

    def wait_ready(self, timeout: float, settle: float) -> StartResult:
        """Wait for subnet.env and every peer's entries, then ``settle`` seconds more."""
        res = StartResult()
        deadline = self.t0 + timeout
        while True:
            now = time.time()
            if res.subnet_env is None and self.node.subnet_file.exists():
                res.subnet_env = now - self.t0
            if res.all_peers is None and self.kernel.all_met_at is not None:
                res.all_peers = self.kernel.all_met_at - self.t0
            if res.subnet_env is not None and (res.all_peers is not None or not self.peers):
                res.cpu_ready = self.cgroup.cpu_seconds()
                res.mem_ready = self.cgroup.memory_peak() / MiB
                break
            ended = self.exit_outcome()
            if ended or now > deadline:
                res.outcome = ended or "timeout"
                break
            time.sleep(POLL)
        if res.outcome == "ok":
            res.outcome = self.sleep(settle) or "ok"
        if self.kernel.overflow:
            res.outcome = "monitor overflow"
        res.mem_end = self.cgroup.memory_peak() / MiB
        res.rss_end = self.cgroup.memory_rss() / MiB
        res.cpu_end = self.cgroup.cpu_seconds()
        if self.ended_at is not None:
            res.ended = self.ended_at - self.t0
        return res

    def log_tail(self, lines: int = 3) -> str:
        return " | ".join(self.node.log().strip().splitlines()[-lines:])


# -- the measurements --------------------------------------------------------------------------------


@dataclasses.dataclass
class ChurnResult:
    changes: int = 0
    missed: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    p99_by_change: dict[str, float] = dataclasses.field(default_factory=dict)
    millicores: float | None = None
    stale: int = 0
    outcome: str = "ok"


@dataclasses.dataclass
class IdleResult:
    seconds: float = 0.0
    millicores: float | None = None
    mem_end: float | None = None
    outcome: str = "ok"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def churn(setup: Setup, rate: float, seconds: float, drain: float, rng: random.Random) -> ChurnResult:
    """Add a node, change a node's VtepMAC, delete a node, in turn, ``rate`` times a second.

    A node is only changed while no earlier change of it is pending, so no change can be coalesced away.
    Stops early if the daemon ends; the changes it had not applied count as missed.
    """
    api, kernel, res = setup.api, setup.kernel, ChurnResult()
    live = deque(p.name for p in setup.peers)
    peers = {p.name: p for p in setup.peers}
    cpu0, start = setup.cgroup.cpu_seconds(), time.time()
    for i in range(int(rate * seconds)):
        if setup.exit_outcome():
            break
        delay = start + i / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        kind = ("add", "mac", "delete")[i % 3]
        if kind == "add":
            peer = setup.new_peer()
            kernel.want(Want(peer, True, kind, time.time()))
            api.add_node(peer.name, pod_cidr=peer.pod_cidrs, annotations=peer.annotations(), internal_ip=peer.ip,
                         realistic=True)
            live.append(peer.name)
            peers[peer.name] = peer
        else:
            # A random node for a VtepMAC change, the oldest for a delete; one with no change pending.
            picks = [rng.choice(live) for _ in range(20)] if kind == "mac" else list(live)[:20]
            name = next((n for n in picks if not kernel.pending(n)), None)
            if name is None:
                continue
            if kind == "mac":
                peer = peers[name] = setup.with_new_macs(peers[name])
                kernel.want(Want(peer, True, kind, time.time()))
                data = {k: v for k, v in peer.annotations().items() if k in (FAMILY[4][1], FAMILY[6][1])}
                api.patch_node(name, {"metadata": {"annotations": data}})
            else:
                live.remove(name)
                kernel.want(Want(peers.pop(name), False, kind, time.time()))
                api.delete_node(name)
        res.changes += 1
    deadline = time.time() + drain
    while kernel.unmet() and time.time() < deadline and not setup.exit_outcome():
        time.sleep(POLL)
    wall = time.time() - start
    res.millicores = (setup.cgroup.cpu_seconds() - cpu0) / wall * 1000
    res.missed = len([w for w in kernel.unmet() if w.since is not None])
    res.outcome = setup.sleep(1.0) or ("monitor overflow" if kernel.overflow else "ok")
    res.stale = kernel.stale()
    latencies = [s * 1000 for _, s in kernel.latencies]
    if latencies:
        res.p50_ms, res.p99_ms = percentile(latencies, 0.50), percentile(latencies, 0.99)
        for kind in ("add", "mac", "delete"):
            ms = [s * 1000 for k, s in kernel.latencies if k == kind]
            if ms:
                res.p99_by_change[kind] = percentile(ms, 0.99)
    return res


def idle(setup: Setup, seconds: float) -> IdleResult:
    """CPU over ``seconds`` with nothing changing."""
    cpu0, start = setup.cgroup.cpu_seconds(), time.time()
    ended = setup.sleep(seconds)
    wall = time.time() - start
    res = IdleResult(seconds=wall, outcome=ended or "ok")
    res.millicores = (setup.cgroup.cpu_seconds() - cpu0) / wall * 1000
    res.mem_end = setup.cgroup.memory_peak() / MiB
    return res


# -- the report --------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else "%.*f" % (digits, value)


def brief(value: Any) -> str:
    """A figure for the per-run lines: floats rounded, dicts as k=v."""
    if isinstance(value, float):
        return "%.2f" % value
    if isinstance(value, dict):
        return "/".join("%s=%s" % (k, brief(v)) for k, v in value.items())
    return str(value)


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def outcomes(values: list[str]) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join("%d× %s" % (n, v) if len(values) > 1 else v for v, n in counts.items())


def goal(value: float | None, limit: float | None, strict: bool = False) -> str:
    """'≤ limit ✓' or '✗' next to a figure; '' when the issue sets no goal for it."""
    if limit is None:
        return ""
    sign = "<" if strict else "≤"
    if value is None:
        return "%s %g ✗" % (sign, limit)
    ok = value < limit if strict else value <= limit
    return "%s %g %s" % (sign, limit, "✓" if ok else "✗")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with aligned columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def start_goals(n: int, limits: bool, stack: str = "v4") -> tuple[float | None, float | None, float | None]:
    """(subnet.env s, all peers s, memory MiB) goals; the start-up goals hold under the limits.
    Dual-stack (issue 9): every peer's entries of both families within 20 s at 5,000 nodes."""
    if not limits:
        return None, None, None
    subnet = {1: 1.5, 1000: 2.5}.get(n)
    peers = {100: 2.0, 1000: 4.5, 5000: 15.0 if stack == "v4" else 20.0}.get(n)
    memory = 40.0 if n == 1000 else 50.0  # < 40 MiB at 1,000; elsewhere never OOM-killed (< the 50 MiB limit)
    return subnet, peers, memory


def start_row(n: int, limits: bool, runs: list[StartResult], stack: str = "v4") -> list[str]:
    g_subnet, g_peers, g_mem = start_goals(n, limits, stack)
    subnet, peers = median([r.subnet_env for r in runs]), median([r.all_peers for r in runs])
    mem_ready, mem_end = median([r.mem_ready for r in runs]), median([r.mem_end for r in runs])
    oom_free = all(r.outcome != OOM for r in runs)
    outcome = outcomes([r.outcome for r in runs])
    if limits:
        outcome += " ✓" if oom_free else " ✗"
    return [str(n), "on" if limits else "off", fmt(subnet), goal(subnet, g_subnet),
            fmt(peers) if n > 1 else "—", goal(peers, g_peers), fmt(mem_ready, 1), fmt(mem_end, 1),
            goal(mem_end, g_mem, strict=True), fmt(median([r.cpu_ready for r in runs])), outcome]


def run_outcomes(runs: list[tuple[StartResult, Any]]) -> str:
    """The outcomes of measurements that needed a ready daemon."""
    return outcomes([after.outcome if after else "%s at start-up" % start.outcome for start, after in runs])


def churn_row(limits: bool, runs: list[tuple[StartResult, ChurnResult | None]]) -> list[str]:
    done = [after for _, after in runs if after is not None]
    p99_goal = 100.0 if limits else 10.0
    if not done:
        return ["on" if limits else "off", "—", "—", "—", "—", goal(None, p99_goal), "—", "—", goal(None, 80.0), "—",
                run_outcomes(runs)]
    p99 = median([r.p99_ms for r in done])
    mc = median([r.millicores for r in done])
    by_change = "/".join(fmt(median([r.p99_by_change.get(k) for r in done]), 1) for k in ("add", "mac", "delete"))
    missed = sum(r.missed for r in done)
    return ["on" if limits else "off", str(sum(r.changes for r in done)),
            "%d %s" % (missed, "✓" if not missed else "✗"), fmt(median([r.p50_ms for r in done]), 1), fmt(p99, 1),
            goal(p99, p99_goal), by_change,
            fmt(mc, 0), goal(mc, 80.0), str(sum(r.stale for r in done)), run_outcomes(runs)]


def idle_row(limits: bool, runs: list[tuple[StartResult, IdleResult | None]]) -> list[str]:
    done = [after for _, after in runs if after is not None]
    mc = median([r.millicores for r in done])
    return ["on" if limits else "off", fmt(median([r.seconds for r in done]), 0), fmt(mc, 1),
            goal(mc, 5.0, strict=True), fmt(median([r.mem_end for r in done]), 1), run_outcomes(runs)]


def preamble(title: str, module: str) -> list[str]:
    """A report's first lines: its title, the command that made it, the machine."""
    return ["# %s\n" % title, "- command: `%s`" % " ".join(["python -m " + module, *map(shlex.quote, sys.argv[1:])]),
            *machine()]


LIMITS = ("- limits: cpu.cfs_quota_us=%d per cpu.cfs_period_us=%d, memory.limit_in_bytes=%d MiB (daemon and children)"
          % (CPU_QUOTA_US, CPU_PERIOD_US, MEMORY_LIMIT // MiB))


def machine() -> list[str]:
    """Lines describing the machine, the software and the tree."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    versions = []
    for dist in ("kubernetes", "pyroute2"):
        try:
            versions.append("%s %s" % (dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            versions.append("%s missing" % dist)
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return ["- date: %s" % datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "- machine: nproc %d, %s, %d MiB RAM, kernel %s" % (os.cpu_count() or 0, model, mem, platform.release()),
            "- python: %s (%s); %s" % (platform.python_version(), PYTHON, ", ".join(versions)),
            "- tree: %s" % (git.stdout.strip() or "?")]


def emit(text: str = "") -> None:
    print(text, flush=True)


# -- main --------------------------------------------------------------------------------------------


def _interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGINT/SIGTERM: stop measuring and clean up, ignoring further signals meanwhile."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_bench(name: str, body: Callable[[], None]) -> int:
    """A benchmark's main: as root, with SIGINT and SIGTERM cleaning up what it made; the exit status."""
    if os.geteuid() != 0:
        print("%s needs root (network namespaces and cgroups)" % name, file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    # The image runs bytecode compiled when it is built (deploy/install.sh): without it every start
    # would compile pyflannel's sources again (PYTHONDONTWRITEBYTECODE), some 0.03 s of CPU.
    compileall.compile_dir(str(REPO / "pyflannel"), quiet=1)
    try:
        body()
    except KeyboardInterrupt:
        print("interrupted; everything the bench made was removed", file=sys.stderr)
        return 130
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,100,1000,5000",
                   help="comma-separated node counts for the start-up table ('' for none)")
    p.add_argument("--runs", type=int, default=3, help="runs per figure; tables show medians")
    p.add_argument("--limits", choices=("both", "on", "off"), default="both")
    p.add_argument("--churn", action="store_true", help="also measure node churn")
    p.add_argument("--churn-nodes", type=int, default=1000)
    p.add_argument("--churn-rate", type=float, default=50.0, help="changes per second")
    p.add_argument("--churn-seconds", type=float, default=20.0)
    p.add_argument("--idle", action="store_true", help="also measure idle CPU")
    p.add_argument("--idle-nodes", type=int, default=1000)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a daemon may take to be ready")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after ready before the end figures")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stack", choices=tuple(STACK_FAMILIES), default="v4",
                   help="the pod network's families: IPv4, dual-stack or IPv6-only (peers get a pod CIDR, public "
                        "IP and VtepMAC per family)")
    args = p.parse_args(argv)
    args.node_counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    if any(n < 1 for n in args.node_counts) or args.runs < 1:
        p.error("node counts and --runs must be at least 1")
    args.modes = {"both": [True, False], "on": [True], "off": [False]}[args.limits]
    return args


class Bench:
    """Runs the measurements the arguments ask for and prints the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.shown_command = False

    def run(self, nodes: int, limits: bool, label: str, after_ready: Callable[[Setup], Any],
            spare: int = 0) -> tuple[StartResult, Any]:
        """One cluster: start the daemon, wait for it, then ``after_ready(setup)`` if it got ready."""
        with Setup(nodes, limits, spare, self.args.stack) as setup:
            setup.start()
            if not self.shown_command:
                emit("daemon command line: `%s`\n" % setup.command_line)
                self.shown_command = True
            start = setup.wait_ready(self.args.timeout, self.args.settle)
            after = after_ready(setup) if start.outcome == "ok" else None
            line = ("- %s N=%d limits=%s: subnet.env %s s, all peers %s s, mem peak %s/%s MiB (rss %s), "
                    "cpu %s s (%s s at the end), %s") % (
                label, nodes, "on" if limits else "off", fmt(start.subnet_env), fmt(start.all_peers),
                fmt(start.mem_ready, 1), fmt(start.mem_end, 1), fmt(start.rss_end, 1), fmt(start.cpu_ready),
                fmt(start.cpu_end), start.outcome)
            if start.ended is not None:
                line += " after %.2f s" % start.ended
            if after is not None:
                line += "; " + ", ".join("%s %s" % (k.replace("_", " "), brief(v))
                                         for k, v in dataclasses.asdict(after).items())
            if start.outcome != "ok":
                line += "\n  log: " + setup.log_tail()
            emit(line)
            return start, after

    def main(self) -> None:
        args = self.args
        for line in preamble("pyflannel footprint", "bench.footprint"):
            emit(line)
        emit("- stack: %s (%s)" % (args.stack, ", ".join(FAMILY[f][0] for f in STACK_FAMILIES[args.stack])))
        emit(LIMITS)
        emit("- daemon: the Cluster's command line with %s appended (the defaults, as in the manifest); "
             "the goals are the issue's, under the limits unless stated otherwise" % " ".join(DAEMON_FLAGS))
        emit("\n## Runs\n")
        sections = []
        if args.node_counts:
            rows = []
            for n in args.node_counts:
                for limits in args.modes:
                    starts = [self.run(n, limits, "start %d/%d" % (i + 1, args.runs), lambda s: None)[0]
                              for i in range(args.runs)]
                    rows.append(start_row(n, limits, starts, args.stack))
            sections.append("## Start-up (median of %d)\n\n" % args.runs + table(
                ["N", "limits", "subnet.env s", "goal", "all peers s", "goal", "mem peak at ready MiB",
                 "mem peak end MiB", "goal", "CPU s to ready", "outcome"], rows))
        if args.churn:
            rows = []
            spare = int(args.churn_rate * args.churn_seconds) // 3 + 1
            for limits in args.modes:
                churns = [self.run(args.churn_nodes, limits, "churn %d/%d" % (i + 1, args.runs),
                                   lambda s: churn(s, args.churn_rate, args.churn_seconds, DRAIN, self.rng),
                                   spare=spare)
                          for i in range(args.runs)]
                rows.append(churn_row(limits, churns))
            sections.append("## Churn: %d nodes, %g changes/s for %g s (median of %d)\n\n"
                            % (args.churn_nodes, args.churn_rate, args.churn_seconds, args.runs) + table(
                                ["limits", "changes", "missed", "p50 ms", "p99 ms", "goal", "p99 add/mac/del ms",
                                 "millicores", "goal", "stale entries", "outcome"], rows))
        if args.idle:
            rows = []
            for limits in args.modes:
                idles = [self.run(args.idle_nodes, limits, "idle %d/%d" % (i + 1, args.runs),
                                  lambda s: idle(s, args.idle_seconds)) for i in range(args.runs)]
                rows.append(idle_row(limits, idles))
            sections.append("## Idle: %d nodes, no changes, iptables resync every 5 s (median of %d)\n\n"
                            % (args.idle_nodes, args.runs) + table(
                                ["limits", "seconds", "millicores", "goal", "mem peak MiB", "outcome"], rows))
        for section in sections:
            emit("\n" + section)
        emit("\n## Reference: flanneld v0.20.2 (figures from the issue)\n")
        emit(table(["limits", "N", "subnet.env s", "all peers s", "mem peak MiB", "outcome"],
                   [[lim, str(n), *rest] for lim, n, *rest in REFERENCE]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bench.footprint", Bench(args).main)


if __name__ == "__main__":
    sys.exit(main())
