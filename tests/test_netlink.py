"""The rtnetlink socket and the deletion monitor: against a real kernel in a namespace, and (dump
retries, pyroute2's message classes) without one."""

from __future__ import annotations

import json
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyflannel._pyroute2 import ifinfmsg, ndmsg, rtmsg
from pyflannel.netlink import (AF_BRIDGE, DUMP_ATTEMPTS, NLM_F_DUMP_INTR, NLM_F_MULTI, NLMSG_DONE, RTM_DELNEIGH,
                               RTM_DELROUTE, RTM_NEWNEIGH, RTM_NEWROUTE, DumpInterrupted, Netlink, Route, deletions,
                               neighbour_request, parse_neighbour, parse_route, route_request)
from tests.conftest import needs_netns

REPO = Path(__file__).resolve().parent.parent
HEADER = struct.Struct("=IHHII")


class DumpSocket:
    """A NETLINK_ROUTE socket double that answers each route dump from a script: the answers'
    routes, and whether the kernel marked the answer interrupted."""

    def __init__(self, answers: list[tuple[list[int], bool]]) -> None:
        self.answers = answers
        self.sent = 0
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        seq = HEADER.unpack_from(data)[3]
        nets, interrupted = self.answers[min(self.sent, len(self.answers) - 1)]
        self.sent += 1
        flags = NLM_F_MULTI | (NLM_F_DUMP_INTR if interrupted else 0)
        chunk = b""
        for n in nets:
            body = route_request(RTM_NEWROUTE, 0, "10.244.%d.0" % n, 24, "10.244.%d.0" % n, 3, 254, 3, 0, 1, 4).body
            chunk += HEADER.pack(HEADER.size + len(body), RTM_NEWROUTE, flags, seq, 0) + body
        # The kernel marks the messages built after the change, and the dump's end.
        self.pending = [chunk, HEADER.pack(HEADER.size + 4, NLMSG_DONE, flags, seq, 0) + b"\0" * 4]
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.pending.pop(0)


def test_an_interrupted_dump_is_read_again() -> None:
    sock = DumpSocket([([2, 3, 9], True), ([2, 3], False)])
    nl = Netlink(sock)
    assert [r.dst for r in nl.routes()] == ["10.244.2.0/24", "10.244.3.0/24"]
    assert sock.sent == 2


def test_a_dump_interrupted_every_time_is_an_error() -> None:
    sock = DumpSocket([([2], True)])
    with pytest.raises(DumpInterrupted):
        Netlink(sock).routes()
    assert sock.sent == DUMP_ATTEMPTS


