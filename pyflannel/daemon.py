"""The daemon's life: flanneld's start-up order, the loop that keeps the kernel converged, shutdown."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from ipaddress import IPv4Network
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Protocol

from . import __version__, brnetfilter, config, health, heap, ip, metrics, subnetfile, trafficmngr
from .backend.hostgw import BackendError, HostGWNetwork
from .backend.vxlan import DeviceError, VXLANNetwork, log_config
from .blackhole import BlackholeRoutes
from .etcdclient import EtcdClient, EtcdError, read_password_file
from .family import IPV4, IPV6, Family, IPNetwork
from .flags import FlagError, Options, continue_when_cache_not_ready, describe, event_queue_depth, go_quote
from .kubeclient import ApiError, KubeClient
from .lease import Lease, LeaseError, LeaseRevoked
from .log import V
from .netlink import Deletion, Monitor, Netlink
from .subnet import SubnetManager
from .subnet.annotations import AnnotationKeys, node_public_ips, normalize_prefix
from .subnet.etcd import CONFIG_RETRY, EtcdSubnetManager
from .subnet.kube import PROGRESS_BOUND, KubeSubnetManager
from .subnet.nodenet import node_network, warn_overlap

if TYPE_CHECKING:
    from .probe import Prober

log = logging.getLogger(__name__)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

SHUTDOWN_GRACE = 4.0  # seconds; SIGTERM must end the process within 5
LEASE_RETRY = 10.0  # seconds between lease attempts when nothing on the node changes
DEVICE_RETRY = 5.0  # seconds between looks at a backend whose device or interface is unusable (no news of its return)
SUBNET_FILE_CHECK = 5.0  # seconds between looks at subnet.env (one stat): a pod created while it is missing fails
SYNC_TIMEOUT = 600.0  # seconds to wait for the first node list, as flanneld
BR_NETFILTER_RETRY = 5.0  # seconds between looks for br_netfilter while it is missing
# The most seconds one step of the start-up, or one turn of the loop, may work: an API request with
# its connect and read timeouts (40 s), or a full reconcile of 5,000 nodes under 100m CPU (about 10 s).
# /healthz says the main thread stalled when it has not beaten for its wait plus this.
STEP_BOUND = 60.0
RESTART_DELAY = 1.0  # seconds before a failed worker runs again; doubled at each failure in a row
MAX_RESTARTS = 5  # restarts in a row, after which the process exits for the kubelet to restart it
HEALTHY_RUN = 60.0  # seconds a worker must run for its next failure to count as the first

POD_CIDR_HINT = (
    'Node "%s" has no pod CIDR: the controller-manager assigns them only with --allocate-node-cidrs=true and '
    '--cluster-cidr=%s (the Network, and the IPv6Network of dual-stack, of net-conf.json; with kubeadm, '
    '--pod-network-cidr=%s). '
    "Waiting for the node's spec.podCIDR; pyflannel carries on as soon as it is set."
)
BR_NETFILTER_HINT = (
    "The br_netfilter module is not loaded: without it, traffic between pods on this node's bridge bypasses "
    "iptables, and pods cannot reach Services whose endpoints are on this node. Load it (%s; %s). "
    "pyflannel waits, not ready, and carries on as soon as it is loaded."
) % tuple(brnetfilter.FIXES)


class Backend(Protocol):
    """One family's network of a backend (``backend.vxlan.VXLANNetwork``, ``backend.hostgw.HostGWNetwork``):
    what the daemon's start-up and loop call."""

    device_ok: bool  # what it needs in the kernel (the VXLAN device, host-gw's interface) is there

    @property
    def mtu(self) -> int: ...

    def backend_data(self) -> str: ...

    def sync(self, leases: dict[str, Lease | None]) -> set[str]: ...

    def reconcile(self, leases: dict[str, Lease]) -> int: ...

    def restore(self, deleted: list[Deletion]) -> int: ...


class Fatal(Exception):
    """A start-up error that ends the daemon with exit code 1; the message is flanneld's."""


class NodeNameError(Exception):
    """This node's name cannot be found; the message is flanneld's (after "Failed to create SubnetManager: ")."""


