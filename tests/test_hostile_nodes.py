"""Hostile and oversized input to the kube subnet manager and the API client, through the in-repo API server:
deeply nested nodes, 1.5 MB nodes, oversized annotations, lines without end, leases over this node's
network, unusable public IPs. Each is decoded within bounds, or skipped with one warning, while the other
nodes keep their leases."""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from typing import Any

import pytest

from pyflannel import daemon, diagnose, kubeclient, log
from pyflannel.family import IPV4
from pyflannel.kubeclient import KubeClient
from pyflannel.subnet import kube
from pyflannel.subnet.annotations import AnnotationKeys
from pyflannel.subnet.nodenet import NodeNetwork
from tests.test_kube import Recorder, flannel_annotations
from tools.kubeapi import FakeKubeAPI

PREFIX = "flannel.alpha.coreos.com/"
KEYS = AnnotationKeys.from_prefix(PREFIX)
DEPTH = 9_999  # Go's encoding/json, and so the API server, accepts 10,000 levels


def add_deep_node(api: FakeKubeAPI, name: str, i: int, depth: int) -> None:
    """A flannel peer whose managedFields' fieldsV1 trie nests ``depth`` levels (its schema allows any), sent
    to the API server as a kubelet sends it: JSON in a POST (nothing in this process copies it)."""
    meta = {"name": name, "annotations": flannel_annotations("192.168.56.%d" % (10 + i), "0a:00:00:00:00:%02x" % i)}
    head = json.dumps({"metadata": meta, "spec": {"podCIDR": "10.244.%d.0/24" % i}})[:-2]  # open: "...}}"
    fields = '{"f:a":' * depth + "{}" + "}" * depth
    body = head + ',"managedFields":[{"manager":"kubelet","fieldsType":"FieldsV1","fieldsV1":%s}]}}' % fields
    conn = http.client.HTTPConnection(api.url.split("//")[1], timeout=10)
    conn.request("POST", "/api/v1/nodes", body=body.encode(), headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 201
    conn.close()


@pytest.fixture
def deep_json() -> Iterator[None]:
    """What the daemon does at start (kubeclient.allow_deep_json), undone afterwards: here the API server
    in this process must also encode the deep nodes."""
    limit, stack = sys.getrecursionlimit(), threading.stack_size()
    kubeclient.allow_deep_json()
    yield
    sys.setrecursionlimit(limit)
    threading.stack_size(stack)


@pytest.fixture
def manager(api: FakeKubeAPI) -> Iterator[tuple[kube.KubeSubnetManager, Recorder, threading.Event]]:
    rec = Recorder()
    sm = kube.KubeSubnetManager(KubeClient(kube_api_url=api.url), "k8s01", KEYS, PREFIX,
                                {IPV4: IPv4Network("10.244.0.0/16")}, rec)
    stop = threading.Event()
    yield sm, rec, stop
    stop.set()


def run(sm: kube.KubeSubnetManager, rec: Recorder, stop: threading.Event) -> None:
    threading.Thread(target=sm.run, args=(stop,), daemon=True).start()
    sm.wait_synced(stop, timeout=10)
    rec.names.clear()


def add_peer(api: FakeKubeAPI, name: str, i: int, **extra: Any) -> None:
    api.add_node(name, pod_cidr="10.244.%d.0/24" % i,
                 annotations=flannel_annotations("192.168.56.%d" % (10 + i), "0a:00:00:00:00:%02x" % i))
    if extra:
        api.patch_node(name, extra)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


# -- nesting ---------------------------------------------------------------------------------------


def test_a_node_nested_as_deep_as_the_api_server_allows_decodes(
        api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder, threading.Event], deep_json: None) -> None:
    sm, rec, stop = manager
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    add_deep_node(api, "deep-list", 2, DEPTH)
    add_peer(api, "good", 3)
    run(sm, rec, stop)
    assert sorted(sm.leases(IPV4)) == ["deep-list", "good"]
    add_deep_node(api, "deep-watch", 4, DEPTH)
    add_peer(api, "after", 5)
    rec.wait_for("after")
    assert sorted(sm.leases(IPV4)) == ["after", "deep-list", "deep-watch", "good"]
    for name in ("deep-list", "deep-watch"):  # the API server encodes them again: still in the deep context
        api.delete_node(name)
    rec.wait_for("deep-watch")


