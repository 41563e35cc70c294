"""The etcd subnet manager: flanneld's leases in etcd (``subnet/etcd`` of flannel v0.20.2, etcd v3 API).

Keys and values are flanneld's, so flanneld and pyflannel nodes share one network:
``<prefix>/config`` holds the net-conf JSON, ``<prefix>/subnets/10.244.1.0-24`` a node's lease as
``{"PublicIP":"192.168.56.12","PublicIPv6":null,"BackendType":"vxlan","BackendData":{...}}``,
attached to a 24-hour etcd lease that the node renews.

One thread lists the leases and then watches everything under the prefix from the list's
revision, every event of every message (flanneld v0.20.2 read only the first event of a message and
opened a new watch for each, so it missed leases). A dropped watch resumes from the last revision
it saw; a compacted revision is followed by a new list. Leases that are malformed, larger than
MAX_LEASE_VALUE, outside the Network, of another length than SubnetLen, or pointing into this node's
network (nodenet) are skipped with a warning. The list is taken oldest first (by creation revision),
so that of two leases claiming one VtepMAC the older keeps it, as in kube mode.

Etcd mode runs IPv4 only: the leases are IPv4 leases, and the IPv4 part of flanneld's dual-stack
keys (``10.244.1.0-24&fd00::-64``) is read. A config enabling IPv6 or disabling IPv4 is refused.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv4Network

from .. import config, metrics
from ..config import Config, ConfigError
from ..etcdclient import Compacted, EtcdClient, EtcdError, Event, KeyValue
from ..family import IPV4, Family, IPAddress
from ..kubeclient import CONNECT_TIMEOUT, WATCH_READ_TIMEOUT
from ..lease import Lease, LeaseError, LeaseRevoked
from ..log import V
from .kube import MAX_BACKOFF, _Backoff
from .nodenet import NodeNetwork, public_ip_problem

log = logging.getLogger(__name__)

SUBNET_TTL = 24 * 3600  # seconds, flanneld's subnetTTL
RACE_RETRIES = 10
MAX_CANDIDATES = 100  # flanneld picks at random among the first 100 free subnets
CONFIG_RETRY = 1.0
RENEW_RETRY = 60.0
MAX_LEASE_VALUE = 4096  # bytes of a lease's value: flanneld writes some 150
# The most seconds between two updates of EtcdSubnetManager.progress while the watch works or
# retries: an idle watch that times out, then the longest wait, then a connection attempt.
PROGRESS_BOUND = WATCH_READ_TIMEOUT + MAX_BACKOFF + CONNECT_TIMEOUT

CONFIG_NOT_FOUND = "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
CONFIG_HINT = ("Create it with: etcdctl --endpoints=%s put %s/config "
               "'{\"Network\": \"10.244.0.0/16\", \"Backend\": {\"Type\": \"vxlan\"}}'")

_SUBNET_KEY = re.compile(r"^(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([0-9a-fA-F:.]+)-(\d+))?$")


def subnet_key(subnet: IPv4Network) -> str:
    """The lease's key under ``<prefix>/subnets/``: ``10.244.1.0-24``."""
    return "%s-%d" % (subnet.network_address, subnet.prefixlen)


def parse_subnet_key(name: str) -> IPv4Network | None:
    """The IPv4 subnet of a key (``10.244.1.0-24``, or dual-stack ``10.244.1.0-24&fd00::-64``), or None."""
    m = _SUBNET_KEY.match(name)
    if m is None:
        return None
    try:
        return IPv4Network("%s/%s" % (m.group(1), m.group(2)))
    except ValueError:
        return None


def lease_value(public_ip: IPv4Address, backend_type: str, backend_data: str) -> bytes:
    """flanneld's LeaseAttrs JSON, byte for byte as its ``json.Marshal`` writes it (host-gw's ``null``
    backend data is left out, as flanneld's ``omitempty`` does)."""
    data = json.dumps(json.loads(backend_data), separators=(",", ":")) if backend_data else ""
    data = "" if data == "null" else data
    value = '{"PublicIP":%s,"PublicIPv6":null' % json.dumps(str(public_ip))
    if backend_type:
        value += ',"BackendType":%s' % json.dumps(backend_type)
    if data:
        value += ',"BackendData":%s' % data
    return (value + "}").encode()


