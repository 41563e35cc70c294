"""The daemon's life without root: its loop, supervision and heartbeats, against fake collaborators."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pyflannel import daemon, flags, metrics, subnetfile
from pyflannel.backend.vxlan import VXLANNetwork
from pyflannel.config import VXLANConfig
from pyflannel.family import IPV4, IPV6, Family
from pyflannel.kubeclient import ApiError
from pyflannel.lease import Lease
from pyflannel.log import KlogFormatter, V
from pyflannel.subnet.kube import PROGRESS_BOUND
from tests import test_vxlan
from tests.conftest import needs_netns
from tests.test_deploy import container
from tests.test_vxlan import V4, V6
from tools.netcluster import Cluster

PREFIX = "flannel.alpha.coreos.com/"

KLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")
ENV = subnetfile.SubnetEnv({IPV4: (IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"))}, 1450, True)


@pytest.fixture
def klog() -> Iterator[io.StringIO]:
    """pyflannel's log, formatted as klog, at -v=0."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(KlogFormatter())
    logger = logging.getLogger("pyflannel")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(V(0))
    yield out
    logger.removeHandler(handler)
    logger.setLevel(level)


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- node_name ----------------------------------------------------------------------------------------


class FakeClient:
    def __init__(self, pod: dict[str, Any] | ApiError) -> None:
        self.pod = pod

    def get_pod(self, ns: str, name: str) -> dict[str, Any]:
        if isinstance(self.pod, ApiError):
            raise self.pod
        return self.pod


def test_node_name() -> None:
    client: Any = FakeClient({"spec": {"nodeName": "k8s02"}})
    assert daemon.node_name(client, {"NODE_NAME": "k8s01", "POD_NAME": "p", "POD_NAMESPACE": "ns"}) == "k8s01"
    assert daemon.node_name(client, {"POD_NAME": "p", "POD_NAMESPACE": "ns"}) == "k8s02"
    with pytest.raises(daemon.NodeNameError, match="^env variables POD_NAME and POD_NAMESPACE must be set$"):
        daemon.node_name(client, {"POD_NAME": "p"})
    pod_env = {"POD_NAME": "p", "POD_NAMESPACE": "ns"}
    with pytest.raises(daemon.NodeNameError, match="^node name not present in pod spec 'ns/p'$"):
        daemon.node_name(FakeClient({"spec": {}}), pod_env)  # type: ignore[arg-type]
    with pytest.raises(daemon.NodeNameError, match="^error retrieving pod spec for 'ns/p': "):
        daemon.node_name(FakeClient(ApiError(403, "forbidden")), pod_env)  # type: ignore[arg-type]


# -- the loop, with a fake subnet manager and a fake backend --------------------------------------------


STACKS = {IPV4: V4, IPV6: V6}


def lease(i: int, family: Family = IPV4) -> Lease:
    return STACKS[family].lease(i)


class FakeSubnetManager:
    node_name = "self"

    def __init__(self, families: tuple[Family, ...] = (IPV4,)) -> None:
        self.progress = time.monotonic()
        self.synced = threading.Event()
        self.synced.set()
        self._leases = {f: {"k8s02": lease(2, f)} for f in families}
        self.own = {f: lease(1, f) for f in families}  # what this node's record in the API says
        self.acquired: list[tuple[Any, ...]] = []

    def acquire_lease(self, public_ips: dict[Family, Any], backend_type: str,
                      backend_data: dict[Family, str]) -> dict[Family, Lease]:
        self.acquired.append((public_ips, backend_type, backend_data))
        return dict(self.own)

    def leases(self, family: Family) -> dict[str, Lease]:
        return dict(self._leases[family])

    def lease_of(self, name: str, family: Family) -> Lease | None:
        return self._leases[family].get(name)