def node_name(client: KubeClient, environ: Mapping[str, str] = os.environ) -> str:
    """This node's name: NODE_NAME, or the spec.nodeName of the pod POD_NAME in POD_NAMESPACE.

    Raises NodeNameError."""
    name = environ.get("NODE_NAME", "")
    if name:
        return name
    pod, ns = environ.get("POD_NAME", ""), environ.get("POD_NAMESPACE", "")
    if not pod or not ns:
        raise NodeNameError("env variables POD_NAME and POD_NAMESPACE must be set")
    try:
        name = (client.get_pod(ns, pod).get("spec") or {}).get("nodeName") or ""
    except ApiError as exc:
        raise NodeNameError("error retrieving pod spec for '%s/%s': %s (NODE_NAME is unset, so the node name is "
                            "read from this pod, which needs get on pods in namespace %s; set NODE_NAME from the "
                            "pod's spec.nodeName instead, as the manifest does, and drop that permission)"
                            % (ns, pod, exc, ns)) from exc
    if not name:
        raise NodeNameError("node name not present in pod spec '%s/%s'" % (ns, pod))
    return name


def log_exception(what: str, exc: BaseException, outcome: str = "") -> None:
    """One error line: what failed, the exception and where it was raised (the innermost frame in
    pyflannel, if any), then ``outcome``.

    The traceback follows at -v=2, one log line per line, so that the log stays in its format."""
    frames = traceback.extract_tb(exc.__traceback__)
    frame = next((f for f in reversed(frames) if f.filename.startswith(_PACKAGE_DIR)), frames[-1] if frames else None)
    where = " (at %s:%s in %s)" % (os.path.basename(frame.filename), frame.lineno, frame.name) if frame else ""
    log.error("%s failed: %s: %s%s%s", what, type(exc).__name__, str(exc).replace("\n", " "), where, outcome)
    if log.isEnabledFor(V(2)):
        for part in traceback.format_exception(type(exc), exc, exc.__traceback__):
            for line in part.rstrip("\n").split("\n"):
                log.log(V(2), "%s", line)


def install_excepthooks() -> None:
    """Log an exception that nothing caught, in any thread, in the log's format instead of Python's."""

    def main_hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        log_exception("pyflannel", exc, "; exiting")

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and not isinstance(args.exc_value, SystemExit):
            log_exception("Thread %s" % (args.thread.name if args.thread else "?"), args.exc_value)

    sys.excepthook = main_hook
    threading.excepthook = thread_hook


class Supervisor:
    """Runs the daemon's workers and restarts one that fails with an unexpected exception.

    A worker is a function ``target(stop)`` that works until ``stop`` is set. When it raises, the
    error is logged and the worker runs again after RESTART_DELAY seconds, doubled at every failure
    in a row (a run of HEALTHY_RUN seconds ends a row). After MAX_RESTARTS restarts in a row,
    ``give_up()`` is called: the process then exits non-zero and the kubelet restarts it afresh,
    while the datapath stays in the kernel.
    """

    def __init__(self, stop: threading.Event, give_up: Callable[[], None], first_delay: float = RESTART_DELAY,
                 max_restarts: int = MAX_RESTARTS, healthy_run: float = HEALTHY_RUN) -> None:
        self.stop = stop
        self.give_up = give_up
        self.first_delay = first_delay
        self.max_restarts = max_restarts
        self.healthy_run = healthy_run

    def spawn(self, name: str, target: Callable[[threading.Event], None]) -> threading.Thread:
        """Run the worker in a daemon thread of its own."""
        thread = threading.Thread(target=self.run, args=(name, target), name=name, daemon=True)
        thread.start()
        return thread

    def run(self, name: str, target: Callable[[threading.Event], None]) -> None:
        """Run the worker in this thread until it returns, ``stop`` is set, or it failed too often."""
        failures = 0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                target(self.stop)
                return
            except Exception as exc:
                if time.monotonic() - started >= self.healthy_run:
                    failures = 0
                failures += 1
                if failures > self.max_restarts:
                    log_exception("The %s" % name, exc, "; it failed %d times in a row: exiting, for the kubelet "
                                  "to restart pyflannel (the datapath stays in place)" % failures)
                    self.give_up()
                    return
                delay = self.first_delay * 2 ** (failures - 1)
                log_exception("The %s" % name, exc, "; restarting it in %gs" % delay)
                metrics.WORKER_RESTARTS.labels(name).inc()
                self.stop.wait(delay)


