"""The log lines admins grep for, as the code produces them, against flannel v0.28.9's wording: one row a
line (interface selection, start-up checks, the node sync, the blackhole route, the VXLAN device)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pyflannel import brnetfilter, daemon, flags, ip
from pyflannel.backend.vxlan import VXLANNetwork
from pyflannel.blackhole import BlackholeRoutes
from pyflannel.config import VXLANConfig
from pyflannel.family import IPV4, IPV6
from pyflannel.lease import LeaseError
from pyflannel.netlink import Route
from pyflannel.subnet.annotations import AnnotationKeys
from pyflannel.subnet import kube
from pyflannel.subnet.kube import KubeSubnetManager, NodeInfo
from tests.fakenetlink import FakeNetlink

PREFIX = "flannel.alpha.coreos.com/"


def node() -> FakeNetlink:
    """eth1 at 192.168.56.11/24 and fd56::11/64, no default route."""
    nl = FakeNetlink()
    nl.ip_link_add("eth1")
    nl.ip_addr_add("eth1", "192.168.56.11/24")
    nl.ip_addr_add("eth1", "fd56::11/64")
    return nl


def select_error(nl: FakeNetlink, *args: Any, **kw: Any) -> str:
    try:
        ip.select(nl, *args, **kw)
    except ip.InterfaceError as exc:
        return str(exc)
    raise AssertionError("no error")


def default_route_without_interface() -> str:
    nl = node()
    nl.route_table["0.0.0.0/0"] = Route("0.0.0.0/0", "192.168.56.1", 0, 3, 254)
    return select_error(nl, [], [], "", "")


def regex_without_a_match(caplog: pytest.LogCaptureFixture) -> str:
    select_error(node(), [], ["^wlan"], "", "")
    return next(r.getMessage() for r in caplog.records if "could not match" in r.getMessage())


def can_reach(caplog: pytest.LogCaptureFixture) -> str:
    nl = node()
    nl.ip_route_add("0.0.0.0/0", "192.168.56.1", "eth1")
    ip.select(nl, [], [], "192.168.56.12", "")
    return next(r.getMessage() for r in caplog.records if "ifcanreach" in r.getMessage())


def follow_error(readd: bool) -> str:
    """ip.follow's refusal when eth1 is gone, or came back without an address."""
    nl = node()
    ext = ip.select(nl, ["eth1"], [], "", "")
    nl.ip_link_del("eth1")
    if readd:
        nl.ip_link_add("eth1")
    try:
        ip.follow(nl, ext, IPV4)
    except LookupError as exc:
        return str(exc)
    raise AssertionError("no error")