class FakeBackend:
    """Records what the loop asks of the datapath; ``fail`` makes the next sync raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail: Exception | None = None
        self.device_ok = True
        self.mtu = 1450

    def backend_data(self) -> str:
        return '{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"}'

    def sync(self, leases: dict[str, Lease | None]) -> set[str]:
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        self.calls.append(("sync", leases))
        return set(leases)

    def restore(self, deleted: list[Any]) -> int:
        self.calls.append(("restore", deleted))
        return 0

    def reconcile(self, leases: dict[str, Lease]) -> int:
        self.calls.append(("reconcile", leases))
        return 0

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


def make_daemon(tmp_path: Path, resync: int = 3600, backends: dict[Family, Any] | None = None) -> daemon.Daemon:
    """A daemon as start() leaves it, with a fake subnet manager and ``backends`` (a FakeBackend for IPv4)."""
    opts = flags.parse(["--kube-subnet-mgr", "--datapath-resync=%d" % resync,
                        "--subnet-file=%s" % (tmp_path / "subnet.env")], {})
    d = daemon.Daemon(opts)
    d.backends = backends or {IPV4: FakeBackend()}
    families = tuple(d.backends)
    d.sm = FakeSubnetManager(families)  # type: ignore[assignment]
    d.subnet_file = subnetfile.Keeper(opts.subnet_file, ENV)
    d.leases = {f: lease(1, f) for f in families}
    addrs = {IPV4: SimpleNamespace(ext_addr=IPv4Address("192.168.56.11")),
             IPV6: SimpleNamespace(ext_addr=IPv6Address("fd56::11"))}
    d.ext = SimpleNamespace(addrs=addrs)  # type: ignore[assignment]
    d.subnet_file.write()
    d._next_full = time.monotonic() + resync
    d._next_file_check = time.monotonic() + daemon.SUBNET_FILE_CHECK
    d.datapath_ready = True  # as after start()
    return d


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[daemon.Daemon, FakeBackend, threading.Thread]]:
    """A daemon whose loop runs under its supervisor in a thread, as after start-up."""
    d = make_daemon(tmp_path)
    d.supervisor.first_delay = 0.05
    backend: Any = d.backends[IPV4]
    thread = threading.Thread(target=d.supervisor.run, args=("main loop", d.loop))
    thread.start()
    yield d, backend, thread
    d.stop.set()
    d._wake.set()
    thread.join(5)
    assert not thread.is_alive()


def test_loop_applies_node_changes_and_kernel_deletions(running: Any) -> None:
    d, backend, _ = running
    d._on_change({"k8s02", "gone"})
    wait_until(lambda: backend.calls)
    assert backend.calls == [("sync", {"k8s02": lease(2), "gone": None})]
    d._on_deleted([("route", 254, "10.244.2.0/24")])
    wait_until(lambda: len(backend.calls) == 3)
    assert backend.calls[1:] == [("restore", [("route", 254, "10.244.2.0/24")]), ("sync", {})]


def test_programming_latency_counts_from_the_api_server_s_time(running: Any) -> None:
    """kube-proxy's network programming latency: from the change's time at the API server when the event
    has one (a clock ahead of ours counts as no delay), else from its arrival."""
    d, backend, _ = running
    registry = metrics.enable("test")
    try:
        def observed() -> tuple[float, float]:
            count = registry.get_sample_value("pyflannel_network_programming_duration_seconds_count") or 0.0
            return count, registry.get_sample_value("pyflannel_network_programming_duration_seconds_sum") or 0.0

        d._on_change({"k8s02"}, time.time() - 20)
        wait_until(lambda: observed()[0] == 1)
        assert 20 <= observed()[1] < 40
        assert registry.get_sample_value("pyflannel_network_programming_duration_seconds_bucket", {"le": "20.0"}) == 0
        d._on_change({"k8s03"}, time.time() + 3600)
        d._on_change({"k8s04"})
        wait_until(lambda: observed()[0] == 3)
        assert observed()[1] - 20 < 20
    finally:
        metrics.disable()


def test_readiness_needs_every_family_s_device_and_rules(tmp_path: Path) -> None:
    """Ready, as /readyz and the pyflannel_ready gauge say, only while every device and the rules are there."""
    b4, b6 = FakeBackend(), FakeBackend()
    d = make_daemon(tmp_path, backends={IPV4: b4, IPV6: b6})
    registry = metrics.enable("test")
    try:
        def gauge() -> float | None:
            return registry.get_sample_value("pyflannel_ready")

        assert d.ready() and gauge() == 1
        b6.device_ok = False
        assert not d.ready() and gauge() == 0
        b6.device_ok = True
        d.traffic = SimpleNamespace(ready=False)  # type: ignore[assignment]
        assert not d.ready() and gauge() == 0
        d.traffic.ready = True
        assert d.ready() and gauge() == 1
    finally:
        metrics.disable()


def running_stack(stacks: tuple[Any, ...]) -> tuple[Any, dict[Family, Any]]:
    """A node's fake kernel with a started VXLAN network of each stack, nodes 2 and 3 programmed."""
    nl, first = test_vxlan.start(stacks[0])
    networks = {stacks[0].family: first}
    for stack in stacks[1:]:
        network = VXLANNetwork(nl, VXLANConfig(), stack.family, first.ext, stack.network)
        network.create_device(test_vxlan.MAC)
        network.configure_device(stack.own)
        network.reconcile(stack.leases(1, 2, 3))
        networks[stack.family] = network
    nl.take_events()
    return nl, networks


