"""The etcd subnet manager against a real etcd (Debian's etcd-server), started by each test on loopback."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from pyflannel import config
from pyflannel.etcdclient import EtcdClient, EtcdError
from pyflannel.family import IPV4, IPV6
from pyflannel.lease import Lease, LeaseError, LeaseRevoked
from pyflannel.subnet import etcd
from pyflannel.subnet.nodenet import NodeNetwork
from tools.etcdserver import EtcdServer

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None or shutil.which("etcdctl") is None,
                                reason="needs Debian's etcd-server and etcd-client")

PREFIX = "/coreos.com/network"
CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}
# A node's lease exactly as flanneld v0.20.2 writes it.
FLANNELD_VALUE = ('{"PublicIP":"192.168.56.12","PublicIPv6":null,"BackendType":"vxlan",'
                  '"BackendData":{"VNI":1,"VtepMAC":"9a:1c:2b:3d:4e:5f"}}')
DATA = '{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}'


class Recorder:
    """Collects the lease keys the manager reports as changed."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __call__(self, names: set[str]) -> None:
        self.names |= names


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20) -> float:
    """Wait until ``check()``; the seconds it took. Fails the test after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EtcdServer]:
    with EtcdServer(tmp_path / "etcd") as s:
        yield s


def put_config(server: EtcdServer, cfg: dict | None = None) -> None:
    server.etcdctl("put", PREFIX + "/config", json.dumps(cfg or CONFIG))


class Manager:
    """An EtcdSubnetManager with its own client and threads, stopped at the end of the test."""

    def __init__(self, server: EtcdServer, previous: IPv4Network | None = None, ttl: int = etcd.SUBNET_TTL,
                 margin: float = 3600, **client: str) -> None:
        self.stop = threading.Event()
        self.changes = Recorder()
        self.sm = etcd.EtcdSubnetManager(EtcdClient(server.url, **client), PREFIX, previous, margin,
                                         self.changes, ttl=ttl)

    def start(self) -> "Manager":
        assert self.sm.get_network_config(self.stop) is not None
        threading.Thread(target=self.sm.run, args=(self.stop,), daemon=True).start()
        threading.Thread(target=self.sm.keep_lease, args=(self.stop,), daemon=True).start()
        self.sm.wait_synced(self.stop)
        return self

    def acquire(self, ip: str, data: str = DATA) -> Lease:
        leases = self.sm.acquire_lease({IPV4: IPv4Address(ip)}, "vxlan", {IPV4: data})
        assert set(leases) == {IPV4}
        return leases[IPV4]


@pytest.fixture
def managers() -> Iterator[list[Manager]]:
    made: list[Manager] = []
    yield made
    for m in made:
        m.stop.set()


def leases_in_etcd(server: EtcdServer) -> dict[str, dict]:
    out = server.etcdctl("get", "--prefix", PREFIX + "/subnets/").stdout.splitlines()
    return {out[i][len(PREFIX + "/subnets/"):]: json.loads(out[i + 1]) for i in range(0, len(out), 2)}


# -- keys and values ---------------------------------------------------------------------------------


def test_lease_value_is_flanneld_json() -> None:
    assert etcd.lease_value(IPv4Address("192.168.56.12"), "vxlan", '{"VNI":1,"VtepMAC":"9a:1c:2b:3d:4e:5f"}') \
        == FLANNELD_VALUE.encode()


def test_host_gw_lease_value_has_no_backend_data() -> None:
    # flanneld's host-gw leaves BackendData out (omitempty); the backend's "null" is not written.
    assert etcd.lease_value(IPv4Address("192.168.56.12"), "host-gw", "null") == \
        b'{"PublicIP":"192.168.56.12","PublicIPv6":null,"BackendType":"host-gw"}'


def test_flanneld_lease_parses() -> None:
    lease = etcd.parse_lease("10.244.1.0-24", FLANNELD_VALUE.encode())
    assert lease == Lease(IPv4Network("10.244.1.0/24"), IPv4Address("192.168.56.12"), "vxlan",
                          '{"VNI":1,"VtepMAC":"9a:1c:2b:3d:4e:5f"}')
    assert etcd.parse_subnet_key("10.244.1.0-24&fd00:0:0:1::-64") == IPv4Network("10.244.1.0/24")


@pytest.mark.parametrize("name,value,error", [
    ("10.244.1.0-24", b"{", "10.244.1.0-24: Expecting property name"),
    ("10.244.1.0-24", b'{"PublicIP":"garbage"}', "PublicIP: Invalid IP address format"),
    ("10.244.1.0-24", b"[1]", "not a JSON object"),
    ("10.244.1.0", b"{}", "not a subnet"),
    ("10.244.1.1-24", b"{}", "not a subnet"),
])
def test_bad_lease_values_are_reported(name: str, value: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        etcd.parse_lease(name, value)


def test_allocation_skips_every_overlap() -> None:
    sm = etcd.EtcdSubnetManager(EtcdClient("http://127.0.0.1:9"), PREFIX, None, 3600, Recorder())
    sm.config = config.parse(json.dumps({"Network": "10.5.0.0/16", "SubnetLen": 26, "SubnetMin": "10.5.0.0",
                                         "SubnetMax": "10.5.3.192", "Backend": {"Type": "vxlan"}}))
    n = IPv4Network
    # 16 candidates; taken: a /23 over the first 8, nested leases inside it, a /28 in the 12th.
    taken = [n("10.5.0.0/23"), n("10.5.0.64/26"), n("10.5.1.128/28"), n("10.5.2.208/28")]
    free = {n("10.5.2.0/26"), n("10.5.2.64/26"), n("10.5.2.128/26"), n("10.5.3.0/26"), n("10.5.3.64/26"),
            n("10.5.3.128/26"), n("10.5.3.192/26")}
    assert {sm._allocate(taken) for _ in range(200)} == free
    with pytest.raises(LeaseError, match="^out of subnets$"):
        sm._allocate(taken + [n("10.5.2.0/23")])


# -- the network config ------------------------------------------------------------------------------


def test_waits_for_the_config_with_a_hint(server: EtcdServer, managers: list[Manager],
                                         caplog: pytest.LogCaptureFixture) -> None:
    m = Manager(server)
    managers.append(m)
    result: list = []
    t = threading.Thread(target=lambda: result.append(m.sm.get_network_config(m.stop)))
    t.start()
    wait_for("the missing-config error", lambda: "flannel config not found in etcd store" in caplog.text)
    assert "Couldn't fetch network config: flannel config not found in etcd store. Did you create your config " \
           "using etcdv3 API?" in caplog.text
    assert "etcdctl --endpoints=%s put %s/config" % (server.url, PREFIX) in caplog.text
    put_config(server, {"Network": "10.5.0.0/16", "SubnetLen": 31, "Backend": {"Type": "vxlan"}})
    wait_for("the validation error", lambda: "SubnetLen must be less than /31" in caplog.text)
    put_config(server, {"Network": "10.5.0.0/16", "SubnetLen": 26, "Backend": {"Type": "vxlan"}})
    t.join(10)
    cfg = result[0]
    assert (cfg.network, cfg.subnet_len, str(cfg.subnet_min), str(cfg.subnet_max)) == \
        (IPv4Network("10.5.0.0/16"), 26, "10.5.0.64", "10.5.255.192")
    # Each error once, not once a second.
    assert caplog.text.count("flannel config not found") == 1


@pytest.mark.parametrize("cfg,error", [
    ({"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:5::/56", "Backend": {"Type": "vxlan"}},
     "EnableIPv6: pyflannel's etcd mode runs IPv4 only; set it to false (dual-stack runs with --kube-subnet-mgr)"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:5::/56", "Backend": {"Type": "vxlan"}},
     "EnableIPv4: pyflannel's etcd mode runs IPv4 only; set it to true with a Network"),
    ({"Network": "10.5.0.0/16", "Networks": ["10.6.0.0/16"], "Backend": {"Type": "vxlan"}},
     "Networks: 10.6.0.0/16 differs from Network 10.5.0.0/16"),
])
def test_a_config_etcd_mode_does_not_run_waits_naming_the_key(server: EtcdServer, managers: list[Manager],
                                                              caplog: pytest.LogCaptureFixture,
                                                              cfg: dict, error: str) -> None:
    put_config(server, cfg)
    m = Manager(server)
    managers.append(m)
    result: list = []
    t = threading.Thread(target=lambda: result.append(m.sm.get_network_config(m.stop)))
    t.start()
    wait_for("the error", lambda: "Couldn't fetch network config: " + error in caplog.text)
    put_config(server, {"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}})  # host-gw runs in etcd mode
    t.join(10)
    assert result[0].networks == {IPV4: IPv4Network("10.5.0.0/16")} and result[0].backend_type == "host-gw"


def test_a_changed_config_is_read_and_reported(server: EtcdServer, managers: list[Manager],
                                               caplog: pytest.LogCaptureFixture) -> None:
    put_config(server)
    m = Manager(server).start()
    managers.append(m)
    put_config(server, {"network": "10.5.0.0/16", "backend": {"type": "vxlan"}})  # the same, spelled otherwise
    put_config(server, {"Network": "10.5.0.0/16", "SubnetLen": 31, "Backend": {"Type": "vxlan"}})
    put_config(server, {"Network": "10.6.0.0/16", "Backend": {"Type": "vxlan"}})
    wait_for("the change warning", lambda: "changed; restart pyflannel to use it" in caplog.text)
    assert "changed and is invalid (keeping the running one): error parsing subnet config: SubnetLen must be " \
           "less than /31" in caplog.text
    assert caplog.text.count("changed; restart pyflannel to use it") == 1
    # Leases are still checked against the running config.
    assert m.sm.config is not None and m.sm.network == m.sm.config.network == IPv4Network("10.5.0.0/16")


# -- this node's lease -------------------------------------------------------------------------------


def test_allocation_reuse_and_flanneld_value(server: EtcdServer, managers: list[Manager],
                                             caplog: pytest.LogCaptureFixture) -> None:
    put_config(server)
    caplog.set_level(logging.INFO)
    a = Manager(server).start()
    managers.append(a)
    lease = a.acquire("192.168.56.11")
    assert lease.subnet.subnet_of(IPv4Network("10.5.0.0/16")) and lease.subnet.prefixlen == 24
    assert lease.subnet != IPv4Network("10.5.0.0/24")  # SubnetMin skips the first subnet
    assert "Picking subnet in range 10.5.1.0 ... 10.5.255.0" in caplog.text
    assert "Allocated lease (ip: %s ipv6: ::/0) to current node (192.168.56.11)" % lease.subnet in caplog.text
    key = etcd.subnet_key(lease.subnet)
    raw = server.etcdctl("get", "--print-value-only", PREFIX + "/subnets/" + key).stdout.strip()
    assert raw == '{"PublicIP":"192.168.56.11","PublicIPv6":null,"BackendType":"vxlan",' \
                  '"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}}'
    ttl = server.etcdctl("-w", "json", "get", PREFIX + "/subnets/" + key).stdout
    lease_id = json.loads(ttl)["kvs"][0]["lease"]
    granted = json.loads(server.etcdctl("-w", "json", "lease", "timetolive", "%x" % lease_id).stdout)
    assert granted["granted-ttl"] == 86400

    # A restart with the same public IP reuses the lease and writes the new VtepMAC.
    b = Manager(server)
    managers.append(b)
    b.start()
    again = b.acquire("192.168.56.11", '{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}')
    assert again.subnet == lease.subnet
    assert "Found lease (ip: %s ipv6: ::/0) for current IP (192.168.56.11), reusing" % lease.subnet in caplog.text
    assert leases_in_etcd(server)[key]["BackendData"]["VtepMAC"] == "aa:bb:cc:dd:ee:02"

    # The VtepMAC our IP advertises, for a re-created device.
    assert json.loads(b.sm.published_data(IPV4, IPv4Address("192.168.56.11")))["VtepMAC"] == "aa:bb:cc:dd:ee:02"
    assert b.sm.published_data(IPV4, IPv4Address("192.168.56.99")) == ""

    # A new IP with subnet.env's previous subnet free gets that one.
    server.etcdctl("del", PREFIX + "/subnets/" + key)
    c = Manager(server, previous=lease.subnet).start()
    managers.append(c)
    assert c.sm.name == "Etcd Local Manager with Previous Subnet: %s" % lease.subnet
    assert c.acquire("192.168.56.99").subnet == lease.subnet
    assert "Found previously leased subnet (%s), reusing" % lease.subnet in caplog.text


def test_a_reservation_is_kept_without_an_etcd_lease(server: EtcdServer, managers: list[Manager]) -> None:
    # flannel's reservations: a key written without a lease, for a node's public IP.
    put_config(server)
    server.etcdctl("put", PREFIX + "/subnets/10.5.42.0-24", '{"PublicIP":"192.168.56.11"}')
    m = Manager(server, ttl=4, margin=3).start()
    managers.append(m)
    assert m.acquire("192.168.56.11").subnet == IPv4Network("10.5.42.0/24")
    time.sleep(2)  # past the renewal time of a 4 s lease
    kv = json.loads(server.etcdctl("-w", "json", "get", PREFIX + "/subnets/10.5.42.0-24").stdout)["kvs"][0]
    assert "lease" not in kv
    assert leases_in_etcd(server)["10.5.42.0-24"]["BackendData"]["VtepMAC"] == "aa:bb:cc:dd:ee:01"


def test_an_incompatible_lease_of_our_ip_is_replaced(server: EtcdServer, managers: list[Manager],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    put_config(server, {"Network": "10.5.0.0/16", "SubnetLen": 25, "Backend": {"Type": "vxlan"}})
    caplog.set_level(logging.INFO)
    server.etcdctl("put", PREFIX + "/subnets/10.5.7.0-24", '{"PublicIP":"192.168.56.11"}')
    m = Manager(server).start()
    managers.append(m)
    lease = m.acquire("192.168.56.11")
    assert lease.subnet.prefixlen == 25
    assert "but not compatible with current config, deleting" in caplog.text
    assert list(leases_in_etcd(server)) == [etcd.subnet_key(lease.subnet)]


def test_twenty_managers_racing_get_distinct_subnets(server: EtcdServer, managers: list[Manager]) -> None:
    put_config(server, {"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.20.0",
                        "Backend": {"Type": "vxlan"}})
    racers = [Manager(server) for _ in range(20)]
    managers.extend(racers)
    for r in racers:
        assert r.sm.get_network_config(r.stop) is not None
    go = threading.Barrier(20)
    results: dict[int, Lease | Exception] = {}

    def race(i: int) -> None:
        go.wait()
        try:
            results[i] = racers[i].acquire("192.168.57.%d" % (i + 1))
        except LeaseError as exc:
            results[i] = exc

    threads = [threading.Thread(target=race, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    subnets = [r.subnet for r in results.values() if isinstance(r, Lease)]
    assert len(subnets) == 20, results
    assert len(set(subnets)) == 20
    stored = leases_in_etcd(server)
    assert sorted(stored) == sorted(etcd.subnet_key(s) for s in subnets)
    assert {v["PublicIP"] for v in stored.values()} == {"192.168.57.%d" % (i + 1) for i in range(20)}
    # The range is full now.
    late = Manager(server)
    managers.append(late)
    assert late.sm.get_network_config(late.stop) is not None
    with pytest.raises(LeaseError, match="^out of subnets$"):
        late.acquire("192.168.57.200")


def test_renewal_and_revocation(server: EtcdServer, managers: list[Manager],
                                caplog: pytest.LogCaptureFixture) -> None:
    put_config(server)
    caplog.set_level(logging.INFO)
    # A 6 s lease renewed 4 s before it expires: every 2 s.
    m = Manager(server, ttl=6, margin=4).start()
    managers.append(m)
    lease = m.acquire("192.168.56.11")
    key = PREFIX + "/subnets/" + etcd.subnet_key(lease.subnet)
    first = json.loads(server.etcdctl("-w", "json", "get", key).stdout)["kvs"][0]["lease"]
    wait_for("two renewals", lambda: caplog.text.count("Lease renewed, new expiration: ") >= 2)
    time.sleep(7)  # longer than the lease: only renewals keep the key
    kv = json.loads(server.etcdctl("-w", "json", "get", key).stdout)["kvs"][0]
    assert kv["lease"] != first
    assert not m.sm.revoked.is_set()
    # The old etcd leases are revoked, not left to expire.
    assert len(server.etcdctl("lease", "list").stdout.split("\n")[1:-1]) == 1

    server.etcdctl("del", key)
    wait_for("the revocation", m.sm.revoked.is_set)
    assert "Lease has been revoked. Shutting down daemon." in caplog.text
    assert m.sm.node_name in m.changes.names
    with pytest.raises(LeaseRevoked):  # the daemon, asked again, stops
        m.acquire("192.168.56.11")


def test_acquiring_again_writes_only_a_change(server: EtcdServer, managers: list[Manager]) -> None:
    put_config(server)
    m = Manager(server).start()
    managers.append(m)
    lease = m.acquire("192.168.56.11")
    key = PREFIX + "/subnets/" + etcd.subnet_key(lease.subnet)

    def revision() -> int:
        return int(json.loads(server.etcdctl("-w", "json", "get", key).stdout)["kvs"][0]["mod_revision"])

    written = revision()
    assert m.acquire("192.168.56.11") == lease
    assert revision() == written
    changed = m.acquire("192.168.56.11", '{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:09"}')
    assert changed.subnet == lease.subnet and revision() > written
    assert leases_in_etcd(server)[etcd.subnet_key(lease.subnet)]["BackendData"]["VtepMAC"] == "aa:bb:cc:dd:ee:09"


def test_failed_renewal_is_retried(server: EtcdServer, managers: list[Manager],
                                   caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    put_config(server)
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(etcd, "RENEW_RETRY", 2.0)
    m = Manager(server, ttl=60, margin=57).start()
    managers.append(m)
    m.acquire("192.168.56.11")
    server.stop()
    wait_for("a failed renewal", lambda: "Error renewing lease (trying again in 1 min): " in caplog.text)
    server.start()
    wait_for("a renewal after the failure", lambda: "Lease renewed, new expiration: " in caplog.text, 30)
    assert not m.sm.revoked.is_set()


# -- the other nodes' leases -------------------------------------------------------------------------


def test_watch_sees_every_lease_and_skips_bad_ones(server: EtcdServer, managers: list[Manager],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    put_config(server)
    a = Manager(server).start()
    managers.append(a)
    own = a.acquire("192.168.56.11")
    # A lease written by hand in flanneld's exact format, several in one transaction (flanneld
    # v0.20.2 read only the first event of a watch message), and bad ones.
    server.etcdctl("put", PREFIX + "/subnets/10.5.200.0-24", FLANNELD_VALUE)
    puts = "".join('put %s/subnets/10.5.%d.0-24 %s\n' % (PREFIX, i, json.dumps(json.dumps(
        {"PublicIP": "192.168.56.%d" % i, "BackendType": "vxlan",
         "BackendData": {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:%02x" % i}}))) for i in (201, 202, 203))
    # etcdctl's interactive txn: no comparisons, the puts on success, nothing on failure.
    assert server.etcdctl("txn", input="\n" + puts + "\n\n").stdout.startswith("SUCCESS")
    server.etcdctl("put", PREFIX + "/subnets/10.5.210.0-24", "{not json")
    server.etcdctl("put", PREFIX + "/subnets/10.6.1.0-24", '{"PublicIP":"192.168.56.66"}')
    server.etcdctl("put", PREFIX + "/subnets/10.5.211.0-25", '{"PublicIP":"192.168.56.67"}')
    want = {"10.5.200.0-24", "10.5.201.0-24", "10.5.202.0-24", "10.5.203.0-24"}
    wait_for("the leases", lambda: set(a.sm.leases(IPV4)) == want)
    assert a.sm.leases(IPV4)["10.5.200.0-24"] == Lease(IPv4Network("10.5.200.0/24"), IPv4Address("192.168.56.12"),
                                                   "vxlan", '{"VNI":1,"VtepMAC":"9a:1c:2b:3d:4e:5f"}')
    assert a.sm.lease_of(etcd.subnet_key(own.subnet), IPV4) is None  # our own is not a peer
    assert a.sm.lease_of("10.5.200.0-24", IPV4) == a.sm.leases(IPV4)["10.5.200.0-24"]
    assert a.sm.leases(IPV6) == {} and a.sm.lease_of("10.5.200.0-24", IPV6) is None  # etcd mode is IPv4-only
    wait_for("the warnings", lambda: caplog.text.count("Ignoring bad subnet node") == 3)
    assert "10.6.1.0-24: subnet 10.6.1.0/24 is not a /24 inside the Network 10.5.0.0/16" in caplog.text
    assert want <= a.changes.names

    # Fixing a bad value makes it a lease; a deletion removes it; nothing is reported twice.
    server.etcdctl("put", PREFIX + "/subnets/10.5.210.0-24", '{"PublicIP":"192.168.56.70","BackendType":"vxlan"}')
    server.etcdctl("del", PREFIX + "/subnets/10.5.201.0-24")
    wait_for("the fix and the deletion", lambda: set(a.sm.leases(IPV4)) == want - {"10.5.201.0-24"} | {"10.5.210.0-24"})
    assert caplog.text.count("Ignoring bad subnet node") == 3


def kill_connections(server: EtcdServer) -> None:
    """Abort this process's TCP connections to etcd from outside, as a dead network would.

    Only this test's sockets: etcd's gateway keeps its own connection to the same port.
    """
    out = subprocess.run(["ss", "-tnpH", "dst", "127.0.0.1", "dport", "=", ":%d" % server.port],
                         capture_output=True, text=True, check=True).stdout
    mine = [line.split()[3] for line in out.splitlines() if "pid=%d," % os.getpid() in line]
    assert mine, out
    for local in mine:
        subprocess.run(["ss", "-K", "src", local.rpartition(":")[0], "sport", "=", ":" + local.rpartition(":")[2],
                        "dport", "=", ":%d" % server.port], capture_output=True, check=True)


class Blocking(Recorder):
    """A receiver that holds the watch thread on its next call until released."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.called = threading.Event()
        self.release = threading.Event()

    def __call__(self, names: set[str]) -> None:
        super().__call__(names)
        if self.armed:
            self.called.set()
            self.release.wait(30)