def test_nesting_deeper_than_the_api_server_allows_fails_cleanly(
        api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder, threading.Event], deep_json: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """12,000 levels (a broken server): not decodable here either, so an ApiError that the watch logs and
    retries, never a RecursionError out of its thread."""
    sm, rec, stop = manager
    monkeypatch.setattr(kube, "MAX_BACKOFF", 0.5)
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    add_peer(api, "good", 3)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(30_000)  # for this process' API server only
    add_deep_node(api, "deep", 2, 12_000)
    sys.setrecursionlimit(limit)
    thread = threading.Thread(target=sm.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while caplog.text.count("Failed to list nodes: invalid JSON from the API server for GET /api/v1/nodes: "
                            "RecursionError") < 2:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    assert thread.is_alive() and not sm.synced.is_set()
    sys.setrecursionlimit(30_000)
    api.delete_node("deep")
    sys.setrecursionlimit(limit)
    sm.wait_synced(stop, timeout=20)
    assert sorted(sm.leases(IPV4)) == ["good"]


# -- size ------------------------------------------------------------------------------------------


def big_status(mb: float) -> dict[str, Any]:
    return {"status": {"images": [{"names": ["a"]}] * int(mb * 1e6 / 16)}}


def test_a_large_node_by_the_watch_is_decoded_without_being_built(
        api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder, threading.Event]) -> None:
    sm, rec, stop = manager
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    run(sm, rec, stop)
    add_peer(api, "big", 2)
    rec.wait_for("big")
    raw = b'{"type":"MODIFIED","object":%s}' % json.dumps(api.get_node("big") | big_status(1.5)).encode()
    tracemalloc.start()
    try:
        event = kube.decode_watch_event(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(raw) > 1_400_000 and peak < 100_000, peak  # json.loads builds some 28 MB of objects here
    assert "status" not in event["object"]
    api.patch_node("big", big_status(1.5))  # through the watch: the lease stays, nothing changes
    add_peer(api, "after", 3)
    rec.wait_for("after")
    assert sorted(sm.leases(IPV4)) == ["after", "big"]


def test_a_watch_line_over_the_bound_is_skipped_and_the_nodes_listed_again(
        api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder, threading.Event],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    sm, rec, stop = manager
    monkeypatch.setattr(kubeclient, "MAX_LINE", 200_000)
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    run(sm, rec, stop)
    add_peer(api, "big", 2, **big_status(0.5))
    deadline = time.monotonic() + 10
    while "Skipping a node watch event that cannot be read (a line of more than 200000 bytes)" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    add_peer(api, "after", 3)
    rec.wait_for("after", timeout=20)  # the list that followed reads it: its pages may hold more than a line
    assert sorted(sm.leases(IPV4)) == ["after", "big"]


def test_an_endless_line_is_cut_at_the_bound() -> None:
    """A server (or a man in the middle without TLS) sending one line that never ends: at most MAX_LINE is read."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b'{"type":"MODIFIED","object":{"metadata":{"name":"' + b"A" * 65536
        try:
            for _ in range(200):  # 13 MB, never a newline
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    client = KubeClient(kube_api_url="http://127.0.0.1:%d" % server.getsockname()[1])
    with pytest.raises(kubeclient.TooLarge, match="a line of more than %d bytes" % kubeclient.MAX_LINE):
        next(client.watch_nodes("7", 30))
    server.close()


def test_oversized_flannel_annotations_of_another_node_are_refused_and_this_nodes_kept_whole(
        api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder, threading.Event],
        caplog: pytest.LogCaptureFixture) -> None:
    sm, rec, stop = manager
    big = '{"VNI":1,"VtepMAC":"0a:00:00:00:00:02","pad":"%s"}' % ("x" * 2000)
    api.add_node("k8s01", pod_cidr="10.244.1.0/24",
                 annotations={PREFIX + "backend-data": big, PREFIX + "node-public-ip": "192.168.56.11"})
    add_peer(api, "fat", 2, metadata={"annotations": {PREFIX + "backend-data": big}})
    add_peer(api, "good", 3, metadata={"annotations": {PREFIX + "x-padding": "p" * 200_000}})
    run(sm, rec, stop)
    assert sorted(sm.leases(IPV4)) == ["good"]
    assert 'Ignoring node "fat": its annotation %sbackend-data is 2048 bytes, more than the 1024 flannel allows' \
        % PREFIX in warnings(caplog)
    own = sm.own_node()
    assert own is not None and own.annotations[PREFIX + "backend-data"] == big  # this node's: whole
    assert own.annotations[PREFIX + "node-public-ip"] == "192.168.56.11"
    assert not hasattr(sm._nodes["good"], "annotations")  # another node's: its leases, parsed, and nothing else


# -- what a lease may point at ---------------------------------------------------------------------


def test_unusable_public_ips_are_refused_with_one_warning_each(
        api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder, threading.Event],
        caplog: pytest.LogCaptureFixture) -> None:
    sm, rec, stop = manager
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    odd = {"loopback": "127.0.0.1", "any": "0.0.0.0", "mcast": "224.0.0.1", "bcast": "255.255.255.255",
           "self": "192.168.56.11", "net-bcast": "192.168.56.255", "good": "192.168.56.40"}
    for i, (name, public_ip) in enumerate(odd.items()):
        api.add_node(name, pod_cidr="10.244.%d.0/24" % (10 + i),
                     annotations=flannel_annotations(public_ip, "0a:00:00:00:00:%02x" % (10 + i)))
    run(sm, rec, stop)
    assert sorted(sm.leases(IPV4)) == ["good", "net-bcast", "self"]  # this node's network is not known yet
    sm.set_node_network({IPV4: NodeNetwork((IPv4Address("192.168.56.11"),), (IPv4Network("192.168.56.0/24"),))})
    assert rec.names == {"net-bcast", "self"} and sorted(sm.leases(IPV4)) == ["good"]
    found = warnings(caplog)
    for name, why in (("loopback", "is a loopback address"), ("any", "is unspecified"),
                      ("mcast", "is a multicast address"), ("bcast", "is the broadcast address")):
        assert found.count('Ignoring node "%s": its public IP %s (%spublic-ip) %s' % (name, odd[name], PREFIX, why)) == 1
    assert 'Ignoring node "self": its public IP 192.168.56.11 is this node\'s own address' in found
    assert 'Ignoring node "net-bcast": its public IP 192.168.56.255 is the broadcast address of this node\'s ' \
           'network 192.168.56.0/24' in found


def test_pod_cidrs_over_this_nodes_network_are_refused(api: FakeKubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    """A Network that holds the node network (a misconfiguration that runs unnoticed) and nodes claiming parts
    of it: this node's address, its subnet, its gateway, the API server."""
    rec = Recorder()
    client = KubeClient(kube_api_url="http://192.168.60.1:1")  # never reached: only its address counts here
    client.list_nodes = lambda *a, **k: {"metadata": {}, "items": [  # type: ignore[method-assign]
        {"metadata": {"name": name, "annotations": flannel_annotations("192.168.70.%d" % i, "0a:00:00:00:00:%02x" % i)},
         "spec": {"podCIDR": cidr}} for i, (name, cidr) in enumerate(cidrs.items(), 1)]}
    cidrs = {"k8s01": "192.168.1.0/24", "subnet": "192.168.56.128/25", "address": "192.168.99.0/24",
             "gateway": "192.168.57.0/24", "api": "192.168.60.0/24", "good": "192.168.2.0/24"}
    sm = kube.KubeSubnetManager(client, "k8s01", KEYS, PREFIX, {IPV4: IPv4Network("192.168.0.0/16")}, rec)
    sm._list()
    assert len(sm.leases(IPV4)) == 5
    rec.names.clear()
    own = (IPv4Address("192.168.56.11"), IPv4Address("192.168.99.5"))  # the interface's, the advertised one
    sm.set_node_network({IPV4: NodeNetwork(own, (IPv4Network("192.168.56.0/24"),), (IPv4Address("192.168.57.1"),))})
    assert sorted(sm.leases(IPV4)) == ["good"] and rec.names == {"subnet", "address", "gateway", "api"}
    found = warnings(caplog)
    assert 'Ignoring node "subnet": its pod CIDR 192.168.56.128/25 (spec.podCIDR) overlaps this node\'s network ' \
           '192.168.56.0/24' in found
    assert 'Ignoring node "address": its pod CIDR 192.168.99.0/24 (spec.podCIDR) contains this node\'s address ' \
           '192.168.99.5' in found
    assert 'Ignoring node "gateway": its pod CIDR 192.168.57.0/24 (spec.podCIDR) contains this node\'s gateway ' \
           '192.168.57.1' in found
    assert 'Ignoring node "api": its pod CIDR 192.168.60.0/24 (spec.podCIDR) contains this node\'s API server or ' \
           'etcd endpoint 192.168.60.1' in found
    # From now on such a node is refused as it comes.
    sm._list()
    assert sorted(sm.leases(IPV4)) == ["good"]


def test_a_public_ip_inside_another_nodes_pod_cidr_is_refused_first_holder_first(
        api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder, threading.Event],
        caplog: pytest.LogCaptureFixture) -> None:
    sm, rec, stop = manager
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    add_peer(api, "holder", 5)
    run(sm, rec, stop)
    # A node whose tunnel would end inside holder's pods: refused, waits; takes over once holder goes.
    api.add_node("inside", pod_cidr="10.244.6.0/24", annotations=flannel_annotations("10.244.5.7", "0a:00:00:00:00:06"))
    add_peer(api, "after", 7)
    rec.wait_for("after")
    assert "inside" not in sm.leases(IPV4)
    assert 'Ignoring node "inside": its public IP 10.244.5.7 lies in the pod CIDR of node "holder", which held it ' \
           'first' in warnings(caplog)
    # A node whose pod CIDR would hold another node's tunnel end: refused too.
    api.add_node("over", pod_cidr="10.244.56.0/24", annotations=flannel_annotations("192.168.56.99", "0a:00:00:00:00:38"))
    api.add_node("ends", pod_cidr="10.244.8.0/24", annotations=flannel_annotations("10.244.57.1", "0a:00:00:00:00:08"))
    api.add_node("over2", pod_cidr="10.244.57.0/24", annotations=flannel_annotations("192.168.56.98", "0a:00:00:00:00:39"))
    rec.wait_for("ends")
    time.sleep(0.3)
    assert "over2" not in sm.leases(IPV4) and "over" in sm.leases(IPV4)
    assert 'Ignoring node "over2": its pod CIDR 10.244.57.0/24 (spec.podCIDR) contains the public IP of node ' \
           '"ends", which held it first' in warnings(caplog)
    api.delete_node("holder")
    rec.wait_for("inside")
    assert "inside" in sm.leases(IPV4)