@pytest.mark.parametrize("stacks", [pytest.param((V4,), id="ipv4"), pytest.param((V4, V6), id="dual-stack"),
                                    pytest.param((V6,), id="ipv6")])
def test_loop_keeps_a_fake_kernel_converged(tmp_path: Path, stacks: tuple[Any, ...]) -> None:
    """The loop with the real VXLAN networks on a fake kernel, one per family: a new node is programmed
    in each, an entry deleted by hand is put back, a node that goes is removed from each."""
    nl, networks = running_stack(stacks)
    d = make_daemon(tmp_path, backends=networks)
    sm: Any = d.sm
    sm._leases = {s.family: s.leases(2, 3) for s in stacks}
    thread = threading.Thread(target=d.loop, args=(d.stop,))
    thread.start()

    def converged(*nodes: int) -> bool:
        return all(nl.datapath(s.device) == s.expected(*nodes) for s in stacks)

    try:
        for s in stacks:
            sm._leases[s.family]["k8s04"] = s.lease(4)
        d._on_change({"k8s04"})
        wait_until(lambda: converged(2, 3, 4))
        for s in stacks:
            nl.ip_route_del(s.subnet(2))
            nl.ip_neigh_del(s.gw(3), s.device)
        d._on_deleted(nl.take_events())  # as the kernel-events listener hands them on
        wait_until(lambda: converged(2, 3, 4))
        for s in stacks:
            del sm._leases[s.family]["k8s02"]
        d._on_change({"k8s02"})
        wait_until(lambda: converged(3, 4))
        nl.ip_link_del(stacks[-1].device)
        d._on_deleted(nl.take_events())
        wait_until(lambda: nl.find(stacks[-1].device) is not None and converged(3, 4))
        assert d.ready()
    finally:
        d.stop.set()
        d._wake.set()
        thread.join(5)


def test_a_change_of_this_node_publishes_the_lease_again(running: Any, klog: io.StringIO) -> None:
    d, backend, _ = running
    sm = d.sm
    d._on_change({"self"})
    wait_until(lambda: backend.calls)
    assert sm.acquired == [({IPV4: IPv4Address("192.168.56.11")}, "vxlan",
                            {IPV4: '{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"}'})]
    assert backend.calls == [("sync", {})]
    sm.own = {IPV4: lease(7)}  # someone changed this node's pod CIDR: said once, applied at the next start
    d._on_change({"self"})
    wait_until(lambda: len(backend.calls) == 2)
    d._on_change({"self"})
    wait_until(lambda: len(backend.calls) == 3)
    assert len(sm.acquired) == 3
    assert klog.getvalue().count("The pod CIDR of this node changed from 10.244.1.0/24 to 10.244.7.0/24") == 1