def test_compacted_revision_is_survived(server: EtcdServer, managers: list[Manager],
                                        caplog: pytest.LogCaptureFixture) -> None:
    put_config(server)
    a = Manager(server)
    managers.append(a)
    a.sm.on_change = a.changes = blocking = Blocking()
    a.start()
    # The watch thread is held inside the receiver while its connection is aborted, leases come
    # and go, and etcd compacts its history past them.
    blocking.armed = True
    server.etcdctl("put", PREFIX + "/subnets/10.5.100.0-24", FLANNELD_VALUE)
    assert blocking.called.wait(10)
    blocking.armed = False
    kill_connections(server)
    server.etcdctl("del", PREFIX + "/subnets/10.5.100.0-24")
    server.etcdctl("put", PREFIX + "/subnets/10.5.101.0-24", FLANNELD_VALUE.replace("56.12", "56.13"))
    rev = json.loads(server.etcdctl("-w", "json", "get", PREFIX + "/config").stdout)["header"]["revision"]
    server.etcdctl("compaction", str(rev))
    blocking.release.set()
    took = wait_for("the re-list", lambda: set(a.sm.leases(IPV4)) == {"10.5.101.0-24"}, 60)
    print("re-listed after compaction in %.1fs" % took)
    assert "Watch of subnet leases failed because etcd index outside history window" in caplog.text
    assert {"10.5.100.0-24", "10.5.101.0-24"} <= a.changes.names


