"""The daemon's life: flanneld's start-up order, the loop that keeps the kernel converged, shutdown."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
from ipaddress import IPv4Network
from types import FrameType
from typing import Any

from . import __version__, config, health, ip, metrics, subnetfile
from .backend.vxlan import DeviceError, VXLANBackend, backend_data
from .flags import Options, describe
from .kubeclient import ApiError, KubeClient
from .lease import Lease, LeaseError
from .netlink import Deletion, Monitor, Netlink
from .subnet.annotations import AnnotationKeys, normalize_prefix
from .subnet.kube import KubeSubnetManager
from .trafficmngr.iptables import IPTablesManager

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 4.0  # seconds; SIGTERM must end the process within 5
LEASE_RETRY = 10.0  # seconds between lease attempts when nothing on the node changes

POD_CIDR_HINT = (
    'Node "%s" has no pod CIDR: the controller-manager assigns them only with --allocate-node-cidrs=true and '
    '--cluster-cidr=%s (the Network of net-conf.json; with kubeadm, --pod-network-cidr=%s). '
    "Waiting for the node's spec.podCIDR; pyflannel carries on as soon as it is set."
)


class Fatal(Exception):
    """A start-up error that ends the daemon with exit code 1; the message is flanneld's."""


class Daemon:
    """One pyflannel process in kube mode."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._dirty: dict[str, float] = {}  # node name -> when its change arrived
        self._deleted: list[Deletion] | None = None  # kernel deletions to check, [] = compare all
        self.datapath_ready = False
        self.sm: KubeSubnetManager | None = None
        self.backend: VXLANBackend | None = None
        self.iptables: IPTablesManager | None = None
        self.lease: Lease | None = None
        self.ext: ip.ExternalInterface | None = None
        self._warned_subnet: IPv4Network | None = None

    # -- signals and readiness -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("shutdownHandler sent cancel signal...")
        # A second signal kills at once, as in flanneld.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        self.stop.set()
        self._wake.set()
        threading.Thread(target=self._deadline, daemon=True).start()

    @staticmethod
    def _deadline() -> None:
        time.sleep(SHUTDOWN_GRACE)
        log.warning("Shutdown took longer than %.0fs; exiting now", SHUTDOWN_GRACE)
        logging.shutdown()
        os._exit(0)

    def ready(self) -> bool:
        """subnet.env written, the datapath programmed, flannel.<VNI> there and up, and the iptables rules in place."""
        return self.datapath_ready and self.backend is not None and self.backend.device_ok and \
            (self.iptables is None or self.iptables.ready)

    def _on_change(self, names: set[str]) -> None:
        now = time.monotonic()
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
            dirty, self._dirty = self._dirty, {}
            deleted, self._deleted = self._deleted, None
        self._wake.clear()
        return dirty, deleted

    def _spawn(self, name: str, target: Any) -> None:
        threading.Thread(target=target, args=(self.stop,), name=name, daemon=True).start()

    # -- start-up ------------------------------------------------------------------------------------

    def _node_name(self, client: KubeClient) -> str:
        name = os.environ.get("NODE_NAME", "")
        if name:
            return name
        pod, ns = os.environ.get("POD_NAME", ""), os.environ.get("POD_NAMESPACE", "")
        if not pod or not ns:
            raise Fatal("Failed to create SubnetManager: env variables POD_NAME and POD_NAMESPACE must be set")
        try:
            name = (client.get_pod(ns, pod).get("spec") or {}).get("nodeName") or ""
        except ApiError as exc:
            raise Fatal("Failed to create SubnetManager: error retrieving pod spec for '%s/%s': %s" % (ns, pod, exc)) from exc
        if not name:
            raise Fatal("Failed to create SubnetManager: node name not present in pod spec '%s/%s'" % (ns, pod))
        return name

    def _subnet_manager(self) -> tuple[config.Config, KubeSubnetManager]:
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
            client = KubeClient(opts.kube_api_url, opts.kubeconfig_file)
        except ApiError as exc:
            raise Fatal("Failed to create SubnetManager: %s" % exc) from exc
        if cfg.network is None or cfg.vxlan is None:
            raise Fatal("Failed to create SubnetManager: pyflannel needs an IPv4 Network and the vxlan backend")
        node = self._node_name(client)
        sm = KubeSubnetManager(client, node, AnnotationKeys.from_prefix(prefix), prefix, cfg.network, self._on_change)
        self._spawn("node-watch", sm.run)
        sm.fetch_own_node()
        return cfg, sm

    def _acquire_lease(self, sm: KubeSubnetManager, backend: VXLANBackend, ext: ip.ExternalInterface) -> Lease | None:
        """Acquire the lease, waiting (instead of exiting as flanneld does) until the node can have one."""
        assert backend.device is not None
        data = backend_data(backend.cfg.vni, backend.device.mac)
        last_error = ""
        while not self.stop.is_set():
            self._take_dirty()
            try:
                return sm.acquire_lease(ext.ext_addr, "vxlan", data)
            except LeaseError as exc:
                error = str(exc)
            if error != last_error:  # say it once, not every retry
                log.error("Error registering network: failed to acquire lease: %s", error)
                if error.endswith("pod cidr not assigned"):
                    log.error(POD_CIDR_HINT, sm.node_name, sm.network, sm.network)
                last_error = error
            # The watch wakes us the moment the node changes.
            self._wake.wait(LEASE_RETRY)
        return None

    def start(self) -> None:
        """Everything up to a programmed datapath; raises Fatal."""
        opts = self.opts
        if not opts.kube_subnet_mgr:
            raise Fatal("Failed to create SubnetManager: the etcd subnet manager is not supported yet; "
                        "run with --kube-subnet-mgr")
        cfg, sm = self._subnet_manager()
        self.sm = sm
        network, vxlan_cfg = cfg.network, cfg.vxlan
        assert network is not None and vxlan_cfg is not None  # checked by _subnet_manager
        if self.stop.is_set():
            return
        log.info("Created subnet manager: %s", sm.name)
        log.info("Found network config - Backend type: %s", cfg.backend_type)

        nl = Netlink()
        try:
            ext = ip.select(nl, opts.iface, opts.iface_regex, opts.iface_can_reach, opts.public_ip)
        except ip.InterfaceError as exc:
            raise Fatal(str(exc)) from exc
        self.ext = ext
        backend = VXLANBackend(nl, vxlan_cfg, ext, network)
        self.backend = backend
        own = sm.own_node()
        try:
            hint = own and _vtep_mac(own.annotations.get(sm.keys.backend_data, ""))
            backend.create_device(hint or "")
        except DeviceError as exc:
            raise Fatal("Error registering network: %s" % exc) from exc
        lease = self._acquire_lease(sm, backend, ext)
        if lease is None:
            return
        self.lease = lease
        try:
            backend.configure_device(lease.subnet)
        except DeviceError as exc:
            raise Fatal("Error registering network: %s" % exc) from exc

        prev_network, prev_subnet = subnetfile.read_previous(opts.subnet_file)
        if opts.ip_masq or opts.iptables_forward_rules:
            self.iptables = IPTablesManager(network, lease.subnet, prev_network, prev_subnet, opts.ip_masq,
                                            opts.iptables_forward_rules, opts.iptables_resync)
        env = subnetfile.SubnetEnv(network, lease.subnet, backend.mtu, opts.ip_masq)
        try:
            subnetfile.write(opts.subnet_file, env)
            log.info("Wrote subnet file to %s", opts.subnet_file)
        except OSError as exc:
            log.warning("Failed to write subnet file: %s", exc)
        log.info("Running backend.")
        log.info("watching for new subnet leases")
        try:
            sm.wait_synced(self.stop)  # the other nodes' leases; deciding without them would remove their routes
        except LeaseError as exc:
            raise Fatal("Failed to create SubnetManager: %s" % exc) from exc
        if self.stop.is_set():
            return
        self._take_dirty()
        gc.disable()  # as while listing: the first programming makes thousands of objects and no cycles
        try:
            backend.reconcile(sm.leases())
        finally:
            gc.enable()
        gc.freeze()  # the node cache and kernel entries live on: later collections need not scan them
        # Listening only now spares parsing the notifications of the first programming (15,000 at
        # 5,000 nodes); a deletion in between is found by the next full reconcile.
        monitor = Monitor()
        self._spawn("kernel-events", lambda stop: monitor.run(stop, self._on_deleted))
        if self.iptables is not None:
            # After the routes, which pods need first; /readyz waits for both.
            self._spawn("iptables", self.iptables.run)
        self.datapath_ready = True
        metrics.READY.set(1)
        if opts.set_node_network_unavailable:
            sm.complete_lease()
        log.info("Waiting for all goroutines to exit")

    # -- steady state --------------------------------------------------------------------------------

    def _own_node_changed(self) -> None:
        """Re-publish the annotations if someone changed them; report a pod CIDR change."""
        assert self.sm is not None and self.backend is not None and self.backend.device is not None
        assert self.lease is not None and self.ext is not None
        try:
            lease = self.sm.acquire_lease(self.ext.ext_addr, "vxlan",
                                          backend_data(self.backend.cfg.vni, self.backend.device.mac))
        except LeaseError as exc:
            log.error("Failed to refresh the lease: %s", exc)
            return
        if lease.subnet != self.lease.subnet and lease.subnet != self._warned_subnet:
            log.warning("The pod CIDR of this node changed from %s to %s; restart pyflannel to use it",
                        self.lease.subnet, lease.subnet)
            self._warned_subnet = lease.subnet

    def loop(self) -> None:
        """Apply node changes as they arrive, and reconcile the whole datapath every --datapath-resync seconds."""
        sm, backend = self.sm, self.backend
        assert sm is not None and backend is not None
        interval = float(self.opts.datapath_resync)
        next_full = time.monotonic() + interval
        while not self.stop.is_set():
            self._wake.wait(max(0.0, next_full - time.monotonic()))
            if self.stop.is_set():
                break
            dirty, deleted = self._take_dirty()
            if deleted is not None:
                backend.restore(deleted)
            if dirty.pop(sm.node_name, None) is not None:
                self._own_node_changed()
            changed = backend.sync({name: sm.lease_of(name) for name in dirty})
            now = time.monotonic()
            for name in changed:
                metrics.PROGRAMMING_LATENCY.observe(now - dirty[name])
            if time.monotonic() >= next_full:
                backend.reconcile(sm.leases())
                next_full = time.monotonic() + interval

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
                routes = health.health_routes(self.ready)
                if opts.metrics_port == opts.healthz_port:
                    routes.update(health.metrics_routes(registry))
                addr = "[%s]:%d" % (opts.healthz_ip, opts.healthz_port) if ":" in opts.healthz_ip else \
                    "%s:%d" % (opts.healthz_ip, opts.healthz_port)
                log.info("Start healthz server on %s", addr)
                servers.append(health.serve(opts.healthz_ip, opts.healthz_port, routes))
            if opts.metrics_port and opts.metrics_port != opts.healthz_port:
                servers.append(health.serve(opts.healthz_ip, opts.metrics_port, health.metrics_routes(registry)))
        except OSError as exc:
            log.error("Start healthz server error. %s", exc)
            return 1
        try:
            self.start()
            if not self.stop.is_set():
                self.loop()
        except Fatal as exc:
            log.error("%s", exc)
            return 1
        finally:
            self.stop.set()
            for server in servers:
                server.shutdown()
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
    log.info("CLI flags config: %s", describe(opts))
    return Daemon(opts).run()
