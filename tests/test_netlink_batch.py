"""Batches of netlink requests: only failures and each chunk's end are acknowledged, yet every
request's outcome is known. Against a real kernel in a namespace."""

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
import json, socket, subprocess
from pyflannel.netlink import Netlink
from pyflannel.backend.vxlan import AF_BRIDGE, _neigh, _route

def sh(cmd):
    subprocess.run(cmd.split(), check=True)

sh("ip link set lo up")
sh("ip link add flannel.1 type vxlan id 1 dstport 8472 nolearning")
sh("ip link set flannel.1 up")
nl = Netlink()
idx = nl.link(name="flannel.1")["index"]
requests, failing = [], set()
for i in range(1, 1201):  # 3,600 requests: several 64 KiB chunks
    gw, mac = "10.%d.%d.0" % (i >> 8, i & 255), "0a:00:00:00:%02x:%02x" % (i >> 8, i & 255)
    requests.append(_neigh(28, socket.AF_INET, idx, gw, mac))
    requests.append(_neigh(28, AF_BRIDGE, idx, "192.168.%d.%d" % (i >> 8, i & 255), mac))
    if i % 97 == 0 or i == 1200:  # a route through a missing link, now and then and last
        failing.add(len(requests))
        requests.append(_route(24, gw + "/24", gw, 999999))
    else:
        requests.append(_route(24, gw + "/24", gw, idx))
codes = nl.batch(requests)
again = nl.batch(requests[:3])
routes = [r for r in nl.routes() if r.oif == idx]
print(json.dumps({"failed": sorted(i for i, c in enumerate(codes) if c), "failing": sorted(failing),
                  "again": again, "routes": len(routes), "neigh": len(nl.neighbours(socket.AF_INET, idx))}))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    ns = "pfnb" + secrets.token_hex(2)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_batch_reports_each_failure_across_chunks(netns: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["failed"] == out["failing"]
    assert out["again"] == [0, 0, 0]  # a later batch on the same socket reads only its own answers
    assert out["routes"] == 1200 - len(out["failing"])
    assert out["neigh"] == 1200