def test_a_dual_stack_node_publishes_both_families(tmp_path: Path) -> None:
    d = make_daemon(tmp_path, backends={IPV4: FakeBackend(), IPV6: FakeBackend()})
    sm: Any = d.sm
    d._own_node_changed()
    assert sm.acquired == [({IPV4: IPv4Address("192.168.56.11"), IPV6: IPv6Address("fd56::11")}, "vxlan",
                            {IPV4: '{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"}',
                             IPV6: '{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"}'})]


def test_a_failed_turn_restarts_the_loop_with_a_full_reconcile(running: Any, klog: io.StringIO) -> None:
    d, backend, _ = running
    backend.fail = RuntimeError("kernel says no")
    d._on_change({"k8s02"})
    wait_until(lambda: "reconcile" in backend.kinds())
    lines = [line for line in klog.getvalue().splitlines() if not line.endswith("] flannel is ready")]
    assert len(lines) == 1 and KLOG.match(lines[0]), lines
    assert re.search(r"\] The main loop failed: RuntimeError: kernel says no \(at daemon\.py:\d+ in loop\); "
                     r"restarting it in 0\.05s$", lines[0])
    assert not d.stop.is_set()


def test_no_lost_wake_up_when_a_change_arrives_during_the_swap(tmp_path: Path) -> None:
    """A change that arrives the moment _take_dirty has swapped the pending changes wakes the loop."""
    d = make_daemon(tmp_path)

    class ChangeOnRelease:
        """The daemon's lock, with a node change arriving the moment the swap releases it (once)."""

        def __init__(self, lock: Any) -> None:
            self.lock = lock
            self.armed = True

        def __enter__(self) -> None:
            self.lock.acquire()

        def __exit__(self, *exc: object) -> None:
            self.lock.release()
            if self.armed:
                self.armed = False
                d._on_change({"k8s02"})

    d._on_change({"k8s03"})
    d._lock = ChangeOnRelease(d._lock)  # type: ignore[assignment]
    dirty, _ = d._take_dirty()
    assert list(dirty) == ["k8s03"]
    assert d._wake.is_set(), "the change that arrived after the swap must wake the loop"
    assert list(d._take_dirty()[0]) == ["k8s02"]


def test_the_loop_writes_subnet_env_again(tmp_path: Path, klog: io.StringIO) -> None:
    """Within SUBNET_FILE_CHECK seconds, however long --datapath-resync is."""
    d = make_daemon(tmp_path, resync=3600)
    path = tmp_path / "subnet.env"
    thread = threading.Thread(target=d.loop, args=(d.stop,))
    thread.start()
    try:
        path.unlink()
        started = time.monotonic()
        wait_until(path.exists, daemon.SUBNET_FILE_CHECK + 2)
        print("subnet.env back after %.2fs" % (time.monotonic() - started))
        assert path.read_text() == ENV.render()
        assert "Wrote subnet file to %s again: it was missing" % path in klog.getvalue()
    finally:
        d.stop.set()
        d._wake.set()
        thread.join(5)


# -- heartbeats -------------------------------------------------------------------------------------


def test_stalled_tells_which_part_stopped(tmp_path: Path, klog: io.StringIO) -> None:
    d = make_daemon(tmp_path, resync=30)
    sm: Any = d.sm
    assert d.stalled() == ""
    d._beat(30 + daemon.STEP_BOUND)
    d._beat_at -= 30 + daemon.STEP_BOUND + 5
    assert d.stalled() == "the main loop made no progress for 95s (at most 90s allowed)"
    assert d.stalled()  # logged once
    assert klog.getvalue().count("/healthz fails from now on: the main loop made no progress") == 1
    d._beat(30 + daemon.STEP_BOUND)
    assert d.stalled() == ""
    sm.progress -= PROGRESS_BOUND + 1
    assert re.fullmatch(r"the node watch made no progress for \d+s \(at most \d+s allowed\)", d.stalled())
    d.sm = None  # not created yet: only the main thread counts
    assert d.stalled() == ""