def parse_lease(name: str, value: bytes) -> Lease:
    """The lease a key and its LeaseAttrs JSON describe; raises ValueError naming what is wrong."""
    subnet = parse_subnet_key(name)
    if subnet is None:
        raise ValueError("%s: not a subnet" % name)
    if len(value) > MAX_LEASE_VALUE:
        raise ValueError("%s: the value is %d bytes, more than the %d a lease needs" % (name, len(value),
                                                                                     MAX_LEASE_VALUE))
    try:
        attrs = json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise ValueError("%s: %s" % (name, str(exc)[:200])) from None
    if not isinstance(attrs, dict):
        raise ValueError("%s: not a JSON object" % name)
    try:
        public_ip = IPv4Address(attrs.get("PublicIP"))
    except ValueError:
        raise ValueError("%s: PublicIP: Invalid IP address format" % name) from None
    backend_type = attrs.get("BackendType") or ""
    if not isinstance(backend_type, str):
        raise ValueError("%s: BackendType: not a string" % name)
    data = attrs.get("BackendData")
    try:
        text = json.dumps(data, separators=(",", ":")) if data is not None else ""
    except (ValueError, RecursionError) as exc:
        raise ValueError("%s: BackendData: %s" % (name, str(exc)[:200])) from None
    return Lease(subnet, public_ip, backend_type, text)


def check_supported(cfg: Config) -> None:
    """Refuse, naming the key, what etcd mode does not run; raises ConfigError.

    Besides what :func:`config.check_supported` refuses, etcd mode is IPv4-only for now.
    """
    config.check_supported(cfg)
    if not cfg.enable_ipv4:
        raise ConfigError("EnableIPv4: pyflannel's etcd mode runs IPv4 only; set it to true with a Network "
                          "(IPv6-only runs with --kube-subnet-mgr)")
    if cfg.enable_ipv6:
        raise ConfigError("EnableIPv6: pyflannel's etcd mode runs IPv4 only; set it to false "
                          "(dual-stack runs with --kube-subnet-mgr)")


def _subnet(lease: Lease) -> IPv4Network:
    """The subnet of a lease read from etcd: IPv4, as :func:`parse_lease` makes it."""
    assert isinstance(lease.subnet, IPv4Network)
    return lease.subnet


def _go_time(t: datetime) -> str:
    """A time as Go prints a ``time.Time`` in UTC."""
    return t.strftime("%Y-%m-%d %H:%M:%S.%f +0000 UTC")


