"""Interface selection, in a network namespace with real links, addresses and routes."""

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

PROBE = """
import json, sys
from pyflannel import ip
from pyflannel.family import FAMILIES
from pyflannel.netlink import Netlink
args = json.loads(sys.argv[1])
families = [f for f in FAMILIES if f.name in args["families"]]
try:
    e = ip.select(Netlink(), args["iface"], args["regex"], args["reach"], args["public"], args["public6"], families)
    if [f.name for f in e.addrs] == ["IPv4"]:
        print(json.dumps({"name": e.name, "mtu": e.mtu, "iface": str(e.iface_addr), "ext": str(e.ext_addr)}))
    else:
        print(json.dumps({"name": e.name, "mtu": e.mtu,
                          "addrs": {f.name: [str(a.iface_addr), str(a.ext_addr)] for f, a in e.addrs.items()}}))
except ip.InterfaceError as exc:
    print(json.dumps({"error": str(exc)}))
"""


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    ns = "pfip" + secrets.token_hex(2)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (
            "ip link set lo up",
            "ip link add eth0 type veth peer name eth0p",
            "ip link add eth1 mtu 9000 type veth peer name eth1p",
            "ip addr add 10.0.2.15/24 dev eth0",
            "ip addr add 169.254.9.9/16 dev eth1",
            "ip addr add 192.168.56.11/24 dev eth1",
            "ip addr add 192.168.56.99/24 dev eth1",
            "ip addr add fd56::11/64 dev eth1 nodad",
            "ip addr add fd56::aa/64 dev eth1 nodad",
            "ip addr add 2001:db8::15/64 dev eth0 nodad",
            "ip link set eth0 up", "ip link set eth0p up", "ip link set eth1 up", "ip link set eth1p up",
            "ip route add default via 10.0.2.2 dev eth0",
            "ip -6 route add default via 2001:db8::1 dev eth0",
            # eth2: in kernel order a dynamic, a deprecated and then a permanent address of each family
            "ip link add eth2 type veth peer name eth2p",
            "ip addr add 10.9.0.5/24 dev eth2 valid_lft 3600 preferred_lft 3600",
            "ip addr add 10.9.0.6/24 dev eth2 preferred_lft 0",
            "ip addr add 10.9.0.7/24 dev eth2",
            "ip -6 addr add fd57::10/64 dev eth2 nodad valid_lft 3600 preferred_lft 3600",
            "ip -6 addr add fd57::20/64 dev eth2 nodad preferred_lft 0",
            "ip -6 addr add fd57::30/64 dev eth2 nodad",
            "ip link set eth2 up",
            # eth3: only a deprecated address
            "ip link add eth3 type veth peer name eth3p",
            "ip addr add 10.9.3.3/24 dev eth3 preferred_lft 0",
        ):
            subprocess.run(["ip", "netns", "exec", ns, *cmd.split()], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def select(netns: str, iface: list[str] = [], regex: list[str] = [], reach: str = "", public: str = "",
           public6: str = "", families: tuple[str, ...] = ("IPv4",)) -> dict:
    args = json.dumps({"iface": iface, "regex": regex, "reach": reach, "public": public, "public6": public6,
                       "families": families})
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE, args], capture_output=True,
                         text=True, cwd=REPO, check=True)
    return json.loads(res.stdout)


def test_by_name_takes_the_primary_global_address(netns: str) -> None:
    assert select(netns, iface=["eth1"]) == {"name": "eth1", "mtu": 9000, "iface": "192.168.56.11", "ext": "192.168.56.11"}


def test_by_ip_takes_that_address(netns: str) -> None:
    assert select(netns, iface=["192.168.56.99"])["iface"] == "192.168.56.99"


def test_first_matching_iface_wins(netns: str) -> None:
    assert select(netns, iface=["eth7", "eth0"])["name"] == "eth0"


def test_regex_matches_addresses_then_names(netns: str) -> None:
    assert select(netns, regex=[r"192\.168\.56\.9"])["iface"] == "192.168.56.99"
    assert select(netns, regex=["^eth0$"])["name"] == "eth0"


def test_can_reach_uses_the_route(netns: str) -> None:
    assert select(netns, reach="192.168.56.200")["name"] == "eth1"
    assert select(netns, reach="8.8.8.8") == {"name": "eth0", "mtu": 1500, "iface": "10.0.2.15", "ext": "10.0.2.15"}


def test_default_route_and_public_ip(netns: str) -> None:
    assert select(netns)["name"] == "eth0"
    assert select(netns, iface=["eth1"], public="203.0.113.5")["ext"] == "203.0.113.5"
    assert select(netns, public="192.168.56.11")["name"] == "eth1"