def test_this_nodes_network_is_told_with_the_api_servers_address() -> None:
    nodenet = NodeNetwork((ip_address("10.0.0.5"),), (ip_network("10.0.0.0/24"),))
    with_api = nodenet.with_servers(["https://10.96.0.1:443", "https://kubernetes.default.svc", "https://[fd00::1]:6443"])
    assert with_api.servers == (ip_address("10.96.0.1"),)
    assert with_api.subnet_problem(ip_network("10.96.0.0/16")) == "contains this node's API server or etcd endpoint " \
                                                                  "10.96.0.1"
    assert with_api.address_problem(ip_address("10.0.0.0")) == "is the network address of this node's network " \
                                                                 "10.0.0.0/24"


# -- log lines and output -----------------------------------------------------------------------------


def test_a_value_cannot_forge_a_log_line_nor_a_terminal_escape() -> None:
    formatter = log.KlogFormatter()
    forged = "x\nE1204 21:00:00.000000 1 kube.py:400] Lease has been revoked. Shutting down daemon.\x1b[2K\u2028"
    record = logging.LogRecord("pyflannel", logging.WARNING, "vxlan.py", 1, "ignoring type=%s", (forged,), None)
    line = formatter.format(record)
    assert "\n" not in line and "\x1b" not in line and "\u2028" not in line
    assert line.endswith("ignoring type=x\\nE1204 21:00:00.000000 1 kube.py:400] Lease has been revoked. Shutting "
                         "down daemon.\\x1b[2K\\u2028")
    record = logging.LogRecord("pyflannel", logging.ERROR, "vxlan.py", 1, "%s", ("m" * 100_000,), None)
    assert len(formatter.format(record)) < log.MAX_MESSAGE + 200