def test_pyroute2_message_classes_load_without_the_package_and_round_trip() -> None:
    """_pyroute2 enters pyroute2 as a hollow package: the four classes, no IPRoute, no asyncio."""
    code = (
        "import json, sys\n"
        "from pyflannel import _pyroute2\n"
        "import pyroute2\n"
        "print(json.dumps({'classes': [c.__name__ for c in (_pyroute2.ifaddrmsg, _pyroute2.ifinfmsg, _pyroute2.ndmsg,"
        " _pyroute2.rtmsg)], 'iproute': hasattr(pyroute2, 'IPRoute') or 'pyroute2.iproute' in sys.modules,"
        " 'asyncio': 'asyncio' in sys.modules}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"classes": ["ifaddrmsg", "ifinfmsg", "ndmsg", "rtmsg"], "iproute": False,
                                      "asyncio": False}

    msg = ifinfmsg()
    msg["index"] = 7
    msg["attrs"] = [("IFLA_IFNAME", "flannel.1"), ("IFLA_TXQLEN", 0), ("IFLA_ADDRESS", "0a:00:00:00:00:01"),
                    ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "vxlan"), ("IFLA_INFO_DATA", {"attrs": [
                        ("IFLA_VXLAN_ID", 1), ("IFLA_VXLAN_LOCAL", "192.168.56.11"), ("IFLA_VXLAN_PORT", 8472)]})]})]
    msg.encode()
    back = ifinfmsg(bytes(msg.data))
    back.decode()
    info = back.get_attr("IFLA_LINKINFO")
    assert (back["index"], back.get_attr("IFLA_IFNAME"), back.get_attr("IFLA_TXQLEN"), back.get_attr("IFLA_ADDRESS"),
            info.get_attr("IFLA_INFO_KIND")) == (7, "flannel.1", 0, "0a:00:00:00:00:01", "vxlan")
    assert dict(info.get_attr("IFLA_INFO_DATA")["attrs"]) == {"IFLA_VXLAN_ID": 1, "IFLA_VXLAN_LOCAL": "192.168.56.11",
                                                              "IFLA_VXLAN_PORT": 8472}
    # The messages packed by hand read back the same through pyroute2's decoders.
    for cls, packed, want in (
        (ndmsg, neighbour_request(RTM_NEWNEIGH, 0, AF_BRIDGE, 7, 0x80, 2, "192.168.56.12", "0a:00:00:00:00:02"),
         {"NDA_DST": "192.168.56.12", "NDA_LLADDR": "0a:00:00:00:00:02"}),
        (ndmsg, neighbour_request(RTM_NEWNEIGH, 0, socket.AF_INET6, 7, 0x80, 0, "fd00:10:244:1::", "0a:00:00:00:00:02"),
         {"NDA_DST": "fd00:10:244:1::", "NDA_LLADDR": "0a:00:00:00:00:02"}),
        (ndmsg, neighbour_request(RTM_NEWNEIGH, 0, AF_BRIDGE, 7, 0x80, 2, "fd56::12", "0a:00:00:00:00:02"),
         {"NDA_DST": "fd56::12", "NDA_LLADDR": "0a:00:00:00:00:02"}),
        (rtmsg, route_request(RTM_NEWROUTE, 0, "fd00:10:244:1::", 64, "fd00:10:244:1::", 7, 254, 3, 0, 1, 4),
         {"RTA_DST": "fd00:10:244:1::", "RTA_GATEWAY": "fd00:10:244:1::", "RTA_OIF": 7}),
        (rtmsg, route_request(RTM_NEWROUTE, 0, "10.244.2.0", 24, "10.244.2.0", 7, 254, 3, 0, 1, 4),
         {"RTA_DST": "10.244.2.0", "RTA_GATEWAY": "10.244.2.0", "RTA_OIF": 7}),
    ):
        raw = cls(HEADER.pack(HEADER.size + len(packed.body), packed.msg_type, 0, 1, 0) + packed.body)
        raw.decode()
        assert {key: raw.get_attr(key) for key in want} == want
        # ... and through netlink's own parsers, which the dumps and the monitor use
        if cls is ndmsg:
            n = parse_neighbour(packed.body, 0, len(packed.body))
            assert (n.dst, n.lladdr) == (want["NDA_DST"], want["NDA_LLADDR"])
        else:
            r = parse_route(packed.body, 0, len(packed.body))
            assert (r.dst.split("/")[0], r.gateway, r.oif) == (want["RTA_DST"], want["RTA_GATEWAY"], want["RTA_OIF"])
    assert raw["dst_len"] == 24 and raw["flags"] == 4
    body = route_request(RTM_NEWROUTE, 0, "fd00:10:244:1::", 64, None, None, 254, 3, 0, 1, 0).body
    assert parse_route(body, 0, len(body)) == Route("fd00:10:244:1::/64", None, 0, 3, 254)

def test_deletions_of_a_family_are_reported_only_when_it_is_listened_to() -> None:
    """An IPv4-only daemon's monitor leaves the IPv6 neighbour and route deletions aside (a busy IPv6
    node's neighbour discovery is no news to it); the FDB entries, of either remote family, count."""
    buf = b""
    for packed in (neighbour_request(RTM_DELNEIGH, 0, socket.AF_INET6, 7, 0x80, 0, "fd00:10:244:1::", None),
                   route_request(RTM_DELROUTE, 0, "fd00:10:244:1::", 64, "fd00:10:244:1::", 7, 254, 3, 0, 1, 4),
                   neighbour_request(RTM_DELNEIGH, 0, AF_BRIDGE, 7, 0x80, 2, "fd56::12", "0a:00:00:00:00:02"),
                   route_request(RTM_DELROUTE, 0, "10.244.2.0", 24, "10.244.2.0", 5, 254, 3, 0, 1, 4)):
        buf += HEADER.pack(HEADER.size + len(packed.body), packed.msg_type, 0, 0, 0) + packed.body
    fdb, v4 = ("fdb", 7, "0a:00:00:00:00:02 fd56::12"), ("route", 254, "10.244.2.0/24")
    assert deletions(buf) == [fdb, v4]
    assert deletions(buf, frozenset((socket.AF_INET, socket.AF_INET6))) == [
        ("neigh", 7, "fd00:10:244:1::"), ("route", 254, "fd00:10:244:1::/64"), fdb, v4]


