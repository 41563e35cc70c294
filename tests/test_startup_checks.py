"""The daemon's start-up checks of flannel v0.28.9 that need no root: br_netfilter, the node-public-ip
annotations, EVENT_QUEUE_DEPTH, CONT_WHEN_CACHE_NOT_READY, and ``flannel is ready``."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pyflannel import daemon, flags
from pyflannel.family import IPV4, IPV6
from pyflannel.lease import LeaseError
from pyflannel.subnet.annotations import AnnotationKeys
from pyflannel.subnet.kube import NodeInfo

PREFIX = "flannel.alpha.coreos.com/"


def make(tmp_path: Path, environ: dict[str, str] | None = None, *argv: str) -> daemon.Daemon:
    opts = flags.parse(["--kube-subnet-mgr", "--net-config-path=%s" % (tmp_path / "net-conf.json"), *argv], {})
    return daemon.Daemon(opts, environ or {}, proc=str(tmp_path / "proc"))


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("pyflannel")]


# -- br_netfilter -------------------------------------------------------------------------------------


def test_without_br_netfilter_the_daemon_explains_and_waits_until_it_is_loaded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "BR_NETFILTER_RETRY", 0.05)
    d = make(tmp_path)
    bridge = tmp_path / "proc" / "sys" / "net" / "bridge"
    caplog.set_level(logging.INFO)
    waiter = threading.Thread(target=d._wait_for_br_netfilter, args=((IPV4, IPV6),))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not d.ready()
    bridge.mkdir(parents=True)
    (bridge / "bridge-nf-call-iptables").write_text("1\n")
    time.sleep(0.2)
    assert waiter.is_alive(), "IPv6 needs bridge-nf-call-ip6tables too"
    (bridge / "bridge-nf-call-ip6tables").write_text("1\n")
    waiter.join(5)
    assert not waiter.is_alive()
    assert messages(caplog) == [
        "Failed to check br_netfilter: stat %s/bridge-nf-call-iptables: no such file or directory" % bridge,
        daemon.BR_NETFILTER_HINT,
        "br_netfilter is loaded now; carrying on"]
    assert "modprobe br_netfilter" in daemon.BR_NETFILTER_HINT
    assert "/etc/modules-load.d/br_netfilter.conf" in daemon.BR_NETFILTER_HINT


def test_with_br_netfilter_loaded_nothing_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bridge = tmp_path / "proc" / "sys" / "net" / "bridge"
    bridge.mkdir(parents=True)
    (bridge / "bridge-nf-call-iptables").write_text("1\n")
    caplog.set_level(logging.INFO)
    make(tmp_path)._wait_for_br_netfilter((IPV4,))
    assert messages(caplog) == []


# -- node-public-ip -----------------------------------------------------------------------------------


def fake_sm(annotations: dict[str, str] | None) -> Any:
    own = None if annotations is None else NodeInfo("k8s01", "10.244.1.0/24", (), annotations)
    return SimpleNamespace(node_name="k8s01", keys=AnnotationKeys.from_prefix(PREFIX), own_node=lambda: own,
                           synced=threading.Event(), wait_synced=lambda stop, timeout: None)


def test_node_public_ip_annotations_replace_the_flags(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    sm = fake_sm({PREFIX + "node-public-ip": "192.168.57.11", PREFIX + "node-public-ipv6": "fd57::11",
                  PREFIX + "backend-type": "vxlan"})
    assert make(tmp_path)._node_public_ips(sm, "10.0.0.1", "") == ("192.168.57.11", "fd57::11")
    assert messages(caplog) == [
        'List of node(k8s01) annotations: map[string]string{"flannel.alpha.coreos.com/backend-type":"vxlan", '
        '"flannel.alpha.coreos.com/node-public-ip":"192.168.57.11", '
        '"flannel.alpha.coreos.com/node-public-ipv6":"fd57::11"}',
        "Overriding public ip with '192.168.57.11' from node annotation 'flannel.alpha.coreos.com/node-public-ip'",
        "Overriding public ipv6 with 'fd57::11' from node annotation 'flannel.alpha.coreos.com/node-public-ipv6'"]


def test_without_the_annotations_the_flags_count(tmp_path: Path) -> None:
    d = make(tmp_path)
    assert d._node_public_ips(fake_sm({PREFIX + "node-public-ip": ""}), "10.0.0.1", "fd00::1") == ("10.0.0.1",
                                                                                                   "fd00::1")
    assert d._node_public_ips(fake_sm(None), "10.0.0.1", "") == ("10.0.0.1", "")


@pytest.mark.parametrize("key,value,says", [
    ("node-public-ip", "fd57::11", "invalid public IP address: fd57::11"),
    ("node-public-ipv6", "192.168.57.11", "invalid public IPv6 address: 192.168.57.11"),
    ("node-public-ip", "eth1", "invalid public IP address: eth1"),
])
def test_a_bad_node_public_ip_annotation_is_fatal(tmp_path: Path, key: str, value: str, says: str) -> None:
    with pytest.raises(daemon.Fatal) as exc:
        make(tmp_path)._node_public_ips(fake_sm({PREFIX + key: value}), "", "")
    assert str(exc.value) == "Failed to find any valid interface to use: %s (node annotation '%s%s')" % (
        says, PREFIX, key)


# -- EVENT_QUEUE_DEPTH and CONT_WHEN_CACHE_NOT_READY ---------------------------------------------------------


def test_a_bad_event_queue_depth_is_fatal_with_flanneld_s_text(tmp_path: Path) -> None:
    (tmp_path / "net-conf.json").write_text(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}))
    with pytest.raises(daemon.Fatal) as exc:
        make(tmp_path, {"EVENT_QUEUE_DEPTH": "abc"})._kube_subnet_manager()
    assert str(exc.value) == ('Failed to create SubnetManager: error creating network manager: env '
                              'EVENT_QUEUE_DEPTH=abc format error: strconv.Atoi: parsing "abc": invalid syntax')


class NeverSynced:
    synced = threading.Event()

    def wait_synced(self, stop: threading.Event, timeout: float) -> None:
        raise LeaseError("error waiting for nodeController to sync state: context deadline exceeded")


def test_a_sync_timeout_is_fatal_unless_cont_when_cache_not_ready(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(daemon.Fatal) as exc:
        make(tmp_path, {"CONT_WHEN_CACHE_NOT_READY": "false"})._wait_synced(NeverSynced())  # type: ignore[arg-type]
    assert str(exc.value) == ("Failed to create SubnetManager: error waiting for nodeController to sync state: "
                              "context deadline exceeded")
    make(tmp_path, {"CONT_WHEN_CACHE_NOT_READY": "true"})._wait_synced(NeverSynced())  # type: ignore[arg-type]
    assert messages(caplog) == ["Timed out waiting for node controller sync. Continuing anyway."]


def test_flannel_is_ready_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    d = make(tmp_path)
    assert not d.ready()
    d.backends = {IPV4: SimpleNamespace(device_ok=True)}  # type: ignore[dict-item]
    d.datapath_ready = True
    assert d.ready() and d.ready()
    assert messages(caplog) == ["flannel is ready"]


def test_after_continuing_unsynced_the_loop_removes_nothing_until_the_list_is_in(tmp_path: Path) -> None:
    """With CONT_WHEN_CACHE_NOT_READY=true the daemon runs before the first node list: a full reconcile
    then would delete every other node's entries, so none runs until the list is in."""
    from tests.test_daemon import make_daemon

    d = make_daemon(tmp_path, resync=1)
    sm: Any = d.sm
    sm.synced.clear()
    d._next_full = 0.0
    backend: Any = d.backends[IPV4]
    thread = threading.Thread(target=d.loop, args=(d.stop,))
    thread.start()
    try:
        time.sleep(0.3)
        assert "reconcile" not in backend.kinds()
        sm.synced.set()
        deadline = time.monotonic() + 5
        while "reconcile" not in backend.kinds() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reconcile" in backend.kinds()
    finally:
        d.stop.set()
        d._wake.set()
        thread.join(5)
