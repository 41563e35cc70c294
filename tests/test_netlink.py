"""The rtnetlink socket and the deletion monitor, against a real kernel in a namespace."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_netns

pytestmark = [needs_netns, pytest.mark.netns]
REPO = Path(__file__).resolve().parent.parent

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
seen = []
stop = threading.Event()
def report(found):
    seen.extend(found)
    if len(seen) >= 3:
        stop.set()
t = threading.Thread(target=mon.run, args=(stop, report))
t.start()
sh("ip route del 10.244.2.0/24")
sh("ip neigh del 10.244.2.0 dev flannel.1")
sh("bridge fdb del %s dev flannel.1 dst 192.168.56.12" % mac)
sh("ip neigh add 192.168.56.99 lladdr 0a:00:00:00:00:99 dev eth1")
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


def test_batch_dumps_and_deletion_monitor(netns: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE], capture_output=True, text=True,
                         cwd=REPO, timeout=30)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["link"] is True
    assert out["codes"][:3] == [0, 0, 0] and out["codes"][3] != 0  # a route through a missing link fails alone
    assert out["routes"] == ["10.244.2.0/24"]
    assert out["fdb"] == [["0a:00:00:00:00:02", "192.168.56.12"]]
    idx = None
    kinds = {}
    for kind, where, what in out["seen"]:
        kinds[kind] = (where, what)
        if kind != "route":
            idx = where
    assert kinds["route"] == (254, "10.244.2.0/24")
    assert kinds["neigh"] == (idx, "10.244.2.0")
    assert kinds["fdb"] == (idx, "0a:00:00:00:00:02 192.168.56.12")