PROBE = r"""
import errno, json, socket, subprocess, threading
from pyflannel.netlink import Monitor, Netlink
from pyflannel.backend.vxlan import AF_BRIDGE, _neigh, _route

def sh(cmd):
    subprocess.run(cmd.split(), check=True)

sh("ip link add eth1 type veth peer name eth1p")
sh("ip addr add 192.168.56.11/24 dev eth1")
sh("ip link set eth1 up")
sh("ip link add flannel.1 type vxlan id 1 local 192.168.56.11 dev eth1 nolearning")
sh("ip link set flannel.1 up")
sh("ip addr add 10.244.1.0/32 dev flannel.1")
nl = Netlink()
idx = nl.link(name="flannel.1")["index"]
out = {"link": nl.link(name="nope") is None}
mac = "0a:00:00:00:00:02"
codes = nl.batch([
    _neigh(28, socket.AF_INET, idx, "10.244.2.0", mac),
    _neigh(28, AF_BRIDGE, idx, "192.168.56.12", mac),
    _route(24, "10.244.2.0/24", "10.244.2.0", idx),
    _route(24, "10.244.3.0/24", "10.244.3.0", 999),
])
out["codes"] = codes
out["routes"] = sorted(r.dst for r in nl.routes() if r.oif == idx)
out["fdb"] = [(n.lladdr, n.dst) for n in nl.neighbours(AF_BRIDGE, idx)]
mon = Monitor()
out["rcvbuf"] = mon.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
seen = []
stop = threading.Event()
def report(found):
    seen.extend(found)
    if any(kind == "link" for kind, _, _ in seen):
        stop.set()
t = threading.Thread(target=mon.run, args=(stop, report))
t.start()
sh("ip route del 10.244.2.0/24")
sh("ip neigh del 10.244.2.0 dev flannel.1")
sh("bridge fdb del %s dev flannel.1 dst 192.168.56.12" % mac)
sh("ip neigh add 192.168.56.99 lladdr 0a:00:00:00:00:99 dev eth1")
sh("ip addr del 10.244.1.0/32 dev flannel.1")
sh("ip link set flannel.1 down")
sh("ip link del flannel.1")
t.join(10)
out["seen"] = seen
print(json.dumps(out))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    ns = "pfnl" + secrets.token_hex(2)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns])


@needs_netns
@pytest.mark.netns
def test_batch_dumps_and_deletion_monitor(netns: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE], capture_output=True, text=True,
                         cwd=REPO, timeout=30)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["link"] is True
    assert out["codes"][:3] == [0, 0, 0] and out["codes"][3] != 0  # a route through a missing link fails alone
    assert out["routes"] == ["10.244.2.0/24"]
    assert out["fdb"] == [["0a:00:00:00:00:02", "192.168.56.12"]]
    assert out["rcvbuf"] == 2 * (1 << 22)  # SO_RCVBUFFORCE: not capped by rmem_max (the kernel doubles it)
    seen = [tuple(d) for d in out["seen"]]
    idx = [where for kind, where, what in seen if kind == "link"][0]
    assert ("route", 254, "10.244.2.0/24") in seen
    assert ("neigh", idx, "10.244.2.0") in seen
    assert ("fdb", idx, "0a:00:00:00:00:02 192.168.56.12") in seen
    assert ("neigh", idx, "192.168.56.99") not in seen  # an addition is no news
    assert ("addr", idx, "10.244.1.0/32") in seen
    assert seen.index(("down", idx, "flannel.1")) < seen.index(("link", idx, "flannel.1"))
    assert not [d for d in seen if d[0] == "down" and d[2] == "eth1"]  # eth1 stayed up


PROBE6 = r"""
import json, socket, subprocess, threading
from pyflannel.netlink import AF_BRIDGE, Monitor, Netlink
from pyflannel.backend.vxlan import _neigh, _route

def sh(cmd):
    subprocess.run(cmd.split(), check=True)

sh("sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0")
sh("ip link add eth1 type veth peer name eth1p")
sh("ip addr add fd56::11/64 dev eth1")
sh("ip link set eth1 up")
sh("ip link set eth1p up")
sh("ip link add flannel-v6.1 type vxlan id 1 local fd56::11 dev eth1 nolearning")
sh("ip link set flannel-v6.1 up")
sh("ip addr add fd00:10:244::/128 dev flannel-v6.1")
nl = Netlink()
idx = nl.link(name="flannel-v6.1")["index"]
mac = "0a:00:00:00:00:02"
out = {"codes": nl.batch([
    _neigh(28, socket.AF_INET6, idx, "fd00:10:244:1::", mac),
    _neigh(28, AF_BRIDGE, idx, "fd56::12", mac),
    _route(24, "fd00:10:244:1::/64", "fd00:10:244:1::", idx),
])}
out["routes"] = sorted([r.dst, r.gateway, r.proto] for r in nl.routes(family=socket.AF_INET6) if r.oif == idx)
out["neigh"] = [[n.dst, n.lladdr] for n in nl.neighbours(socket.AF_INET6, idx) if n.state & 0x80]
out["fdb"] = [[n.lladdr, n.dst] for n in nl.neighbours(AF_BRIDGE, idx)]
out["addrs"] = sorted("%s/%d" % (m.get_attr("IFA_ADDRESS"), m["prefixlen"])
                      for m in nl.addresses(idx, socket.AF_INET6))