class Daemon:
    """One pyflannel process, in kube mode (--kube-subnet-mgr) or etcd mode."""

    def __init__(self, opts: Options, environ: Mapping[str, str] = os.environ, proc: str = "/proc") -> None:
        self.opts = opts
        self.environ = environ  # flanneld's other variables: NODE_NAME, EVENT_QUEUE_DEPTH, CONT_WHEN_CACHE_NOT_READY
        self.proc = proc  # the root of /proc, where br_netfilter's sysctls are looked for
        self.stop = threading.Event()
        self.exit_code = 0
        self.supervisor = Supervisor(self.stop, self._give_up)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._dirty: dict[str, float] = {}  # node name -> when its change arrived
        self._deleted: list[Deletion] | None = None  # kernel deletions to check, [] = compare all
        self._next_full = 0.0  # time.monotonic() of the next full reconcile
        self._next_file_check = 0.0  # and of the next look at subnet.env
        self._beat_at = time.monotonic()  # the main thread's heartbeat ...
        self._beat_bound = STEP_BOUND  # ... and the most seconds until its next one
        self._stalled = False  # /healthz says a stall: logged once
        self._listened = False  # the kernel-events worker ran before
        self.datapath_ready = False
        self.sm: SubnetManager | None = None
        self._watch_name = "node watch" if opts.kube_subnet_mgr else "lease watch"
        self.backend_type = "vxlan"  # net-conf's Backend.Type: "vxlan" or "host-gw"
        # Per enabled family, in FAMILIES order: the backend's network, this node's lease
        self.backends: dict[Family, Backend] = {}
        self.leases: dict[Family, Lease] = {}
        self.traffic: trafficmngr.TrafficManager | None = None  # the masquerade and forward rules
        self.ext: ip.ExternalInterface | None = None
        self.subnet_file: subnetfile.Keeper | None = None
        self._subnet_error = ""  # the last failure to write subnet.env, logged once
        self._warned_subnet: dict[Family, IPNetwork] = {}  # a changed pod CIDR, said once
        self.prober: Prober | None = None
        self._said_ready = False  # "flannel is ready" was logged

    # -- signals and readiness -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("shutdownHandler sent cancel signal...")
        # A second signal kills at once, as in flanneld.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        self._shut_down(0)

    def _give_up(self) -> None:
        self.exit_code = 1
        self._shut_down(1)

    def _shut_down(self, code: int) -> None:
        """Stop every worker; exit with ``code`` if that takes longer than SHUTDOWN_GRACE."""
        self.stop.set()
        self._wake.set()
        threading.Thread(target=self._deadline, args=(code,), daemon=True).start()

    @staticmethod
    def _deadline(code: int) -> None:
        time.sleep(SHUTDOWN_GRACE)
        log.warning("Shutdown took longer than %.0fs; exiting now", SHUTDOWN_GRACE)
        logging.shutdown()
        os._exit(code)

    def _beat(self, bound: float) -> None:
        """The main thread makes progress, and will beat again within ``bound`` seconds."""
        self._beat_at = time.monotonic()
        self._beat_bound = bound

    def stalled(self) -> str:
        """What has made no progress within its bound ('' while everything works), for /healthz.

        The main thread beats at each step of the start-up and each turn of the loop; the node
        watch's progress counts until kube.PROGRESS_BOUND. Waiting for a pod CIDR is progress."""
        now = time.monotonic()
        what = ""
        if now - self._beat_at > self._beat_bound:
            what = "the %s made no progress for %.0fs (at most %.0fs allowed)" % (
                "main loop" if self.datapath_ready else "start-up", now - self._beat_at, self._beat_bound)
        elif self.sm is not None and now - self.sm.progress > PROGRESS_BOUND:
            what = "the %s made no progress for %.0fs (at most %.0fs allowed)" % (
                self._watch_name, now - self.sm.progress, PROGRESS_BOUND)
        if what and not self._stalled:
            log.error("/healthz fails from now on: %s", what)
        self._stalled = bool(what)
        return what

    def ready(self) -> bool:
        """subnet.env written, the datapath programmed, every family's device there and up, and the
        masquerade and forward rules in place. The first time it is, flanneld's ``flannel is ready`` is logged;
        the ``pyflannel_ready`` gauge follows every answer."""
        ready = self.datapath_ready and bool(self.backends) and all(b.device_ok for b in self.backends.values()) \
            and (self.traffic is None or self.traffic.ready)
        metrics.READY.set(1 if ready else 0)
        if ready and not self._said_ready:
            with self._lock:
                said, self._said_ready = self._said_ready, True
            if not said:
                log.info("flannel is ready")
        return ready

    def _on_change(self, names: set[str], changed_at: float | None = None) -> None:
        """Nodes whose leases changed; ``changed_at`` is the wall-clock time of the change at the API server,
        when the event carries one. The programming latency counts from it, else from now."""
        now = time.monotonic()
        if changed_at is not None:
            now -= max(0.0, time.time() - changed_at)  # a clock ahead of ours counts as no delay at all
        with self._lock:
            for name in names:
                self._dirty.setdefault(name, now)
        self._wake.set()

    def _on_deleted(self, deleted: list[Deletion]) -> None:
        with self._lock:
            if self._deleted is None:
                self._deleted = list(deleted)
            elif not deleted:
                self._deleted = []
            elif self._deleted:
                self._deleted += deleted
        self._wake.set()

    def _take_dirty(self) -> tuple[dict[str, float], list[Deletion] | None]:
        with self._lock:
            # Under the lock, before the swap: a change that arrives after the swap sets it again.
            self._wake.clear()
            dirty, self._dirty = self._dirty, {}
            deleted, self._deleted = self._deleted, None
        return dirty, deleted

    # -- start-up ------------------------------------------------------------------------------------

    def _kube_subnet_manager(self) -> tuple[config.Config, KubeSubnetManager]:
        opts = self.opts
        try:
            cfg = config.load(opts.net_config_path, kube=True)
        except config.ConfigError as exc:
            raise Fatal("Failed to create SubnetManager: %s" % exc) from exc
        try:
            prefix = normalize_prefix(opts.kube_annotation_prefix)
        except ValueError as exc:
            raise Fatal("Failed to create SubnetManager: error creating network manager: %s" % exc) from exc
        try:
            event_queue_depth(self.environ)  # validated as flanneld does; pyflannel has no queue it would size
        except FlagError as exc:
            raise Fatal("Failed to create SubnetManager: error creating network manager: %s" % exc) from exc
        try:
            client = KubeClient(opts.kube_api_url, opts.kubeconfig_file)
        except ApiError as exc:
            raise Fatal("Failed to create SubnetManager: %s" % exc) from exc
        try:
            node = node_name(client, self.environ)
        except NodeNameError as exc:
            raise Fatal("Failed to create SubnetManager: %s" % exc) from exc
        sm = KubeSubnetManager(client, node, AnnotationKeys.from_prefix(prefix), prefix, cfg.networks, self._on_change)
        self.supervisor.spawn(self._watch_name, sm.run)
        self._beat(STEP_BOUND)
        sm.fetch_own_node()
        log.info("Created subnet manager: %s", sm.name)
        return cfg, sm

    def _etcd_subnet_manager(self) -> tuple[config.Config, EtcdSubnetManager] | None:
        """The etcd subnet manager, once ``<prefix>/config`` holds a valid network config (None if stopped)."""
        opts = self.opts
        try:
            password = read_password_file(opts.etcd_password_file) if opts.etcd_password_file else opts.etcd_password
        except OSError as exc:
            raise Fatal("Failed to create SubnetManager: cannot read --etcd-password-file: %s" % exc) from exc
        try:
            client = EtcdClient(opts.etcd_endpoints, opts.etcd_keyfile, opts.etcd_certfile, opts.etcd_cafile,
                                opts.etcd_username, password)
        except EtcdError as exc:
            raise Fatal("Failed to create SubnetManager: %s" % exc) from exc
        _, previous = subnetfile.read_previous(opts.subnet_file, IPV4)
        sm = EtcdSubnetManager(client, opts.etcd_prefix, previous if isinstance(previous, IPv4Network) else None,
                               opts.subnet_lease_renew_margin * 60.0, self._on_change)
        log.info("Created subnet manager: %s", sm.name)
        cfg = sm.get_network_config(self.stop, lambda: self._beat(CONFIG_RETRY + STEP_BOUND))
        if cfg is None:
            return None
        self.supervisor.spawn(self._watch_name, sm.run)
        self.supervisor.spawn("lease renewal", sm.keep_lease)
        return cfg, sm

    def _acquire_lease(self, sm: SubnetManager, ext: ip.ExternalInterface,
                       networks: dict[Family, IPNetwork]) -> dict[Family, Lease] | None:
        """Acquire every family's lease, waiting (instead of exiting as flanneld does) until the node can have them."""
        last_error = ""
        while not self.stop.is_set():
            self._beat(LEASE_RETRY + STEP_BOUND)
            self._take_dirty()
            try:
                return self._publish(sm, ext)
            except LeaseError as exc:
                error = str(exc)
            if error != last_error:  # say it once, not every retry
                log.error("Error registering network: failed to acquire lease: %s", error)
                if error.endswith("pod cidr not assigned"):
                    cidrs = ",".join(str(n) for n in networks.values())
                    log.error(POD_CIDR_HINT, sm.node_name, cidrs, cidrs)
                last_error = error
            # The watch wakes us the moment the node (or, with etcd, any lease) changes.
            self._wake.wait(LEASE_RETRY)
        return None

    def _publish(self, sm: SubnetManager, ext: ip.ExternalInterface) -> dict[Family, Lease]:
        """Acquire the leases, publishing each family's public IP and backend data; raises LeaseError."""
        return sm.acquire_lease({f: ext.addrs[f].ext_addr for f in self.backends}, self.backend_type,
                                {f: b.backend_data() for f, b in self.backends.items()})

    def _backends(self, cfg: config.Config, sm: SubnetManager, nl: Netlink,
                  ext: ip.ExternalInterface) -> dict[Family, Backend]:
        """net-conf's backend for every enabled family, with its device where it has one (flanneld's
        RegisterNetwork up to the lease): a new VXLAN device takes the MAC this node advertises."""
        if cfg.vxlan is not None:
            log_config(cfg.vxlan, ext)
        backends: dict[Family, Backend] = {}
        for family, network in cfg.networks.items():
            try:
                if cfg.backend_type == "host-gw":
                    backends[family] = HostGWNetwork(nl, family, ext, network)
                    continue
                assert cfg.vxlan is not None  # set for "vxlan", the one other backend config accepts
                vxlan = VXLANNetwork(nl, cfg.vxlan, family, ext, network)
                vxlan.create_device(_vtep_mac(sm.published_data(family, ext.addrs[family].ext_addr)))
                backends[family] = vxlan
            except BackendError as exc:  # host-gw's New refuses in flanneld's GetBackend
                raise Fatal("Error fetching backend: %s" % exc) from exc
            except DeviceError as exc:
                raise Fatal("Error registering network: %s" % exc) from exc
        return backends

    @staticmethod
    def _protect_node_network(sm: SubnetManager, nl: Netlink, ext: ip.ExternalInterface,
                              networks: dict[Family, IPNetwork]) -> None:
        """Give the subnet manager this node's network, which no other node's lease may point into; warn
        when net-conf's Network overlaps it."""
        try:
            found = {f: node_network(nl, ext, f) for f in networks}
        except OSError as exc:
            log.error("Failed to read the addresses and routes of %s: %s; other nodes' leases are not checked "
                      "against this node's network", ext.name, exc)
            return
        for family, nodenet in found.items():
            warn_overlap(networks[family], nodenet, ext)
        sm.set_node_network(found)

    def _configure(self) -> None:
        """Give each family's device its lease's address (flanneld's RegisterNetwork after the lease)."""
        for family, backend in self.backends.items():
            if isinstance(backend, VXLANNetwork):
                try:
                    backend.configure_device(self.leases[family].subnet)
                except DeviceError as exc:
                    raise Fatal("Error registering network: %s" % exc) from exc

    def start(self) -> None:
        """Everything up to a programmed datapath; raises Fatal."""
        opts = self.opts
        created = self._kube_subnet_manager() if opts.kube_subnet_mgr else self._etcd_subnet_manager()
        if created is None or self.stop.is_set():
            return
        cfg, sm = created
        self.sm = sm
        log.info("Found network config - Backend type: %s", cfg.backend_type)
        self.backend_type = cfg.backend_type
        if not cfg.enable_nftables:
            self._wait_for_br_netfilter(tuple(cfg.networks))
        public_ip, public_ipv6 = opts.public_ip, opts.public_ipv6
        if isinstance(sm, KubeSubnetManager):
            public_ip, public_ipv6 = self._node_public_ips(sm, public_ip, public_ipv6)
        if self.stop.is_set():
            return

        nl = Netlink()
        try:
            ext = ip.select(nl, opts.iface, opts.iface_regex, opts.iface_can_reach, public_ip, public_ipv6,
                            tuple(cfg.networks))
        except ip.InterfaceError as exc:
            raise Fatal(str(exc)) from exc
        self.ext = ext
        self._protect_node_network(sm, nl, ext, cfg.networks)
        self.backends = self._backends(cfg, sm, nl, ext)
        leases = self._acquire_lease(sm, ext, cfg.networks)
        if leases is None:
            return
        self.leases = leases
        self._beat(STEP_BOUND)
        self._configure()

        pods = []
        for family, network in cfg.networks.items():
            prev_network, prev_subnet = subnetfile.read_previous(opts.subnet_file, family)
            pods.append(trafficmngr.PodNetwork(network, leases[family].subnet, prev_network, prev_subnet))
        self.traffic = trafficmngr.new(cfg.enable_nftables, pods, opts.ip_masq, opts.iptables_forward_rules,
                                       opts.ip_masq_fully_random_disable, opts.iptables_resync)
        mtu = next(iter(self.backends.values())).mtu  # the same in every family, as flanneld's
        env = subnetfile.SubnetEnv({f: (n, leases[f].subnet) for f, n in cfg.networks.items()}, mtu, opts.ip_masq)
        self.subnet_file = subnetfile.Keeper(opts.subnet_file, env)
        try:
            self.subnet_file.write()
            log.info("Wrote subnet file to %s", opts.subnet_file)
        except OSError as exc:
            log.warning("Failed to write subnet file: %s", exc)
            self._subnet_error = str(exc)
        if opts.ip_blackhole_route:
            routes = BlackholeRoutes({f: lease.subnet for f, lease in leases.items()}, opts.iptables_resync)
            self.supervisor.spawn("blackhole routes", routes.run)
        log.info("Running backend.")
        log.info("watching for new subnet leases")
        self._wait_synced(sm)  # the other nodes' leases; deciding without them would remove their routes
        if self.stop.is_set():
            return
        self._beat(STEP_BOUND)
        if sm.synced.is_set():  # else the list's arrival reports every node as changed
            self._take_dirty()
            gc.disable()  # as while listing: the first programming makes thousands of objects and no cycles
            try:
                self._reconcile_all(sm)
            finally:
                gc.enable()
        self._next_full = time.monotonic() + self.opts.datapath_resync
        self._next_file_check = time.monotonic() + SUBNET_FILE_CHECK
        gc.freeze()  # the node cache and kernel entries live on: later collections need not scan them
        # Listening only now spares parsing the notifications of the first programming (15,000 at
        # 5,000 nodes); a deletion in between is found by the next full reconcile.
        self.supervisor.spawn("kernel-events listener", self._kernel_events)
        # After the routes, which pods need first; /readyz waits for both.
        self.supervisor.spawn("%s check" % self.traffic.mode, self.traffic.run)
        self._start_prober()
        self.datapath_ready = True
        if opts.set_node_network_unavailable:
            sm.complete_lease()
        log.info("Waiting for all goroutines to exit")

    def _start_prober(self) -> None:
        """The datapath probes and the VXLAN checksum-offload keeper (probe.py): a supervised worker."""
        opts = self.opts
        if not opts.datapath_probe_port and (opts.vxlan_checksum_offload == "on" or self.backend_type != "vxlan"):
            return
        from .probe import Prober, path

        self.prober = Prober([path(f, b, self.leases[f].subnet) for f, b in self.backends.items()],
                             opts.datapath_probe_port, float(opts.datapath_probe_interval), opts.vxlan_checksum_offload)
        self.supervisor.spawn("datapath prober", self.prober.run)

    def _probes(self) -> tuple[int, bytes, str]:
        """``/probes``, to clients on this host: the datapath probes' results as JSON (``pyflannel check``)."""
        if self.prober is None:
            return 503, b"the datapath probes are not running\n", "text/plain; charset=utf-8"
        return 200, self.prober.report(), "application/json"

    def _wait_synced(self, sm: SubnetManager) -> None:
        """Wait for the first list of the leases, up to SYNC_TIMEOUT as flanneld; then raise Fatal, or with
        CONT_WHEN_CACHE_NOT_READY=true say so and carry on (the leases are programmed as the list comes in)."""
        self._beat(SYNC_TIMEOUT + STEP_BOUND)
        try:
            sm.wait_synced(self.stop, SYNC_TIMEOUT)
        except LeaseError as exc:
            if not continue_when_cache_not_ready(self.environ):
                raise Fatal("Failed to create SubnetManager: %s" % exc) from exc
            log.error("Timed out waiting for node controller sync. Continuing anyway.")

    def _wait_for_br_netfilter(self, families: tuple[Family, ...]) -> None:
        """Wait until br_netfilter is loaded (flanneld v0.26+ exits 1 without it), saying once why and how to
        load it; not ready meanwhile (nothing is set up yet)."""
        said = False
        while not self.stop.is_set():
            path = brnetfilter.missing(families, self.proc)
            if not path:
                if said:
                    log.info("br_netfilter is loaded now; carrying on")
                return
            if not said:
                log.error("%s", brnetfilter.problem(path))
                log.error("%s", BR_NETFILTER_HINT)
                said = True
            self._beat(BR_NETFILTER_RETRY + STEP_BOUND)
            self.stop.wait(BR_NETFILTER_RETRY)

    def _node_public_ips(self, sm: KubeSubnetManager, public_ip: str, public_ipv6: str) -> tuple[str, str]:
        """``--public-ip`` and ``--public-ipv6``, each replaced by this node's ``node-public-ip(v6)``
        annotation when that is set (flannel v0.25.3), read from the node's record before the interface is
        chosen; raises Fatal when one is not an address of its family."""
        own = sm.own_node()
        if own is None:  # the node could not be read alone: its annotations come with the node list
            self._wait_synced(sm)
            own = sm.own_node()
        if own is None:
            return public_ip, public_ipv6
        log.info("List of node(%s) annotations: map[string]string{%s}", sm.node_name,
                 ", ".join("%s:%s" % (go_quote(k), go_quote(v)) for k, v in sorted(own.annotations.items())))
        try:
            found = node_public_ips(sm.keys, own.annotations)
        except ValueError as exc:
            raise Fatal("Failed to find any valid interface to use: %s" % exc) from None
        for family, value in found.items():
            log.info("Overriding %s with '%s' from node annotation '%s'",
                     family.public_ip_annotation.replace("-", " "), value, sm.keys.node_public_ip(family))
        publics = {IPV4: public_ip, IPV6: public_ipv6, **found}
        return publics[IPV4], publics[IPV6]

    # -- steady state --------------------------------------------------------------------------------

    def _own_node_changed(self) -> None:
        """Re-publish the lease if someone changed it; report a pod CIDR change; stop if it was revoked."""
        assert self.sm is not None and self.ext is not None
        try:
            leases = self._publish(self.sm, self.ext)
        except LeaseRevoked:
            self._shut_down(0)  # the subnet manager said "Lease has been revoked. Shutting down daemon."
            return
        except LeaseError as exc:
            log.error("Failed to refresh the lease: %s", exc)
            return
        for family, lease in leases.items():
            old = self.leases[family].subnet
            if lease.subnet != old and lease.subnet != self._warned_subnet.get(family):
                log.warning("The pod CIDR of this node changed from %s to %s; restart pyflannel to use it",
                            old, lease.subnet)
                self._warned_subnet[family] = lease.subnet

    def _reconcile_all(self, sm: SubnetManager) -> None:
        """Reconcile every family's datapath; after one of many nodes, give back the memory it used for a moment."""
        nodes = 0
        for family, backend in self.backends.items():
            leases = sm.leases(family)
            nodes += len(leases)
            backend.reconcile(leases)
        heap.release(nodes)

    def _kernel_events(self, stop: threading.Event) -> None:
        """Hand the kernel's deletion notifications to the loop until ``stop`` is set."""
        monitor = Monitor(families=[family.af for family in self.backends])
        if self._listened:
            self._on_deleted([])  # notifications were lost while no one listened: compare everything
        self._listened = True
        try:
            monitor.run(stop, self._on_deleted)
        finally:
            monitor.sock.close()

    def _keep_subnet_file(self) -> None:
        """Write subnet.env again if it was deleted or changed; say so once."""
        assert self.subnet_file is not None
        try:
            why = self.subnet_file.check()
        except OSError as exc:
            if str(exc) != self._subnet_error:
                log.warning("Failed to write subnet file: %s", exc)
                self._subnet_error = str(exc)
            return
        self._subnet_error = ""
        if why:
            log.warning("Wrote subnet file to %s again: %s", self.subnet_file.path, why)

    def loop(self, stop: threading.Event) -> None:
        """Apply node changes as they arrive, every --datapath-resync seconds reconcile the whole
        datapath, and every SUBNET_FILE_CHECK seconds check subnet.env."""
        sm, backends = self.sm, self.backends
        assert sm is not None and backends
        interval = float(self.opts.datapath_resync)
        while not stop.is_set():
            self._beat(interval + STEP_BOUND)
            lost = [b for b in backends.values() if not b.device_ok]
            wait = min(self._next_full, self._next_file_check) - time.monotonic()
            self._wake.wait(max(0.0, min(wait, DEVICE_RETRY if lost else interval)))
            self.ready()  # says "flannel is ready" and keeps the gauge true even if /readyz is not asked
            if stop.is_set():
                break
            dirty, deleted = self._take_dirty()
            try:
                if deleted is not None:
                    for backend in backends.values():
                        backend.restore(deleted)
                for backend in [b for b in lost if not b.device_ok]:
                    backend.restore([])  # the kernel does not announce a link's return: look again
                if dirty.pop(sm.node_name, None) is not None:
                    self._own_node_changed()
                changed: set[str] = set()
                for family, backend in backends.items():
                    changed |= backend.sync({name: sm.lease_of(name, family) for name in dirty})
                now = time.monotonic()
                for name in changed:
                    metrics.PROGRAMMING_LATENCY.observe(now - dirty[name])
                if time.monotonic() >= self._next_full:
                    if sm.synced.is_set():  # before the first list it would remove every other node's entries
                        self._reconcile_all(sm)
                    self._next_full = time.monotonic() + interval
                if time.monotonic() >= self._next_file_check:
                    self._keep_subnet_file()
                    self._next_file_check = time.monotonic() + SUBNET_FILE_CHECK
            except BaseException:
                self._next_full = 0.0  # this turn's changes are lost: compare everything when the loop runs again
                raise

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; the exit code."""
        log.info("Installing signal handlers")
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        opts = self.opts
        servers = []
        try:
            if opts.metrics_port:
                registry = metrics.enable(__version__)
            if opts.healthz_port:
                routes = health.health_routes(self.ready, self.stalled)
                routes["/probes"] = self._probes
                if opts.metrics_port == opts.healthz_port:
                    routes.update(health.metrics_routes(registry))
                addr = "[%s]:%d" % (opts.healthz_ip, opts.healthz_port) if ":" in opts.healthz_ip else \
                    "%s:%d" % (opts.healthz_ip, opts.healthz_port)
                log.info("Start healthz server on %s", addr)
                servers.append(health.serve(opts.healthz_ip, opts.healthz_port, routes, local=("/probes",)))
            if opts.metrics_port and opts.metrics_port != opts.healthz_port:
                servers.append(health.serve(opts.healthz_ip, opts.metrics_port, health.metrics_routes(registry)))
        except OSError as exc:
            log.error("Start healthz server error. %s", exc)
            return 1
        try:
            self.start()
            if not self.stop.is_set():
                self.supervisor.run("main loop", self.loop)
        except Fatal as exc:
            log.error("%s", exc)
            return 1
        except Exception as exc:  # start-up cannot be resumed half-way: the kubelet restarts the process
            log_exception("Start-up", exc, "; exiting")
            return 1
        finally:
            self.stop.set()
            for server in servers:
                server.shutdown()
        if self.exit_code:
            return self.exit_code
        log.info("Exiting cleanly...")
        return 0


def _vtep_mac(data: str) -> str:
    """The VtepMAC in a backend-data annotation, or ''."""
    try:
        return str(json.loads(data)["VtepMAC"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return ""


def main(opts: Options) -> int:
    """Log the configuration and run the daemon."""
    install_excepthooks()
    log.info("CLI flags config: %s", describe(opts))
    return Daemon(opts, os.environ).run()