class EtcdSubnetManager:
    """Leases in etcd (flannel's ``subnet/etcd`` LocalManager).

    ``node_name`` is the key of this node's lease once acquired: the daemon receives changes of it
    like those of any lease, and ``revoked`` is set when someone deleted it. ``progress`` is the
    ``time.monotonic()`` of the watch's last sign of progress (a list, a watch message, a connection
    attempt); it advances at least every PROGRESS_BOUND seconds while the watch works or retries.
    """

    def __init__(self, client: EtcdClient, prefix: str, previous: IPv4Network | None, renew_margin: float,
                 on_change: Callable[[set[str]], None], ttl: int = SUBNET_TTL) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.previous = previous
        self.renew_margin = renew_margin  # seconds before expiry
        self.ttl = ttl
        self.on_change = on_change
        self.node_name = ""
        self.config: Config | None = None  # the running config: leases are checked and allocated by it
        self.network: IPv4Network | None = None
        self.synced = threading.Event()
        self.acquired = threading.Event()
        self.revoked = threading.Event()
        self.progress = time.monotonic()
        self._lock = threading.Lock()
        self._renew_lock = threading.Lock()
        self._leases: dict[str, Lease] = {}  # valid leases by key, our own included, oldest first
        self._host = NodeNetwork()  # this node's network, once the daemon knows its interface
        self._bad: dict[str, bytes] = {}  # keys whose value was skipped, so each is reported once
        self._rev = 0
        self._config_raw: bytes | None = b""
        # This node's lease: its value, the revision it was last written at, its etcd lease ID, and
        # its expiry (time.monotonic() for the renewal, the wall clock for the log).
        self._own_value = b""
        self._own_rev = 0
        self._lease_id = 0
        self._expires = 0.0
        self._expiration = datetime.now(timezone.utc)

    @property
    def name(self) -> str:
        return "Etcd Local Manager with Previous Subnet: %s" % (self.previous or "None")

    @property
    def subnets_prefix(self) -> str:
        return self.prefix + "/subnets/"

    # -- the network config ----------------------------------------------------------------------

    def _read_config(self) -> tuple[Config, bytes]:
        kvs, _ = self.client.get(self.prefix + "/config")
        if not kvs:
            raise ConfigError(CONFIG_NOT_FOUND)
        return config.parse(kvs[0].value.decode("utf-8", errors="replace"), kube=False), kvs[0].value

    def get_network_config(self, stop: threading.Event, waiting: Callable[[], None] = lambda: None) -> Config | None:
        """Read and validate ``<prefix>/config``, waiting until it exists and is valid (None if stopped).

        Each new error is logged once, with flanneld's text; a missing key adds how to create it.
        ``waiting()`` is called before each attempt (the daemon's heartbeat).
        """
        last = ""
        while not stop.is_set():
            waiting()
            self.progress = time.monotonic()
            try:
                cfg, raw = self._read_config()
                check_supported(cfg)
                assert cfg.network is not None  # IPv4 is enabled
                self.config, self.network, self._config_raw = cfg, cfg.network, raw
                return cfg
            except (EtcdError, ConfigError) as exc:
                error = str(exc)
            if error != last:
                log.error("Couldn't fetch network config: %s", error)
                if error == CONFIG_NOT_FOUND:
                    log.error(CONFIG_HINT, ",".join(e.url for e in self.client.endpoints), self.prefix)
                last = error
            stop.wait(CONFIG_RETRY)
        return None

    def _config_changed(self, raw: bytes | None) -> None:
        """The config key changed (None: deleted). The running config stays until a restart; say so once."""
        if raw == self._config_raw:
            return
        self._config_raw = raw
        if raw is None:
            log.warning("The network config %s/config was deleted; keeping the running one", self.prefix)
            return
        try:
            cfg = config.parse(raw.decode("utf-8", errors="replace"), kube=False)
        except ConfigError as exc:
            log.error("The network config %s/config changed and is invalid (keeping the running one): %s",
                      self.prefix, exc)
            return
        old = self.config
        assert old is not None
        if (cfg.network, cfg.subnet_len, cfg.subnet_min, cfg.subnet_max, cfg.backend_type, cfg.vxlan) != \
                (old.network, old.subnet_len, old.subnet_min, old.subnet_max, old.backend_type, old.vxlan):
            log.warning("The network config %s/config changed; restart pyflannel to use it", self.prefix)

    # -- the lease cache -------------------------------------------------------------------------

    def _other(self, name: str, lease: Lease) -> bool:
        """A lease of another node: not this node's, nor one carrying this node's address (flanneld takes
        such a lease as this node's, from an earlier run)."""
        return name != self.node_name and lease.public_ip not in self._host.addresses

    def leases(self, family: Family) -> dict[str, Lease]:
        """The other nodes' valid leases of ``family``, by key (none but IPv4 ones), oldest first."""
        if family is not IPV4:
            return {}
        with self._lock:
            return {k: v for k, v in self._leases.items() if self._other(k, v)}

    def lease_of(self, name: str, family: Family) -> Lease | None:
        """One other node's valid lease of ``family``."""
        if family is not IPV4:
            return None
        with self._lock:
            lease = self._leases.get(name)
            return lease if lease is not None and self._other(name, lease) else None

    def set_node_network(self, networks: dict[Family, NodeNetwork]) -> None:
        """Refuse from now on the leases that point into this node's IPv4 network (with the etcd endpoints'
        addresses added); the leases that already do are taken away."""
        if IPV4 not in networks:
            return
        changed = set()
        with self._lock:
            self._host = networks[IPV4].with_servers(e.url for e in self.client.endpoints)
            for name, lease in list(self._leases.items()):
                problem = self._host_problem(name, lease)
                if problem:
                    log.warning("Ignoring bad subnet node: %s", problem)
                    del self._leases[name]
                    self._bad[name] = b""
                    changed.add(name)
            metrics.LEASES.set(len(self._leases))
        if changed:
            self.on_change(changed)

    def _host_problem(self, name: str, lease: Lease) -> str:
        """Why another node's lease would point into this node's network ('' when it would not)."""
        if name == self.node_name:
            return ""
        problem = self._host.subnet_problem(lease.subnet)
        if problem:
            return "%s: subnet %s %s" % (name, lease.subnet, problem)
        if lease.public_ip not in self._host.addresses:
            problem = self._host.address_problem(lease.public_ip)
            if problem:
                return "%s: PublicIP %s %s" % (name, lease.public_ip, problem)
        return ""

    def _valid(self, name: str, value: bytes) -> Lease | None:
        """The lease, or None with a warning the first time this value is seen."""
        try:
            lease = parse_lease(name, value)
            assert self.config is not None and self.network is not None
            if not _subnet(lease).subnet_of(self.network) or lease.subnet.prefixlen != self.config.subnet_len:
                raise ValueError("%s: subnet %s is not a /%d inside the Network %s"
                                 % (name, lease.subnet, self.config.subnet_len, self.network))
            problem = public_ip_problem(lease.public_ip)
            if problem:
                raise ValueError("%s: PublicIP %s %s" % (name, lease.public_ip, problem))
            problem = self._host_problem(name, lease)
            if problem:
                raise ValueError(problem)
            self._bad.pop(name, None)
            return lease
        except ValueError as exc:
            if self._bad.get(name) != value:
                log.warning("Ignoring bad subnet node: %s", exc)
                self._bad[name] = value
            return None

    def _put(self, name: str, value: bytes) -> bool:
        """Store a lease; True if what it asks of the kernel changed. Called with the lock held."""
        lease = self._valid(name, value)
        old = self._leases.get(name)
        if lease == old:
            return False
        if lease is None:
            del self._leases[name]
            metrics.LEASE_EVENTS.labels("removed").inc()
        else:
            self._leases[name] = lease
            metrics.LEASE_EVENTS.labels("added").inc()
            if log.isEnabledFor(V(2)):
                log.log(V(2), "Lease %s: %s", name, value.decode(errors="replace"))  # at most MAX_LEASE_VALUE
        return True

    def _remove(self, name: str) -> bool:
        self._bad.pop(name, None)
        if self._leases.pop(name, None) is None:
            return False
        metrics.LEASE_EVENTS.labels("removed").inc()
        return True

    # -- list and watch --------------------------------------------------------------------------

    def _list(self) -> None:
        """Read everything under the prefix (the config and the leases) and replace the cache with it."""
        kvs, rev = self.client.get(self.prefix + "/", prefix=True)
        changed: set[str] = set()
        found = {kv.key[len(self.subnets_prefix):]: kv.value for kv in sorted(kvs, key=lambda kv: kv.create_revision)
                 if kv.key.startswith(self.subnets_prefix)}
        self._config_changed(next((kv.value for kv in kvs if kv.key == self.prefix + "/config"), None))
        with self._lock:
            for name in list(self._leases):
                if name not in found and self._remove(name):
                    changed.add(name)
            for name, value in found.items():
                if self._put(name, value):
                    changed.add(name)
            self._rev = rev
            metrics.LEASES.set(len(self._leases))
        if self.node_name and self.node_name not in found and rev >= self._own_rev:
            self._lost()
        if changed:
            self.on_change(changed)

    def _apply(self, events: list[Event]) -> None:
        changed: set[str] = set()
        config_key = self.prefix + "/config"
        for ev in events:
            self._rev = max(self._rev, ev.kv.mod_revision)
            key = ev.kv.key
            if key == config_key:
                self._config_changed(None if ev.deleted else ev.kv.value)
            if not key.startswith(self.subnets_prefix):
                continue
            name = key[len(self.subnets_prefix):]
            with self._lock:
                if self._remove(name) if ev.deleted else self._put(name, ev.kv.value):
                    changed.add(name)
                metrics.LEASES.set(len(self._leases))
            if name == self.node_name and ev.kv.mod_revision > self._own_rev:
                if ev.deleted:
                    self._lost()
                elif ev.kv.value != self._own_value:
                    # Not fought over: two processes rewriting one key would do so forever.
                    log.warning("This node's lease %s was changed by someone else to %s; it is written again "
                                "at the next renewal", key, ev.kv.value.decode(errors="replace"))
        if changed:
            self.on_change(changed)

    def _lost(self) -> None:
        if not self.revoked.is_set():
            log.error("Lease has been revoked. Shutting down daemon.")
            self.revoked.set()
            self.on_change({self.node_name})

    def run(self, stop: threading.Event) -> None:
        """List, then watch, until ``stop`` is set: resume after a failure, list again after compaction."""
        backoff = _Backoff()
        need_list = True
        while not stop.is_set():
            self.progress = time.monotonic()
            try:
                if need_list:
                    self._list()
                    need_list = False
                    self.synced.set()
                started = time.monotonic()
                for events in self.client.watch(self.prefix + "/", self._rev + 1):
                    self.progress = time.monotonic()
                    if stop.is_set():
                        return
                    backoff.reset()
                    if events:
                        self._apply(events)
                metrics.WATCH_RESTARTS.labels("timeout").inc()
                if time.monotonic() - started < 1:
                    stop.wait(1)  # a server that ends watches at once must not make us spin
                continue
            except Compacted as exc:
                log.warning("Watch of subnet leases failed because etcd index outside history window "
                            "(compacted at revision %d); listing the leases again", exc.revision)
                metrics.WATCH_RESTARTS.labels("expired").inc()
                need_list = True
                continue
            except EtcdError as exc:
                metrics.API_ERRORS.inc()
                metrics.WATCH_RESTARTS.labels("error").inc()
                log.error("Watch subnets: %s", exc)
            except Exception:  # a malformed message must not end the watch for good
                metrics.WATCH_RESTARTS.labels("error").inc()
                log.exception("Unexpected error in the lease watch")
            stop.wait(backoff.next())

    def wait_synced(self, stop: threading.Event, timeout: float = 600.0) -> None:
        """Block until the first list is in the cache (or ``stop``); LeaseError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.synced.wait(0.2):
            if stop.is_set():
                return
            if time.monotonic() > deadline:
                raise LeaseError("timed out waiting for the list of subnet leases")

    # -- this node's lease -----------------------------------------------------------------------

    def _compatible(self, subnet: IPv4Network) -> bool:
        """flanneld's isSubnetConfigCompat: in [SubnetMin, SubnetMax] with the length SubnetLen."""
        cfg = self.config
        assert cfg is not None and cfg.subnet_min is not None and cfg.subnet_max is not None
        return cfg.subnet_min <= subnet.network_address <= cfg.subnet_max and subnet.prefixlen == cfg.subnet_len

    def _allocate(self, taken: list[IPv4Network]) -> IPv4Network:
        """A random one of the first free subnets from SubnetMin up; LeaseError ``out of subnets``."""
        cfg = self.config
        assert cfg is not None and cfg.subnet_min is not None and cfg.subnet_max is not None
        log.info("Picking subnet in range %s ... %s", cfg.subnet_min, cfg.subnet_max)
        size = 1 << (32 - cfg.subnet_len)
        # The taken address ranges, merged and in order, walked once beside the candidates: thousands
        # of leases are not compared with each candidate.
        spans: list[list[int]] = []
        for start, end in sorted((int(t.network_address), int(t.broadcast_address)) for t in taken):
            if spans and start <= spans[-1][1] + 1:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        free: list[IPv4Network] = []
        addr, i = int(cfg.subnet_min), 0
        while addr <= int(cfg.subnet_max) and len(free) < MAX_CANDIDATES:
            while i < len(spans) and spans[i][1] < addr:
                i += 1
            if i == len(spans) or spans[i][0] > addr + size - 1:
                free.append(IPv4Network((addr, cfg.subnet_len)))
            addr += size
        if not free:
            raise LeaseError("out of subnets")
        return random.choice(free)

    def published_data(self, family: Family, public_ip: IPAddress) -> str:
        """The BackendData of the lease in etcd that carries ``public_ip``, or '': a re-created VXLAN
        device takes its VtepMAC, so that the other nodes need not change anything."""
        try:
            kvs, _ = self.client.get(self.subnets_prefix, prefix=True)
        except EtcdError:
            return ""
        for kv in kvs:
            try:
                lease = parse_lease(kv.key[len(self.subnets_prefix):], kv.value)
            except ValueError:
                continue
            if lease.public_ip == public_ip and lease.backend_data:
                return lease.backend_data
        return ""

    def _write(self, subnet: IPv4Network, value: bytes, create: bool, reserved: bool = False) -> bool:
        """Attach the key to a fresh etcd lease; with ``create`` only if the key does not exist.

        A ``reserved`` key (a reservation: a key an admin wrote without a lease) stays without one.
        """
        key = self.subnets_prefix + subnet_key(subnet)
        if reserved:
            self._set_own(subnet, value, self.client.put(key, value, 0), 0, 0)
            return True
        lease_id, ttl = self.client.grant(self.ttl)
        try:
            if create:
                rev = self.client.create(key, value, lease_id)
                if not rev:
                    self.client.revoke(lease_id)
                    return False
            else:
                rev = self.client.put(key, value, lease_id)
        except EtcdError:
            try:
                self.client.revoke(lease_id)
            except EtcdError as exc:
                log.error("%s", exc)
            raise
        old = self._lease_id
        self._set_own(subnet, value, rev, lease_id, ttl)
        if old and old != lease_id:
            try:  # the key left it: only tidiness, it would expire by itself
                self.client.revoke(old)
            except EtcdError:
                pass
        return True

    def _set_own(self, subnet: IPv4Network, value: bytes, rev: int, lease_id: int, ttl: int) -> None:
        self.node_name, self._own_value, self._own_rev, self._lease_id = subnet_key(subnet), value, rev, lease_id
        self._expires = time.monotonic() + ttl
        self._expiration = datetime.now(timezone.utc) + timedelta(seconds=ttl)
        self.acquired.set()

    def acquire_lease(self, public_ips: dict[Family, IPAddress], backend_type: str,
                      backend_data: dict[Family, str]) -> dict[Family, Lease]:
        """This node's IPv4 lease (the one family of etcd mode), by family."""
        public_ip = public_ips[IPV4]
        assert isinstance(public_ip, IPv4Address)
        return {IPV4: self._acquire(public_ip, backend_type, backend_data[IPV4])}

    def _acquire(self, public_ip: IPv4Address, backend_type: str, backend_data: str) -> Lease:
        """flanneld's AcquireLease: reuse the lease carrying our IP, else the previous subnet, else a
        random free one, created in a transaction so that racing nodes never share a subnet.

        Once acquired, the lease is kept: a call writes it again only when the attributes differ,
        and raises LeaseRevoked once someone deleted it. Raises LeaseError with flanneld's message
        (``out of subnets``, an etcd error).
        """
        assert self.config is not None
        value = lease_value(public_ip, backend_type, backend_data)
        if self.revoked.is_set():
            raise LeaseRevoked("Lease has been revoked")
        try:
            if self.node_name:
                subnet = parse_subnet_key(self.node_name)
                assert subnet is not None
                if value != self._own_value:
                    with self._renew_lock:
                        self._write(subnet, value, create=False, reserved=not self._lease_id)
                return Lease(subnet, public_ip, backend_type, backend_data)
            for _ in range(RACE_RETRIES):
                kvs, _rev = self.client.get(self.subnets_prefix, prefix=True)
                existing: list[Lease] = []
                reservations: set[IPv4Network] = set()  # keys without an etcd lease
                for kv in kvs:
                    try:
                        existing.append(parse_lease(kv.key[len(self.subnets_prefix):], kv.value))
                    except ValueError:
                        continue
                    if not kv.lease:
                        reservations.add(_subnet(existing[-1]))
                mine = next((le for le in existing if le.public_ip == public_ip), None)
                if mine is not None:
                    ours = _subnet(mine)
                    if self._compatible(ours):
                        log.info("Found lease (ip: %s ipv6: ::/0) for current IP (%s), reusing", ours, public_ip)
                        with self._renew_lock:
                            self._write(ours, value, create=False, reserved=ours in reservations)
                        return Lease(ours, public_ip, backend_type, backend_data)
                    log.info("Found lease (%s) for current IP (%s) but not compatible with current config, deleting",
                             ours, public_ip)
                    self.client.delete(self.subnets_prefix + subnet_key(ours))
                    existing.remove(mine)
                taken = [_subnet(le) for le in existing]
                subnet = None
                prev = self.previous
                if prev is not None and prev not in taken:
                    if self._compatible(prev):
                        log.info("Found previously leased subnet (%s), reusing", prev)
                        subnet = prev
                    else:
                        log.error("Found previously leased subnet (%s) that is not compatible with the Etcd "
                                  "network config, ignoring", prev)
                if subnet is None:
                    subnet = self._allocate(taken)
                with self._renew_lock:
                    created = self._write(subnet, value, create=True)
                if created:
                    log.info("Allocated lease (ip: %s ipv6: ::/0) to current node (%s) ", subnet, public_ip)
                    return Lease(subnet, public_ip, backend_type, backend_data)
        except EtcdError as exc:
            metrics.API_ERRORS.inc()
            raise LeaseError(str(exc)) from exc
        raise LeaseError("Max retries reached trying to acquire a subnet")

    def _renew(self) -> None:
        with self._renew_lock:
            subnet = parse_subnet_key(self.node_name)
            assert subnet is not None
            self._write(subnet, self._own_value, create=False)

    def _renew_logged(self) -> bool:
        try:
            self._renew()
        except EtcdError as exc:
            metrics.API_ERRORS.inc()
            log.error("Error renewing lease (trying again in 1 min): %s", exc)
            return False
        log.info("Lease renewed, new expiration: %s", _go_time(self._expiration))
        return True

    def keep_lease(self, stop: threading.Event) -> None:
        """Once the lease is acquired, renew it at its expiry less the margin, retrying a failure every
        minute, until ``stop`` is set or it is revoked (a worker of its own: flanneld's CompleteLease)."""
        while not self.acquired.wait(1.0):
            if stop.is_set():
                return
        if not self._lease_id:
            return  # a reservation does not expire
        retry_at = 0.0
        while not self.revoked.is_set():
            due = max(self._expires - self.renew_margin, retry_at)
            if stop.wait(max(0.0, due - time.monotonic())):
                return
            if self.revoked.is_set():
                return
            if time.monotonic() < self._expires - self.renew_margin:
                continue  # renewed meanwhile (the lease was acquired again)
            retry_at = 0.0 if self._renew_logged() else time.monotonic() + RENEW_RETRY

    def complete_lease(self) -> None:
        """Nothing: the renewal, flanneld's CompleteLease in etcd mode, is the ``keep_lease`` worker."""