out["get"] = [m.get_attr("RTA_GATEWAY") for m in nl.route_get("fd56::12")]
out["ip6"] = subprocess.run("ip -6 route show dev flannel-v6.1".split(), capture_output=True, text=True).stdout
mon = Monitor(families=(socket.AF_INET, socket.AF_INET6))
seen = []
stop = threading.Event()
def report(found):
    seen.extend(found)
    if any(kind == "link" for kind, _, _ in seen):
        stop.set()
t = threading.Thread(target=mon.run, args=(stop, report))
t.start()
sh("ip -6 route del fd00:10:244:1::/64 dev flannel-v6.1")
sh("ip -6 neigh del fd00:10:244:1:: dev flannel-v6.1")
sh("bridge fdb del %s dev flannel-v6.1 dst fd56::12" % mac)
sh("ip addr del fd00:10:244::/128 dev flannel-v6.1")
sh("ip link del flannel-v6.1")
t.join(10)
out["seen"] = seen
print(json.dumps(out))
"""


@needs_netns
@pytest.mark.netns
def test_ipv6_entries_dumps_and_deletions(netns: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE6], capture_output=True, text=True,
                         cwd=REPO, timeout=30)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["codes"] == [0, 0, 0]
    assert ["fd00:10:244:1::/64", "fd00:10:244:1::", 3] in out["routes"]
    assert "fd00:10:244:1::/64 via fd00:10:244:1:: metric 1024 onlink pref medium" in out["ip6"]  # as flanneld's (§10)
    assert out["neigh"] == [["fd00:10:244:1::", "0a:00:00:00:00:02"]]
    assert out["fdb"] == [["0a:00:00:00:00:02", "fd56::12"]]
    assert "fd00:10:244::/128" in out["addrs"]
    assert out["get"] == [None]  # directly connected
    seen = [tuple(d) for d in out["seen"]]
    idx = [where for kind, where, what in seen if kind == "link"][0]
    assert ("route", 254, "fd00:10:244:1::/64") in seen
    assert ("neigh", idx, "fd00:10:244:1::") in seen
    assert ("fdb", idx, "0a:00:00:00:00:02 fd56::12") in seen
    assert ("addr", idx, "fd00:10:244::/128") in seen


OVERRUN = r"""
import json, subprocess, threading
from ipaddress import IPv4Address, IPv4Network
from pyflannel import ip
from pyflannel.backend.vxlan import VXLANNetwork, backend_data
from pyflannel.config import VXLANConfig
from pyflannel.family import IPV4
from pyflannel.lease import Lease
from pyflannel.netlink import Monitor, Netlink

def sh(cmd):
    subprocess.run(cmd.split(), check=True)

sh("ip link add eth1 type veth peer name eth1p")
sh("ip addr add 192.168.56.11/24 dev eth1")
sh("ip link set eth1 up")
nl = Netlink()
backend = VXLANNetwork(nl, VXLANConfig(), IPV4, ip.select(nl, ["eth1"], [], "", ""), IPv4Network("10.0.0.0/8"))
backend.create_device()
backend.configure_device(IPv4Network("10.0.0.0/24"))
N = 1000
leases = {"n%d" % i: Lease(IPv4Network("10.%d.%d.0/24" % (i // 256, i % 256)), IPv4Address("192.168.%d.%d" % (i // 256, i % 256)),
                           "vxlan", backend_data(1, "0a:00:00:00:%02x:%02x" % (i // 256, i % 256))) for i in range(1, N + 1)}
backend.reconcile(leases)
mon = Monitor(rcvbuf=4096)  # the kernel's minimum: a few notifications fill it
sh("ip route flush dev flannel.1")
sh("ip neigh flush dev flannel.1 nud permanent")
reports = []
stop = threading.Event()
def report(found):
    reports.append(found)
    stop.set()
mon.run(stop, report)  # the first read finds the buffer overrun
restored = backend.restore(reports[0])
print(json.dumps({"first": reports[0], "restored": restored, "routes": len(nl.routes()),
                  "neigh": len(nl.neighbours(2, backend.device.index)), "n": N}))
"""


@needs_netns
@pytest.mark.netns
def test_an_overrun_monitor_reports_and_the_backend_compares_everything(netns: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", OVERRUN], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["first"] == []  # ENOBUFS: the notifications were lost, compare everything
    assert out["restored"] == out["n"]  # every node's route and neighbour, found by the full comparison
    assert out["neigh"] == out["n"] and out["routes"] >= out["n"]