def test_dropped_watch_resumes_from_its_revision(server: EtcdServer, managers: list[Manager],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    put_config(server)
    a = Manager(server)
    managers.append(a)
    a.sm.on_change = a.changes = blocking = Blocking()
    a.start()
    blocking.armed = True
    server.etcdctl("put", PREFIX + "/subnets/10.5.100.0-24", FLANNELD_VALUE)
    assert blocking.called.wait(10)
    blocking.armed = False
    kill_connections(server)
    server.etcdctl("put", PREFIX + "/subnets/10.5.101.0-24", FLANNELD_VALUE.replace("56.12", "56.13"))
    blocking.release.set()
    took = wait_for("the lease written while the watch was down", lambda: "10.5.101.0-24" in a.sm.leases(IPV4))
    print("resumed in %.1fs" % took)
    assert "history window" not in caplog.text


def test_etcd_restart_loses_no_lease(server: EtcdServer, managers: list[Manager],
                                     caplog: pytest.LogCaptureFixture) -> None:
    put_config(server)
    nodes = [Manager(server).start() for _ in range(3)]
    managers.extend(nodes)
    leases = [m.acquire("192.168.56.%d" % (11 + i)) for i, m in enumerate(nodes)]
    keys = {etcd.subnet_key(le.subnet) for le in leases}
    for m in nodes:
        wait_for("the peers", lambda m=m: set(m.sm.leases(IPV4)) == keys - {m.sm.node_name})
    server.stop()
    time.sleep(10)
    server.start()
    start = time.monotonic()
    # A node joining after the restart is seen by everyone.
    late = Manager(server).start()
    managers.append(late)
    keys.add(etcd.subnet_key(late.acquire("192.168.56.20").subnet))
    for m in nodes:
        wait_for("the joined node", lambda m=m: set(m.sm.leases(IPV4)) == keys - {m.sm.node_name}, 60)
    print("all nodes saw the node that joined after the restart %.1fs after etcd was back" % (time.monotonic() - start))
    assert set(leases_in_etcd(server)) == keys
    assert not any(m.sm.revoked.is_set() for m in nodes)


def test_tls_with_client_certificates(tmp_path: Path, managers: list[Manager]) -> None:
    tls = make_pki(tmp_path / "pki")
    with EtcdServer(tmp_path / "etcd", tls={"cert": tls["server.crt"], "key": tls["server.key"],
                                            "ca": tls["ca.crt"]}) as server:
        put_config(server)
        m = Manager(server, cafile=tls["ca.crt"], certfile=tls["client.crt"], keyfile=tls["client.key"]).start()
        managers.append(m)
        lease = m.acquire("192.168.56.11")
        assert etcd.subnet_key(lease.subnet) in leases_in_etcd(server)
        # Without a client certificate etcd refuses.
        anonymous = EtcdClient(server.url, cafile=tls["ca.crt"])
        with pytest.raises(EtcdError):
            anonymous.get(PREFIX + "/config")
        # A server certificate from another CA is refused.
        other = make_pki(tmp_path / "other")
        with pytest.raises(EtcdError, match="CERTIFICATE_VERIFY_FAILED"):
            EtcdClient(server.url, cafile=other["ca.crt"], certfile=tls["client.crt"],
                       keyfile=tls["client.key"]).get(PREFIX + "/config")


def test_username_and_password(server: EtcdServer, managers: list[Manager],
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    put_config(server)
    server.etcdctl("user", "add", "root", "--new-user-password=s3cret-Pw")
    server.etcdctl("auth", "enable")
    bad = EtcdClient(server.url, username="root", password="wrong")
    with pytest.raises(EtcdError, match="authentication failed") as exc:
        bad.get(PREFIX + "/config")
    assert "wrong" not in str(exc.value)
    m = Manager(server, username="root", password="s3cret-Pw").start()
    managers.append(m)
    m.acquire("192.168.56.11")
    assert "s3cret-Pw" not in caplog.text


def make_pki(folder: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    folder.mkdir(parents=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=test etcd CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (folder / (name + ".ext")).write_text(ext + "\n")
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key", "-out", name + ".csr",
            "-subj", "/CN=" + name)
        ssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", name + ".crt", "-days", "1", "-extfile", name + ".ext")
    return {f.name: str(f) for f in folder.iterdir()}


# -- hostile values ------------------------------------------------------------------------------------


@pytest.fixture
def default_recursion_limit() -> Iterator[None]:
    """Python's default recursion limit, whatever an earlier test in this process set (the daemon raises it)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(limit)


def test_hostile_lease_values_are_skipped_and_leases_come_oldest_first(
        server: EtcdServer, managers: list[Manager], caplog: pytest.LogCaptureFixture,
        default_recursion_limit: None) -> None:
    """Values nested deeper than this process follows (here Python's default limit: the daemon allows the
    API server's 10,000 levels, more than a lease value's 4 KiB can nest), larger than a lease needs, with an
    unusable public IP: each skipped with one warning, also by published_data at start-up; the others are
    leases, listed in the order they were created (of two leases with one VtepMAC the backend keeps the
    first)."""
    put_config(server)
    for i in (9, 3, 7):  # created in this order: not the keys' order
        server.etcdctl("put", "%s/subnets/10.5.%d.0-24" % (PREFIX, i), FLANNELD_VALUE.replace("56.12", "56.%d" % i))
    hostile = {"10.5.20.0-24": '{"PublicIP":"192.168.56.20","BackendData":%s}' % ("[" * 1200 + "]" * 1200),
               "10.5.21.0-24": '{"PublicIP":"192.168.56.21","x":"%s"}' % ("y" * 5000),
               "10.5.22.0-24": '{"PublicIP":"127.0.0.1","BackendType":"vxlan"}'}
    for key, value in hostile.items():
        server.etcdctl("put", "%s/subnets/%s" % (PREFIX, key), value)
    m = Manager(server).start()
    managers.append(m)
    assert list(m.sm.leases(IPV4)) == ["10.5.9.0-24", "10.5.3.0-24", "10.5.7.0-24"]
    assert m.sm.published_data(IPV4, IPv4Address("192.168.56.20")) == ""
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3 and all(w.startswith("Ignoring bad subnet node: 10.5.2") for w in warnings), warnings
    assert "10.5.21.0-24: the value is 5035 bytes, more than the 4096 a lease needs" in caplog.text
    assert "10.5.22.0-24: PublicIP 127.0.0.1 is a loopback address" in caplog.text
    # This node's network, once known: a lease over it goes; one of this node's address is taken as its own.
    server.etcdctl("put", PREFIX + "/subnets/10.5.30.0-24", FLANNELD_VALUE.replace("56.12", "56.11"))
    wait_for("the lease", lambda: "10.5.30.0-24" in m.sm.leases(IPV4))
    m.sm.set_node_network({IPV4: NodeNetwork((IPv4Address("192.168.56.11"),), (IPv4Network("10.5.3.0/25"),))})
    assert list(m.sm.leases(IPV4)) == ["10.5.9.0-24", "10.5.7.0-24"]
    assert "Ignoring bad subnet node: 10.5.3.0-24: subnet 10.5.3.0/24 overlaps this node's network 10.5.3.0/25" \
        in caplog.text


def test_secrets_stay_off_the_command_line_the_log_and_plain_http(tmp_path: Path) -> None:
    """The real daemon with --etcd-password-file, and a password in an endpoint URL: neither is shown by
    /proc/PID/cmdline nor logged; sending one over http:// to another host than this one is warned about."""
    secret = tmp_path / "password"
    secret.write_text("FileS3cret\n")
    proc = subprocess.Popen([sys.executable, "-m", "pyflannel", "--etcd-username=root",
                             "--etcd-endpoints=http://127.0.0.1:1,http://root:UrlS3cret@192.0.2.1:2",
                             "--etcd-password-file=%s" % secret], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        cmdline = Path("/proc/%d/cmdline" % proc.pid).read_bytes()
        time.sleep(3)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode()
    assert b"FileS3cret" not in cmdline and "FileS3cret" not in out
    assert "UrlS3cret" not in out and "http://root:********@192.0.2.1:2" in out, out
    assert out.count("Ignoring the user and password in the etcd endpoint http://root:********@192.0.2.1:2") == 1
    assert out.count("The etcd password of --etcd-username root, and the token it gets, are sent unencrypted to "
                     "http://root:********@192.0.2.1:2") == 1
    assert "Couldn't fetch network config" in out  # it ran, and keeps trying