def test_waiting_for_a_pod_cidr_is_progress(tmp_path: Path) -> None:
    """The lease loop beats at every attempt, so /healthz stays 200 while the node has no pod CIDR."""
    d = make_daemon(tmp_path)
    d.datapath_ready = False
    d._beat_at -= daemon.STEP_BOUND + 1
    assert d.stalled() == "the start-up made no progress for 61s (at most 60s allowed)"
    d._beat(daemon.LEASE_RETRY + daemon.STEP_BOUND)
    assert d.stalled() == ""


# -- supervision ------------------------------------------------------------------------------------


def supervisor(**kw: Any) -> tuple[daemon.Supervisor, list[str]]:
    gave_up: list[str] = []
    stop = threading.Event()
    sup = daemon.Supervisor(stop, lambda: gave_up.append("gave up"), first_delay=0.01, **kw)
    return sup, gave_up


def test_a_failed_worker_is_restarted_with_backoff(klog: io.StringIO) -> None:
    sup, gave_up = supervisor()
    runs: list[float] = []

    def worker(stop: threading.Event) -> None:
        runs.append(time.monotonic())
        if len(runs) <= 3:
            subnetfile.parse(None)  # type: ignore[arg-type]
        stop.wait()

    thread = sup.spawn("kernel events", worker)
    wait_until(lambda: len(runs) == 4)
    sup.stop.set()
    thread.join(5)
    assert not thread.is_alive() and not gave_up
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02 and gaps[2] >= 0.04
    lines = klog.getvalue().splitlines()
    assert len(lines) == 3 and all(KLOG.match(line) for line in lines)
    assert re.search(r"\] The kernel events failed: AttributeError: 'NoneType' object has no attribute "
                     r"'splitlines' \(at subnetfile\.py:\d+ in parse\); restarting it in 0\.01s$", lines[0])
    assert lines[2].endswith("; restarting it in 0.04s")


def test_a_worker_that_keeps_failing_makes_the_process_exit(klog: io.StringIO) -> None:
    sup, gave_up = supervisor(max_restarts=2)

    def worker(stop: threading.Event) -> None:
        raise OSError(105, "No buffer space available")

    sup.run("iptables", worker)
    assert gave_up == ["gave up"]
    lines = klog.getvalue().splitlines()
    assert len(lines) == 3
    assert re.search(r"\] The iptables failed: OSError: \[Errno 105\] No buffer space available "
                     r"\(at daemon\.py:\d+ in run\); it failed 3 times in a row: exiting, for the kubelet "
                     r"to restart pyflannel \(the datapath stays in place\)$", lines[2])


def test_a_long_healthy_run_forgives_earlier_failures() -> None:
    sup, gave_up = supervisor(max_restarts=1, healthy_run=0.05)
    runs: list[int] = []

    def worker(stop: threading.Event) -> None:
        runs.append(1)
        if len(runs) < 5:
            time.sleep(0.06)  # ran long enough: each failure is the first of its row
            raise RuntimeError("again")

    sup.run("node watch", worker)
    assert len(runs) == 5 and not gave_up


def test_a_worker_that_returns_is_not_restarted() -> None:
    sup, gave_up = supervisor()
    runs: list[int] = []
    sup.run("iptables", lambda stop: runs.append(1))  # e.g. iptables gave up: no binary
    assert runs == [1] and not gave_up


def test_the_traceback_follows_at_v2(klog: io.StringIO) -> None:
    logging.getLogger("pyflannel").setLevel(V(2))
    try:
        raise ValueError("bad\nvalue")
    except ValueError as exc:
        daemon.log_exception("The main loop", exc)
    lines = klog.getvalue().splitlines()
    assert re.search(r"\] The main loop failed: ValueError: bad value \(at test_daemon\.py:\d+ in "
                     r"test_the_traceback_follows_at_v2\)$", lines[0])
    assert all(KLOG.match(line) for line in lines)
    assert lines[1].endswith("] Traceback (most recent call last):") and lines[-1].endswith("] value")