def sync_timeout(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> str:
    sm = KubeSubnetManager(None, "k8s01", AnnotationKeys.from_prefix(PREFIX), PREFIX,  # type: ignore[arg-type]
                           {IPV4: ip_network("10.244.0.0/16")}, lambda names, changed_at: None)
    clock = iter(range(0, 10000, 700))  # each look at the clock is 700 s later
    sm.synced.wait = lambda timeout: False  # type: ignore[method-assign]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(LeaseError) as exc:
        mp.setattr(kube, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
        sm.wait_synced(threading.Event(), 600.0)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    return "%s | Failed to create SubnetManager: %s" % (said[0], exc.value)


class NeverSynced:
    synced = threading.Event()

    def wait_synced(self, stop: threading.Event, timeout: float) -> None:
        raise LeaseError("error waiting for nodeController to sync state: context deadline exceeded")


def continuing(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> str:
    make(tmp_path, {"CONT_WHEN_CACHE_NOT_READY": "true"})._wait_synced(NeverSynced())  # type: ignore[arg-type]
    return caplog.records[-1].getMessage()


def make(tmp_path: Path, environ: dict[str, str] | None = None) -> daemon.Daemon:
    opts = flags.parse(["--kube-subnet-mgr", "--net-config-path=%s" % (tmp_path / "none.json")], {})
    return daemon.Daemon(opts, environ or {}, proc=str(tmp_path / "proc"))


def ready(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> str:
    d = make(tmp_path)
    d.backends = {IPV4: SimpleNamespace(device_ok=True)}  # type: ignore[dict-item]
    d.datapath_ready = True
    d.ready()
    return caplog.records[-1].getMessage()


def br_netfilter(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> str:
    return brnetfilter.problem(brnetfilter.missing((IPV4,), "/nonexistent/proc").replace("/nonexistent", ""))


def node_public_ip(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> str:
    own = NodeInfo("k8s01", "10.244.1.0/24", (), {PREFIX + "node-public-ip": "192.168.57.11"})
    sm = SimpleNamespace(node_name="k8s01", keys=AnnotationKeys.from_prefix(PREFIX), own_node=lambda: own)
    make(tmp_path)._node_public_ips(sm, "", "")  # type: ignore[arg-type]
    return " | ".join(r.getMessage() for r in caplog.records)


def event_queue_depth(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> str:
    (tmp_path / "none.json").write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    with pytest.raises(daemon.Fatal) as exc:
        make(tmp_path, {"EVENT_QUEUE_DEPTH": "5k"})._kube_subnet_manager()
    return str(exc.value)


class RefusingNetlink:
    """Answers the blackhole route's dump with nothing, and its creation with ``code``."""

    def __init__(self, code: int) -> None:
        self.code = code

    def routes(self, table: int, family: int, rtype: int) -> list[Route]:
        return []

    def batch(self, requests: list[Any]) -> list[int]:
        return [self.code]


def blackhole(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> str:
    BlackholeRoutes({IPV4: ip_network("10.244.1.0/24")}, 5, RefusingNetlink(22)).check()  # type: ignore[arg-type]
    return caplog.records[-1].getMessage()


def mac_address(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> str:
    nl = node()
    ext = ip.select(nl, ["eth1"], [], "", "")
    VXLANNetwork(nl, VXLANConfig(), IPV4, ext, ip_network("10.244.0.0/16")).create_device("0a:58:0a:f4:01:00")
    return next(r.getMessage() for r in caplog.records if "mac address" in r.getMessage())


def cli_flags(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> str:
    return flags.describe(flags.parse(["--kube-subnet-mgr", "--ip-blackhole-route"], {})).split(
        " iptablesResyncSeconds:5 ")[1].split(" setNodeNetworkUnavailable")[0]


# (what, how the code produces it, flannel v0.28.9's text)
ROWS: list[tuple[str, Callable[..., str], str]] = [
    ("no default route", lambda caplog, tmp: select_error(node(), [], [], "", ""),
     "Failed to find any valid interface to use: failed to get default interface: unable to find default route"),
    ("no IPv6 default route", lambda caplog, tmp: select_error(node(), [], [], "", "", families=(IPV6,)),
     "Failed to find any valid interface to use: failed to get default v6 interface: unable to find default v6 route"),
    ("a default route without an interface", lambda caplog, tmp: default_route_without_interface(),
     "Failed to find any valid interface to use: failed to get default interface: found default route but could "
     "not determine interface"),
    ("--public-ip not local", lambda caplog, tmp: select_error(node(), [], [], "", "203.0.113.5"),
     "Failed to find any valid interface to use: error looking up interface 203.0.113.5: no interface with given "
     "IP found"),
    ("--public-ipv6 not local", lambda caplog, tmp: select_error(node(), [], [], "", "", "2001:db8::5", (IPV6,)),
     "Failed to find any valid interface to use: error looking up v6 interface 2001:db8::5: no interface with given "
     "IPv6 found"),
    ("--iface-regex without a match", lambda caplog, tmp: regex_without_a_match(caplog),
     "Could not find valid interface matching ^wlan: could not match pattern ^wlan to any of the available network "
     "interfaces (lo:[], eth1:[192.168.56.11])"),
    ("--iface-can-reach", lambda caplog, tmp: can_reach(caplog),
     "Determining interface to use based on given ifcanreach: 192.168.56.12"),
    ("external interface gone", lambda caplog, tmp: follow_error(False), "external interface eth1 not found"),
    ("external interface back without an address", lambda caplog, tmp: follow_error(True),
     "error getting IPv4 addresses for eth1: no IPv4 address found for given interface"),
    ("node sync timeout", sync_timeout,
     "Node controller sync not completed within 10m0s: context deadline exceeded | Failed to create SubnetManager: "
     "error waiting for nodeController to sync state: context deadline exceeded"),
    ("node sync timeout, CONT_WHEN_CACHE_NOT_READY=true", continuing,
     "Timed out waiting for node controller sync. Continuing anyway."),
    ("ready", ready, "flannel is ready"),
    ("br_netfilter missing", br_netfilter,
     "Failed to check br_netfilter: stat /proc/sys/net/bridge/bridge-nf-call-iptables: no such file or directory"),
    ("node-public-ip", node_public_ip,
     'List of node(k8s01) annotations: map[string]string{"flannel.alpha.coreos.com/node-public-ip":"192.168.57.11"} '
     "| Overriding public ip with '192.168.57.11' from node annotation 'flannel.alpha.coreos.com/node-public-ip'"),
    ("EVENT_QUEUE_DEPTH", event_queue_depth,
     'Failed to create SubnetManager: error creating network manager: env EVENT_QUEUE_DEPTH=5k format error: '
     'strconv.Atoi: parsing "5k": invalid syntax'),
    ("blackhole route refused", blackhole, "Failed to setup blackhole route, invalid argument"),
    ("VXLAN device created", mac_address, "Interface flannel.1 mac address set to: 0a:58:0a:f4:01:00"),
    ("CLI flags config", cli_flags, "iptablesForwardRules:true blackholeRoute:true netConfPath:/etc/kube-flannel/"
                                    "net-conf.json"),
]


@pytest.mark.parametrize("what,produce,text", ROWS, ids=[row[0] for row in ROWS])
def test_log_line_has_flannel_v0_28_9_wording(what: str, produce: Callable[..., str], text: str,
                                              caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO)
    assert produce(caplog, tmp_path) == text
