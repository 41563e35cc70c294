"""Prometheus metrics, served only when ``--metrics-port`` is set.

Until :func:`enable` runs every metric is a no-op, and prometheus_client is not imported, so a
daemon without metrics pays nothing for them. No metric has a per-node label.
"""

from __future__ import annotations

from typing import Any

PREFIX = "pyflannel"


class _Noop:
    def labels(self, *args: Any, **kwargs: Any) -> "_Noop":
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


_NOOP = _Noop()
# kube-proxy's buckets for kubeproxy_network_programming_duration_seconds: 0.25 s and 0.5 s, every second
# to 59 s, every 5 s to 115 s, every 30 s to 5 min.
PROGRAMMING_BUCKETS = (0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30))
LEASES: Any = _NOOP
LEASE_EVENTS: Any = _NOOP
WATCH_RESTARTS: Any = _NOOP
API_ERRORS: Any = _NOOP
PROGRAMMING_LATENCY: Any = _NOOP
RECONCILES: Any = _NOOP
REPAIRS: Any = _NOOP
IPTABLES_RESYNCS: Any = _NOOP
IPTABLES_REPAIRS: Any = _NOOP
NETLINK_ERRORS: Any = _NOOP
WORKER_RESTARTS: Any = _NOOP
READY: Any = _NOOP
# the datapath probes (probe.py) and the checksum-offload keeper
PROBES: Any = _NOOP
PROBE_FAILURES: Any = _NOOP
PROBE_RTT: Any = _NOOP
PROBE_PEERS_UNREACHABLE: Any = _NOOP
PROBE_PEERS_DEGRADED: Any = _NOOP
CHECKSUM_BUG: Any = _NOOP
TX_CHECKSUM_OFFLOAD: Any = _NOOP
REGISTRY: Any = None


_NAMES = ("LEASES", "LEASE_EVENTS", "WATCH_RESTARTS", "API_ERRORS", "PROGRAMMING_LATENCY", "RECONCILES", "REPAIRS",
          "IPTABLES_RESYNCS", "IPTABLES_REPAIRS", "NETLINK_ERRORS", "WORKER_RESTARTS", "READY",
          "PROBES", "PROBE_FAILURES", "PROBE_RTT", "PROBE_PEERS_UNREACHABLE", "PROBE_PEERS_DEGRADED", "CHECKSUM_BUG",
          "TX_CHECKSUM_OFFLOAD")


def disable() -> None:
    """Turn every metric back into the no-op (for tests)."""
    global REGISTRY
    for name in _NAMES:
        globals()[name] = _NOOP
    REGISTRY = None


def enable(version: str) -> Any:
    """Create the metrics in a registry of their own and return that registry."""
    global LEASES, LEASE_EVENTS, WATCH_RESTARTS, API_ERRORS, PROGRAMMING_LATENCY, RECONCILES, REPAIRS
    global IPTABLES_RESYNCS, IPTABLES_REPAIRS, NETLINK_ERRORS, WORKER_RESTARTS, READY, REGISTRY
    global PROBES, PROBE_FAILURES, PROBE_RTT, PROBE_PEERS_UNREACHABLE, PROBE_PEERS_DEGRADED, CHECKSUM_BUG
    global TX_CHECKSUM_OFFLOAD
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

    reg = CollectorRegistry(auto_describe=True)
    Info(PREFIX + "_build", "pyflannel's version.", registry=reg).info({"version": version})
    LEASES = Gauge(PREFIX + "_leases", "Leases of other nodes known to this node.", registry=reg)
    LEASE_EVENTS = Counter(PREFIX + "_lease_events_total", "Lease events by type.", ["type"], registry=reg)
    WATCH_RESTARTS = Counter(PREFIX + "_watch_restarts_total", "Node watches restarted, by reason.",
                             ["reason"], registry=reg)
    API_ERRORS = Counter(PREFIX + "_api_errors_total", "Failed Kubernetes API requests.", registry=reg)
    PROGRAMMING_LATENCY = Histogram(
        PREFIX + "_network_programming_duration_seconds",
        "Time from a node change (the API server's time of the write, where the watch event carries it) to "
        "the kernel being programmed for it.", buckets=PROGRAMMING_BUCKETS, registry=reg)
    RECONCILES = Counter(PREFIX + "_datapath_reconciles_total", "Full reconciles of the kernel's routes, "
                         "neighbours and FDB entries against the leases.", registry=reg)
    REPAIRS = Counter(PREFIX + "_datapath_repairs_total", "Kernel entries added, changed or removed by "
                      "a full reconcile because they had drifted.", registry=reg)
    IPTABLES_RESYNCS = Counter(PREFIX + "_iptables_resyncs_total", "iptables checks.", registry=reg)
    IPTABLES_REPAIRS = Counter(PREFIX + "_iptables_repairs_total", "iptables checks that found rules "
                               "missing and put them back.", registry=reg)
    NETLINK_ERRORS = Counter(PREFIX + "_netlink_errors_total", "Failed netlink requests.", registry=reg)
    WORKER_RESTARTS = Counter(PREFIX + "_worker_restarts_total", "Workers restarted after an unexpected error, "
                              "by worker.", ["worker"], registry=reg)
    READY = Gauge(PREFIX + "_ready", "1 once subnet.env is written and the datapath is programmed.",
                  registry=reg)
    PROBES = Counter(PREFIX + "_probes_total", "Datapath probes sent to other nodes, by family and protocol "
                     "(tcp, udp, udp_full_size).", ["family", "protocol"], registry=reg)
    PROBE_FAILURES = Counter(PREFIX + "_probe_failures_total", "Datapath probes that got no answer, by family and "
                             "protocol.", ["family", "protocol"], registry=reg)
    PROBE_RTT = Histogram(PREFIX + "_probe_rtt_seconds", "Round-trip time of the datapath probes' TCP handshakes "
                          "through the overlay, by family.", ["family"],
                          buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                   1, 2.5), registry=reg)
    PROBE_PEERS_UNREACHABLE = Gauge(PREFIX + "_probe_peers_unreachable", "Other nodes that answered no datapath "
                                    "probe in the last rounds they were probed in, by family.", ["family"],
                                    registry=reg)
    PROBE_PEERS_DEGRADED = Gauge(PREFIX + "_probe_peers_degraded", "Other nodes that answer some datapath probes "
                                 "but not all, by family and problem (tcp, full_size, udp).", ["family", "problem"],
                                 registry=reg)
    CHECKSUM_BUG = Gauge(PREFIX + "_vxlan_checksum_bug", "1 while the VXLAN checksum-offload bug is seen and not "
                         "worked around.", registry=reg)
    TX_CHECKSUM_OFFLOAD = Gauge(PREFIX + "_vxlan_tx_checksum_offload", "1 while the VXLAN device's tx checksum "
                                "offload is on.", ["device"], registry=reg)
    REGISTRY = reg
    return reg