def test_uncaught_exceptions_in_threads_are_logged_in_klog(klog: io.StringIO) -> None:
    hooks = (daemon.sys.excepthook, threading.excepthook)
    daemon.install_excepthooks()
    try:
        def boom() -> None:
            raise RuntimeError("uncaught")

        thread = threading.Thread(target=boom, name="worker-x")
        thread.start()
        thread.join()
    finally:
        daemon.sys.excepthook, threading.excepthook = hooks
    lines = klog.getvalue().splitlines()
    assert len(lines) == 1 and KLOG.match(lines[0])
    assert "] Thread worker-x failed: RuntimeError: uncaught (at test_daemon.py:" in lines[0]


# -- the manifest's probe -----------------------------------------------------------------------------


def test_liveness_probe_restarts_a_stall_but_not_a_slow_start() -> None:
    """The kubelet restarts the container after failureThreshold failed probes in a row: a stall is
    caught within a few minutes, and a probe answered slowly under 100m CPU is not a failure."""
    probe = container("kube-flannel")["livenessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    assert probe["timeoutSeconds"] >= 5
    assert probe["failureThreshold"] >= 3
    assert probe["periodSeconds"] * probe["failureThreshold"] <= 60
    # /healthz itself turns 503 only after a bound: --datapath-resync (30 s) + STEP_BOUND for the main loop.
    assert 30 + daemon.STEP_BOUND + probe["periodSeconds"] * probe["failureThreshold"] <= 180


# -- a dual-stack daemon on a real kernel ------------------------------------------------------------


def _device(cluster: Any, node: Any, name: str) -> tuple[str, bool, list[str]]:
    """The device's MAC, whether it is up, and its global addresses, as ``ip`` shows them ('' if absent)."""
    res = cluster.ns_run(node.netns, "ip", "-j", "addr", "show", "dev", name, check=False)
    if res.returncode != 0:
        return "", False, []
    link = json.loads(res.stdout)[0]
    addrs = ["%s/%d" % (a["local"], a["prefixlen"]) for a in link.get("addr_info", []) if a.get("scope") == "global"]
    return link["address"], "UP" in link["flags"], addrs


def _entries(cluster: Any, node: Any, peer: Any) -> dict[str, bool]:
    """Whether node holds peer's route, neighbour and FDB entry of each family of the cluster (the
    spec's §10 lines)."""
    env, found = cluster.subnet_env(peer), {}
    for family, device, public in ((IPV4, "flannel.1", peer.ip), (IPV6, "flannel-v6.1", peer.ip6)):
        if family.env_subnet not in env:
            continue
        gw = str(family.network(env[family.env_subnet]).network_address)
        v = "-%d" % family.version
        found[device] = ("via %s dev %s" % (gw, device) in cluster.ns_run(node.netns, "ip", v, "route").stdout and
                         "%s dev %s lladdr" % (gw, device) in
                         cluster.ns_run(node.netns, "ip", v, "neigh", "show", "nud", "permanent").stdout and
                         "dev %s dst %s self permanent" % (device, public) in
                         cluster.ns_run(node.netns, "bridge", "fdb", "show").stdout)
    return found


@needs_netns
@pytest.mark.netns
@pytest.mark.parametrize("stack", ["dual", "v6"])
def test_the_daemon_programs_and_repairs_each_family_s_device(tmp_path: Path, stack: str) -> None:
    """Two pyflannel processes in a dual-stack (and an IPv6-only) cluster: each family's device with its
    address and the MAC annotated, the other node's entries in each family, pods that ping over each;
    then faults of flannel-v6.1 injected from outside the daemon, each repaired (time to recovery
    printed); devices lost while the daemon was down come back with the annotated MACs; the other
    node's deletion removes its entries of both families."""
    with Cluster(tmp_path, stack=stack) as cluster:
        n1, n2 = cluster.add_node("k8s01"), cluster.add_node("k8s02")
        for node in (n1, n2):
            cluster.start(node)
        for node in (n1, n2):
            cluster.wait_ready(node)
        assert cluster.api is not None
        notes = cluster.api.get_node("k8s01")["metadata"]["annotations"]
        mac6 = json.loads(notes[PREFIX + "backend-v6-data"])["VtepMAC"]
        assert notes[PREFIX + "public-ipv6"] == n1.ip6 == "fd56::11"
        assert _device(cluster, n1, "flannel-v6.1") == (mac6, True, ["fd00:10:244:1::/128"])
        if stack == "dual":
            mac4 = json.loads(notes[PREFIX + "backend-data"])["VtepMAC"]
            assert _device(cluster, n1, "flannel.1") == (mac4, True, ["10.244.1.0/32"])
        else:
            assert _device(cluster, n1, "flannel.1") == ("", False, []) and PREFIX + "backend-data" not in notes
        cluster.wait_for("k8s02's entries on k8s01", lambda: all(_entries(cluster, n1, n2).values()))
        p1, p2 = cluster.add_pod(n1, "pod1"), cluster.add_pod(n2, "pod2")
        assert p2.ip6 is not None and len(p2.ips) == (2 if stack == "dual" else 1)
        assert all(cluster.ping(p1, ip) for ip in p2.ips)
        peer6 = json.loads(cluster.api.get_node("k8s02")["metadata"]["annotations"][PREFIX + "backend-v6-data"])
        for fault in (("ip", "link", "del", "flannel-v6.1"), ("ip", "link", "set", "flannel-v6.1", "down"),
                      ("ip", "-6", "addr", "flush", "dev", "flannel-v6.1", "scope", "global"),
                      ("ip", "-6", "route", "del", "fd00:10:244:2::/64", "dev", "flannel-v6.1"),
                      ("ip", "-6", "neigh", "del", "fd00:10:244:2::", "dev", "flannel-v6.1"),
                      ("bridge", "fdb", "del", peer6["VtepMAC"], "dev", "flannel-v6.1", "dst", "fd56::12")):
            started = time.monotonic()
            cluster.ns_run(n1.netns, *fault)
            cluster.wait_for("recovery from %s" % " ".join(fault), lambda: (
                _device(cluster, n1, "flannel-v6.1") == (mac6, True, ["fd00:10:244:1::/128"])
                and all(_entries(cluster, n1, n2).values())), timeout=60, interval=0.05)
            print("%s (%s): recovered in %.2fs" % (" ".join(fault), stack, time.monotonic() - started))
            cluster.wait_for("pod1 -> pod2 over IPv6", lambda: cluster.ping(p1, p2.ip6 or ""), timeout=30)
        if stack == "dual":  # the other family was left alone
            assert _device(cluster, n1, "flannel.1") == (mac4, True, ["10.244.1.0/32"])
        # Devices lost while the daemon is down (a reboot) come back with the MACs the annotations advertise.
        cluster.stop(n1)
        for device in ("flannel.1", "flannel-v6.1"):
            cluster.ns_run(n1.netns, "ip", "link", "del", device, check=False)
        cluster.start(n1)
        cluster.wait_ready(n1)
        assert _device(cluster, n1, "flannel-v6.1") == (mac6, True, ["fd00:10:244:1::/128"])
        if stack == "dual":
            assert _device(cluster, n1, "flannel.1") == (mac4, True, ["10.244.1.0/32"])
        cluster.wait_for("k8s02's entries on k8s01 again", lambda: all(_entries(cluster, n1, n2).values()))
        cluster.api.delete_node("k8s02")
        cluster.wait_for("k8s02's entries gone from k8s01", lambda: not any(_entries(cluster, n1, n2).values()))
