"""The datapath probes without root: the responder and probes over loopback, the prober's rotation,
confirmation and log lines against synthetic results, the checksum counters, and ``pyflannel check``'s
rendering of a report."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path as FsPath
from types import SimpleNamespace
from typing import Any

import pytest

from pyflannel import check, checksum, flags, metrics, probe
from pyflannel.family import IPV4
from pyflannel.probe import FULL_SIZE, NO_RESPONDER, OK, TCP, UDP, UNREACHABLE, Path, Prober, Responder, Result, Round
from tests.conftest import needs_netns
from tools.netcluster import REPO


def free_port() -> int:
    """A port free for TCP and UDP on 127.0.0.1 (a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class FakePeers:
    """What a backend shows the prober: its programmed entries and its device's state."""

    def __init__(self, count: int) -> None:
        self.device_ok = True
        self.applied: dict[str, Any] = {"k8s%04d" % i: SimpleNamespace(
            dst="10.%d.%d.0/24" % (i // 256, i % 256), public_ip="192.168.%d.%d" % (i // 250, i % 250))
            for i in range(2, count + 2)}


def loopback_path(peers: Any = None, network: str = "127.0.0.0/8") -> Path:
    return Path(IPV4, peers or FakePeers(0), "127.0.0.1", IPv4Network(network), "lo", vxlan=False, tunnel_port=0,
                on_lo=True)


def pump(sel: selectors.BaseSelector, responder: Responder | None, until: Callable[[], bool],
         timeout: float = 5.0) -> None:
    """Serve the selector until ``until()`` or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for key, mask in sel.select(0.02):
            key.data(mask)
        if responder is not None:
            responder.tick(time.monotonic())


@pytest.fixture
def responder() -> Iterator[tuple[selectors.BaseSelector, Responder]]:
    sel = selectors.DefaultSelector()
    r = Responder(sel, loopback_path(), free_port())
    r.open()
    yield sel, r
    r.close()
    sel.close()


def probe_once(sel: selectors.BaseSelector, responder: Responder | None, port: int, mtu: int = 1500,
               timeout: float = 3.0) -> Result:
    rnd = Round(sel, loopback_path(), port, [("peer", "127.0.0.1", "127.0.0.1")], mtu, timeout)
    pump(sel, responder, lambda: rnd.done, timeout + 1)
    return rnd.finish()[0]


# -- addresses, outcomes, counters -----------------------------------------------------------------------


def test_the_probe_address_is_the_network_address_in_ipv4_and_the_middle_one_in_ipv6() -> None:
    assert probe.probe_address(IPv4Network("10.244.1.0/24")) == "10.244.1.0"
    assert probe.probe_address(IPv6Network("fd00:10:244:1::/64")) == "fd00:10:244:1:8000::"
    assert probe.probe_address(IPv6Network("fd00::1/128")) == "fd00::1"


@pytest.mark.parametrize("tcp,udp,full,outcome", [
    ("ok", True, True, OK), ("refused", False, False, NO_RESPONDER), ("timeout", False, False, UNREACHABLE),
    ("timeout", True, True, TCP), ("ok", True, False, FULL_SIZE), ("ok", False, True, UDP),
    ("ok", True, None, OK),  # a full-size datagram that could not be sent is no loss
])
def test_outcomes(tcp: str, udp: bool, full: bool | None, outcome: str) -> None:
    assert Result("p", "10.244.2.0", "192.168.56.12", 0.0, tcp=tcp, udp=udp, full_size=full).outcome == outcome


def test_the_error_watch_needs_errors_with_traffic_in_consecutive_intervals() -> None:
    w = checksum.ErrorWatch()
    assert not w.update(100, 1000)  # the first reading is the baseline
    assert not w.update(103, 1100)  # once: a stray bad datagram says nothing yet
    assert w.update(110, 1200) and (w.rising, w.new_errors) == (2, 10)
    assert w.update(111, 1300)
    assert not w.update(111, 1400) and w.rising == 0  # no new errors
    assert not w.update(150, 1400)  # errors while the devices carried nothing
    assert not w.update(160, 1500)
    w.reset()
    assert not w.update(170, 1600) and w.update(180, 1700)
    assert not checksum.ErrorWatch().update(5, 5)


def test_the_counters_are_read_from_proc(tmp_path: FsPath) -> None:
    (tmp_path / "net").mkdir()
    assert checksum.udp_checksum_errors(str(tmp_path)) == 0 and checksum.device_packets(["flannel.1"], str(tmp_path)) == 0
    (tmp_path / "net/snmp").write_text(
        "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n"
        "Udp: 11 0 2 0 0 0 7 0 0\n"
        "UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti\n"
        "UdpLite: 0 0 0 0 0 0 99 0\n")
    (tmp_path / "net/snmp6").write_text("Udp6InDatagrams                 \t4\nUdp6InCsumErrors                \t3\n")
    (tmp_path / "net/dev").write_text(
        "Inter-|   Receive                            |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:    100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n"
        "flannel.1:  5000      40    0    0    0     0          0         0     6000      50    0    0    0     0       0          0\n")
    assert checksum.udp_checksum_errors(str(tmp_path)) == 10
    assert checksum.device_packets(["flannel.1", "flannel-v6.1"], str(tmp_path)) == 90


# -- the responder and probes over loopback ---------------------------------------------------------------


def test_a_probe_of_a_responder_gets_every_answer(responder: tuple[selectors.BaseSelector, Responder]) -> None:
    sel, r = responder
    result = probe_once(sel, r, r.port)
    assert (result.tcp, result.udp, result.full_size, result.outcome) == ("ok", True, True, OK)
    assert result.rtt is not None and 0 < result.rtt < 3


def test_without_the_device_s_mtu_no_full_size_probe_is_sent_nor_judged(
        responder: tuple[selectors.BaseSelector, Responder]) -> None:
    """The MTU could not be read (the device being re-created): the peer is not taken for one that loses
    full-size packets."""
    sel, r = responder
    result = probe_once(sel, r, r.port, mtu=0)
    assert (result.tcp, result.udp, result.full_size, result.outcome) == ("ok", True, None, OK)


def test_a_peer_without_a_responder_resets_the_probe() -> None:
    sel = selectors.DefaultSelector()
    result = probe_once(sel, None, free_port(), timeout=1.0)
    assert (result.tcp, result.udp, result.outcome) == ("refused", False, NO_RESPONDER)
    assert result.rtt is not None
    sel.close()


def udp_exchange(port: int, data: bytes, wait: float = 0.3) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(wait)
        s.sendto(data, ("127.0.0.1", port))
        try:
            return s.recv(65536)
        except TimeoutError:
            return None


def test_the_responder_answers_only_probes_and_never_with_more_than_it_got(
        responder: tuple[selectors.BaseSelector, Responder]) -> None:
    sel, r = responder
    answers: list[bytes | None] = []
    probes = [b"GET / HTTP/1.0\r\n\r\n", b"x" * 100, probe.MAGIC, probe.MAGIC + b"12345678",
              probe.MAGIC + b"12345678" + b"\0" * 1400, probe.MAGIC + b"\0" * (probe.MAX_DATAGRAM + 1)]
    for data in probes:
        import threading

        t = threading.Thread(target=lambda d=data: answers.append(udp_exchange(r.port, d)))
        t.start()
        pump(sel, r, lambda: not t.is_alive(), 2)
        t.join()
    assert answers == [None, None, None, probes[3], probes[4], None]
    # TCP: a connection that sends no probe is closed unanswered; a probe is echoed, at most TCP_MAX bytes
    for data, echo in ((b"hello there, who are you?", b""), (probe.MAGIC + b"abcdefgh", probe.MAGIC + b"abcdefgh"),
                       (probe.MAGIC + b"z" * 200, (probe.MAGIC + b"z" * 200)[:probe.TCP_MAX])):
        c = socket.create_connection(("127.0.0.1", r.port), timeout=2)
        c.sendall(data)
        c.setblocking(False)
        got = bytearray()

        def closed() -> bool:
            try:
                chunk = c.recv(4096)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True
            got.extend(chunk)
            return not chunk

        pump(sel, r, closed, 3)
        c.close()
        assert bytes(got) == echo


def test_the_responder_ignores_addresses_outside_the_network() -> None:
    sel = selectors.DefaultSelector()
    r = Responder(sel, loopback_path(network="10.0.0.0/8"), free_port())
    r.open()
    try:
        result = probe_once(sel, r, r.port, timeout=1.0)
        assert (result.udp, result.full_size) == (False, False)
        assert result.tcp == "closed without an echo"
    finally:
        r.close()
        sel.close()


def test_a_flood_gets_at_most_the_rate_limit_of_answers(responder: tuple[selectors.BaseSelector, Responder]) -> None:
    sel, r = responder
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    started = time.monotonic()
    sent = 0
    for i in range(600):  # as fast as it goes: far beyond the rate
        try:
            client.sendto(probe.MAGIC + i.to_bytes(8, "big"), ("127.0.0.1", r.port))
            sent += 1
        except BlockingIOError:
            pass
        if i % 50 == 0:
            pump(sel, r, lambda: False, 0.01)
    pump(sel, r, lambda: False, 0.5)
    elapsed = time.monotonic() - started
    answers = 0
    while True:
        try:
            client.recv(100)
            answers += 1
        except BlockingIOError:
            break
    assert sent > 300
    assert 0 < answers <= probe.UDP_BURST + probe.UDP_RATE * elapsed + 1
    client.close()
    pump(sel, r, lambda: False, 1.5)  # the backlog is read, the bucket refills: probes are answered again
    assert probe_once(sel, r, r.port).outcome == OK


def test_stuck_connections_do_not_keep_probes_out(responder: tuple[selectors.BaseSelector, Responder]) -> None:
    sel, r = responder
    stuck = []
    for _ in range(probe.MAX_CONNECTIONS * 2):
        stuck.append(socket.create_connection(("127.0.0.1", r.port), timeout=2))
        pump(sel, r, lambda: False, 0.01)
    try:
        assert probe_once(sel, r, r.port).outcome == OK
        assert len(r._conns) <= probe.MAX_CONNECTIONS
    finally:
        for s in stuck:
            s.close()


# -- the prober's bookkeeping against synthetic results ------------------------------------------------------


def result(name: str, outcome: str, rtt: float = 0.0004) -> Result:
    tcp, udp, full = {OK: ("ok", True, True), UNREACHABLE: ("timeout", False, False), TCP: ("timeout", True, True),
                      FULL_SIZE: ("ok", True, False), NO_RESPONDER: ("refused", False, False)}[outcome]
    return Result(name, "10.244.0.0", "192.168.0.1", time.time(), tcp=tcp, rtt=rtt if tcp != "timeout" else None,
                  udp=udp, full_size=full, size=1450)


@pytest.fixture
def registry() -> Iterator[Any]:
    reg = metrics.enable("test")
    yield reg
    metrics.disable()


def test_the_rotation_covers_every_peer_and_retries_failing_ones_first() -> None:
    peers = FakePeers(20)
    p = loopback_path(peers)
    prober = Prober([p], 8473, 30.0, "on")
    state = prober._states[IPV4]
    seen: set[str] = set()
    for _ in range(3):  # ceil(20 / 8) rounds
        names = [t[0] for t in prober._sample(p, state)]
        assert len(names) == 8 == len(set(names))
        seen |= set(names)
    assert seen == set(peers.applied)
    targets = prober._sample(p, state)
    assert targets[0][1:] == ("10.0.%d.0" % int(targets[0][0][3:]), peers.applied[targets[0][0]].public_ip)
    assert len(peers.applied) == 20
    failing = ["k8s%04d" % i for i in range(2, 8)]
    for name in failing:
        state.problems[name] = probe.Problem(UNREACHABLE, "", 0.0, count=1)
    del peers.applied["k8s0002"]  # its node went: forgotten
    names = [t[0] for t in prober._sample(p, state)]
    assert names[:4] == failing[1:5] and len(names) == 8 and "k8s0002" not in state.problems
    names = [t[0] for t in prober._sample(p, state)]
    assert names[:4] == [failing[5], *failing[1:4]]  # the others' turn first


def test_small_clusters_probe_every_peer_every_round() -> None:
    peers = FakePeers(2)
    p = loopback_path(peers)
    prober = Prober([p], 8473, 30.0, "on")
    for _ in range(3):
        assert sorted(t[0] for t in prober._sample(p, prober._states[IPV4])) == ["k8s0002", "k8s0003"]
    peers.applied.clear()
    assert prober._sample(p, prober._states[IPV4]) == []


def test_a_problem_is_said_once_confirmed_and_its_end_once(caplog: pytest.LogCaptureFixture, registry: Any) -> None:
    caplog.set_level(logging.INFO, logger="pyflannel")
    p = loopback_path(FakePeers(3))
    prober = Prober([p], 8473, 30.0, "on")

    def rnd(*results: Result) -> list[str]:
        caplog.clear()
        prober._finish([(p, list(results))])
        return [r.getMessage() for r in caplog.records]

    assert rnd(result("k8s0002", UNREACHABLE), result("k8s0003", OK)) == []
    assert registry.get_sample_value("pyflannel_probe_peers_unreachable", {"family": "IPv4"}) == 0
    lines = rnd(result("k8s0002", UNREACHABLE))
    assert len(lines) == 1 and lines[0].startswith(
        "IPv4 peer k8s0002 (10.244.0.0, via 192.168.0.1) is unreachable through lo: no answer to TCP or UDP probes "
        "(2 rounds in a row); pods here cannot reach its pods; fix: host-gw needs")
    assert registry.get_sample_value("pyflannel_probe_peers_unreachable", {"family": "IPv4"}) == 1
    assert rnd(result("k8s0002", UNREACHABLE)) == []
    assert rnd(result("k8s0002", OK, rtt=0.0012)) == [
        "IPv4 peer k8s0002 (10.244.0.0) is reachable again through lo (round trip 1.20 ms)"]
    assert registry.get_sample_value("pyflannel_probe_peers_unreachable", {"family": "IPv4"}) == 0
    assert registry.get_sample_value("pyflannel_probes_total", {"family": "IPv4", "protocol": "tcp"}) == 5
    assert registry.get_sample_value("pyflannel_probe_failures_total", {"family": "IPv4", "protocol": "udp"}) == 3
    assert registry.get_sample_value("pyflannel_probe_rtt_seconds_count", {"family": "IPv4"}) == 2
    # full-size losses: one line for every peer that shows them, one when none does
    assert rnd(result("k8s0002", FULL_SIZE), result("k8s0003", FULL_SIZE)) == []
    lines = rnd(result("k8s0002", FULL_SIZE), result("k8s0003", FULL_SIZE))
    assert lines == ["IPv4 full-size packets (1450 bytes, DF) through lo are lost while small ones pass, to k8s0002, "
                     "k8s0003: the network between the nodes carries less than lo's MTU; fix: lower lo's MTU to what "
                     "the network carries, on every node, then restart pyflannel and recreate the pods"]
    assert registry.get_sample_value("pyflannel_probe_peers_degraded", {"family": "IPv4", "problem": "full_size"}) == 2
    assert rnd(result("k8s0002", OK)) == []
    assert rnd(result("k8s0003", NO_RESPONDER)) == ["IPv4 full-size probes through lo pass again"]
    # a peer without a responder is reachable, and its unanswered datagrams are no failures
    assert registry.get_sample_value("pyflannel_probe_failures_total", {"family": "IPv4", "protocol": "udp"}) == 3
    report = json.loads(prober.report())
    fam = report["families"][0]
    assert (fam["family"], fam["peers"], fam["problems"]) == ("IPv4", 3, [])
    assert [r["outcome"] for r in fam["recent"]][-2:] == [OK, NO_RESPONDER]


def test_the_state_kept_does_not_grow_with_the_cluster() -> None:
    peers = FakePeers(5000)
    p = loopback_path(peers)
    prober = Prober([p], 8473, 30.0, "on")
    state = prober._states[IPV4]
    for _ in range(700):  # a whole cycle and more
        prober._finish([(p, [result(t[0], OK) for t in prober._sample(p, state)])])
    assert not state.problems and len(state.recent) == probe.RECENT
    assert len(state.queue) < 5000


def test_checksum_errors_with_traffic_are_said_once_with_the_fix(tmp_path: FsPath, caplog: pytest.LogCaptureFixture,
                                                                  registry: Any) -> None:
    caplog.set_level(logging.INFO, logger="pyflannel")
    (tmp_path / "net").mkdir()
    vx = Path(IPV4, FakePeers(1), "10.244.1.0", IPv4Network("10.244.0.0/16"), "flannel.42", vxlan=True,
              tunnel_port=8472, on_lo=False)
    prober = Prober([vx], 8473, 30.0, "auto", proc=str(tmp_path))  # no flannel.42 here: its offload is unknown

    def interval(errors: int, packets: int) -> list[str]:
        (tmp_path / "net/snmp").write_text("Udp: InDatagrams InCsumErrors\nUdp: 1 %d\n" % errors)
        (tmp_path / "net/dev").write_text("flannel.42: 0 %d 0 0 0 0 0 0 0 %d 0 0 0 0 0 0\n" % (packets, packets))
        caplog.clear()
        prober._finish([])
        return [r.getMessage() for r in caplog.records]

    assert interval(0, 0) == [] and interval(4, 10) == []
    lines = interval(9, 20)
    assert lines == ["the kernel counted 9 UDP checksum errors (Udp InCsumErrors) in the last 2 rounds while "
                     "flannel.42 carried traffic: the VXLAN checksum-offload bug (pings work, TCP stalls); fix: ethtool "
                     "-K flannel.42 tx-checksum-ip-generic off on every node, or --vxlan-checksum-offload=auto (turns it "
                     "off when this is seen) or off"]
    assert registry.get_sample_value("pyflannel_vxlan_checksum_bug") == 1
    assert interval(12, 30) == []
    assert interval(12, 40) == ["The VXLAN checksum errors are no longer seen"]
    assert registry.get_sample_value("pyflannel_vxlan_checksum_bug") == 0
    # TCP failing while UDP passes through the VXLAN device is the bug too
    prober._finish([(vx, [result("k8s0002", TCP)])])
    caplog.clear()
    prober._finish([(vx, [result("k8s0002", TCP)])])
    assert [r.getMessage() for r in caplog.records][0].startswith(
        "IPv4 TCP probes through flannel.42 fail while UDP passes, to k8s0002: the VXLAN checksum-offload bug")
    assert json.loads(prober.report())["checksum_offload"]["bug"].startswith("IPv4 TCP probes through flannel.42")


# -- pyflannel check's rendering ------------------------------------------------------------------------------


def test_check_prints_each_peer_and_each_problem_with_its_fix() -> None:
    p = loopback_path(FakePeers(4))
    prober = Prober([p], 8473, 30.0, "on")
    for _ in range(2):
        prober._finish([(p, [result("k8s0002", OK), result("k8s0003", UNREACHABLE), result("k8s0004", NO_RESPONDER)])])
    prober._finish([(p, [result("k8s0005", UNREACHABLE)])])
    out = io.StringIO()
    assert check.show(json.loads(prober.report()), out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Datapath probes of pyflannel on this node: every 30 s up to 8 peers per family")
    assert lines[1].startswith("ok    IPv4 through lo from 127.0.0.1: 4 peers programmed, last round 0 s ago; every "
                               "peer is probed within 1 round (30 s)")
    assert lines[2].startswith("ok    IPv4 k8s0002 10.244.0.0 (via 192.168.0.1): TCP 0.40 ms, UDP, full size 1450 bytes")
    assert lines[3] == ("FAIL  IPv4 peer k8s0003 (10.0.3.0, via 192.168.0.1) is unreachable through lo: no answer to "
                        "TCP or UDP probes")
    assert lines[4].startswith("      2 rounds in a row, the first ") and lines[4].endswith(
        ": TCP timeout, UDP lost, full size lost")
    assert lines[5] == "      Pods on this node cannot reach the pods of k8s0003."
    assert lines[6].startswith("      fix: host-gw needs the network between the nodes to carry pod addresses")
    assert lines[7].startswith("ok    IPv4 k8s0004 10.244.0.0 (via 192.168.0.1): reachable (the reset of the TCP probe")
    assert lines[8].startswith("warn  IPv4 k8s0005 (10.0.5.0, via 192.168.0.1): TCP timeout, UDP lost, full size "
                               "lost, 1 round so far")


def test_check_without_a_daemon_says_why_and_runs_the_node_checks(tmp_path: FsPath) -> None:
    out = io.StringIO()
    env = {"NODE_NAME": "k8s01"}
    argv = ["--kube-subnet-mgr", "--kube-api-url=http://127.0.0.1:1", "--net-config-path=%s" % (tmp_path / "none"),
            "--subnet-file=%s" % (tmp_path / "subnet.env")]
    assert check.main(argv, env, out=out) == 1
    text = out.getvalue()
    assert text.startswith("FAIL  no datapath probe results: pyflannel serves its probe results on its health port: "
                           "give check the DaemonSet's --healthz-port\n")
    assert "\nNode checks (pyflannel diagnose):\n" in text and "problems found" in text
    out = io.StringIO()
    check.main(argv + ["--healthz-port=%d" % free_port()], env, out=out)
    assert out.getvalue().startswith("FAIL  no datapath probe results: pyflannel does not answer on 127.0.0.1 port ")
    with pytest.raises(check.Unanswered, match=r"off \(--datapath-probe-port=0\)"):
        check.fetch(flags.parse(["--datapath-probe-port=0"], {}))


@needs_netns
@pytest.mark.netns
def test_the_probe_address_is_put_on_lo_and_back_when_removed() -> None:
    """host-gw (and IPv6): the probe address is added to lo before the node is ready, and again at the
    next round after someone removed it."""
    ns = "pfprobe-" + secrets.token_hex(3)
    script = """
import logging, selectors, subprocess
logging.basicConfig(level=logging.INFO)
from ipaddress import IPv4Network
from types import SimpleNamespace
from pyflannel.family import IPV4
from pyflannel.probe import Path, Prober, is_local
p = Path(IPV4, SimpleNamespace(device_ok=True, applied={}), "10.244.1.0", IPv4Network("10.244.0.0/16"), "eth1",
         vxlan=False, tunnel_port=0, on_lo=True)
prober = Prober([p], 8473, 30.0, "on")
print(is_local("10.244.1.0", IPV4.af))
subprocess.run(["ip", "addr", "del", "10.244.1.0/32", "dev", "lo"], check=True)
print(is_local("10.244.1.0", IPV4.af))
prober._begin(selectors.DefaultSelector())
print(is_local("10.244.1.0", IPV4.af))
"""
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
        assert res.stdout.split() == ["True", "False", "True"], res.stdout + res.stderr
        assert "Added the datapath probe address 10.244.1.0/32 to lo again" in res.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns])