def test_errors_use_flanneld_wording(netns: str) -> None:
    assert select(netns, iface=["eth9"]) == {
        "error": "Failed to find interface to use that matches the interfaces and/or regexes provided"}
    assert select(netns, public="203.0.113.5") == {"error": "Failed to find any valid interface to use: error looking up "
                                                   "interface 203.0.113.5: no interface with given IP found"}
    assert select(netns, iface=["eth1p"]) == {"error": "Failed to find any valid interface to use: failed to find IPv4 "
                                              "address for interface eth1p"}


DUAL = ("IPv4", "IPv6")


def test_dual_stack_default_routes(netns: str) -> None:
    """The kernel's IPv6 dump and default route, read through the real netlink socket (spec §4.1, §4.2)."""
    assert select(netns, families=DUAL) == {"name": "eth0", "mtu": 1500, "addrs": {
        "IPv4": ["10.0.2.15", "10.0.2.15"], "IPv6": ["2001:db8::15", "2001:db8::15"]}}
    assert select(netns, families=("IPv6",)) == {"name": "eth0", "mtu": 1500,
                                                 "addrs": {"IPv6": ["2001:db8::15", "2001:db8::15"]}}


def test_dual_stack_by_name_takes_the_newest_global_ipv6_address(netns: str) -> None:
    assert select(netns, iface=["eth1"], families=DUAL)["addrs"] == {
        "IPv4": ["192.168.56.11", "192.168.56.11"], "IPv6": ["fd56::aa", "fd56::aa"]}


def test_ipv6_by_address_regex_route_and_public(netns: str) -> None:
    assert select(netns, iface=["fd56::11"], families=("IPv6",))["addrs"] == {"IPv6": ["fd56::11", "fd56::11"]}
    assert select(netns, regex=[r"^(192\.168\.56\.1|fd56::1)"], families=DUAL)["addrs"] == {
        "IPv4": ["192.168.56.11", "192.168.56.11"], "IPv6": ["fd56::11", "fd56::11"]}
    assert select(netns, reach="fd56::99", families=DUAL)["addrs"]["IPv4"] == ["192.168.56.11", "192.168.56.11"]
    assert select(netns, public6="fd56::11", families=("IPv6",))["name"] == "eth1"
    assert select(netns, iface=["eth1"], public6="2001:db8:9::9", families=DUAL)["addrs"]["IPv6"] == [
        "fd56::aa", "2001:db8:9::9"]
    assert select(netns, public="10.0.2.15", public6="fd56::11", families=DUAL) == {
        "error": "Failed to find any valid interface to use: v6 interface eth1 must be the same with v4 interface eth0"}


def test_permanent_addresses_are_preferred_and_deprecated_ones_never_taken(netns: str) -> None:
    """flannel v0.28's order: a permanent address before a dynamic one (one with a lifetime: DHCP, SLAAC), and no
    deprecated one (its preferred lifetime is over), whatever the kernel's order."""
    assert select(netns, iface=["eth2"], families=DUAL)["addrs"] == {
        "IPv4": ["10.9.0.7", "10.9.0.7"], "IPv6": ["fd57::30", "fd57::30"]}
    assert select(netns, regex=[r"^10\.9\.0\."])["iface"] == "10.9.0.7"
    assert select(netns, iface=["eth3"]) == {"error": "Failed to find any valid interface to use: failed to find IPv4 "
                                                      "address for interface eth3"}
    # an address named by the flags is taken as it is
    assert select(netns, iface=["10.9.0.6"])["iface"] == "10.9.0.6"


def test_regex_without_a_match_lists_the_interfaces(netns: str, capfd: pytest.CaptureFixture[str]) -> None:
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE_LOG,
                          json.dumps({"regex": ["^nothing$"], "reach": ""})], capture_output=True, text=True, cwd=REPO)
    assert json.loads(res.stdout) == {"error": "Failed to find interface to use that matches the interfaces and/or "
                                               "regexes provided"}
    assert ("Could not find valid interface matching ^nothing$: could not match pattern ^nothing$ to any of the "
            "available network interfaces (lo:[], eth0p:[], eth0:[10.0.2.15], eth1p:[], eth1:[192.168.56.11 "
            "192.168.56.99 169.254.9.9], eth2p:[], eth2:[10.9.0.7 10.9.0.5], eth3p:[], eth3:[])") in res.stderr
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE_LOG,
                          json.dumps({"regex": [], "reach": "192.168.56.200"})], capture_output=True, text=True,
                         cwd=REPO)
    assert "Determining interface to use based on given ifcanreach: 192.168.56.200" in res.stderr


PROBE_LOG = """
import json, logging, sys
from pyflannel import ip
from pyflannel.netlink import Netlink
logging.basicConfig(level=logging.INFO, format="%(message)s")
args = json.loads(sys.argv[1])
try:
    e = ip.select(Netlink(), [], args["regex"], args["reach"], "")
    print(json.dumps({"name": e.name}))
except ip.InterfaceError as exc:
    print(json.dumps({"error": str(exc)}))
"""