def test_passwords_in_urls_are_masked() -> None:
    assert log.redact_url("http://root:S3cret@127.0.0.1:2379/x") == "http://root:********@127.0.0.1:2379/x"
    assert log.redact_url("https://10.0.0.1:6443") == "https://10.0.0.1:6443"
    assert log.redact_url("http://a:b@c@host") == "http://a:********@host"
    assert log.loopback_host("http://127.0.0.2:1") and log.loopback_host("http://[::1]:1")
    assert not log.loopback_host("http://192.168.56.1:6443") and not log.loopback_host("http://etcd:2379")


def test_diagnose_output_escapes_what_nodes_wrote() -> None:
    out = io.StringIO()
    diagnose.write(out, [diagnose.Problem("nodes on another backend: evil (x\x1b[2K)\nsecond\rline", ["fix\x07"])])
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue() and "\x07" not in out.getvalue()
    assert "evil (x\\x1b[2K)" in out.getvalue() and "second\\rline" in out.getvalue()


# -- credentials -----------------------------------------------------------------------------------


def test_without_node_name_a_forbidden_pod_read_says_the_permission_and_the_better_way(api: FakeKubeAPI) -> None:
    api.fail_next("GET", r"/pods/", status=403, message='pods "p" is forbidden')
    with pytest.raises(daemon.NodeNameError) as exc:
        daemon.node_name(KubeClient(kube_api_url=api.url), {"POD_NAME": "p", "POD_NAMESPACE": "kube-flannel"})
    assert "needs get on pods in namespace kube-flannel" in str(exc.value)
    assert "set NODE_NAME from the pod's spec.nodeName instead" in str(exc.value)


def test_credentials_are_never_logged_and_plain_http_is_warned_about(tmp_path: Any,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    client = KubeClient(kube_api_url="http://user:S3cret@127.0.0.1:1")
    assert client.host == "http://user:********@127.0.0.1:1" and "S3cret" not in caplog.text
    assert "Ignoring the user and password in the API server URL http://user:********@127.0.0.1:1" in caplog.text
    with pytest.raises(kubeclient.ApiError) as exc:
        client.list_nodes(1)  # nobody listens: the error names the URL without the password
    assert "S3cret" not in str(exc.value)
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    caplog.clear()
    KubeClient(kubeconfig_file=str(cfg))  # loopback: stays on this machine
    KubeClient(kubeconfig_file=str(cfg), kube_api_url="https://192.0.2.1:6443")
    assert "unencrypted" not in caplog.text
    KubeClient(kubeconfig_file=str(cfg), kube_api_url="http://192.0.2.1:6443")
    assert caplog.text.count("The credentials of the user of %s are sent unencrypted to http://192.0.2.1:6443" % cfg) == 1
