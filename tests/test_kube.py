"""The kube subnet manager against the in-repo API server, over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from pyflannel.family import IPV4, IPV6
from pyflannel.kubeclient import ApiError, KubeClient
from pyflannel.lease import Lease, LeaseError
from pyflannel.subnet import kube
from pyflannel.subnet.annotations import AnnotationKeys
from tools.kubeapi import FakeKubeAPI

PREFIX = "flannel.alpha.coreos.com/"
KEYS = AnnotationKeys.from_prefix(PREFIX)
NETWORK = IPv4Network("10.244.0.0/16")


def flannel_annotations(ip: str, mac: str) -> dict[str, str]:
    return {PREFIX + "kube-subnet-manager": "true", PREFIX + "backend-type": "vxlan", PREFIX + "public-ip": ip,
            PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"%s"}' % mac}


class Recorder:
    """Collects the node names the manager reports as changed."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.changed_at: dict[str, float | None] = {}  # the API server's time of each name's last change
        self.event = threading.Event()

    def __call__(self, names: set[str], changed_at: float | None) -> None:
        self.names |= names
        self.changed_at.update(dict.fromkeys(names, changed_at))
        self.event.set()

    def wait_for(self, name: str, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while name not in self.names:
            assert time.monotonic() < deadline, "no change reported for %s (saw %s)" % (name, self.names)
            self.event.wait(0.05)
            self.event.clear()
        self.names.discard(name)


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    server = FakeKubeAPI(token="t0ken")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(api: FakeKubeAPI, tmp_path: Path) -> KubeClient:
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": api.url}}],
        "users": [{"name": "u", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    return KubeClient(kubeconfig_file=str(cfg))


@pytest.fixture
def manager(client: KubeClient) -> Iterator[tuple[kube.KubeSubnetManager, Recorder]]:
    rec = Recorder()
    sm = kube.KubeSubnetManager(client, "k8s01", KEYS, PREFIX, {IPV4: NETWORK}, rec)
    yield sm, rec


def v4_lease(sm: kube.KubeSubnetManager, public_ip: str, data: str) -> Lease:
    """acquire_lease of an IPv4-only vxlan node."""
    return sm.acquire_lease({IPV4: IPv4Address(public_ip)}, "vxlan", {IPV4: data})[IPV4]


def start(sm: kube.KubeSubnetManager, rec: Recorder) -> threading.Event:
    """Run the manager until the returned event is set; forget the changes of the first list."""
    stop = threading.Event()
    threading.Thread(target=sm.run, args=(stop,), daemon=True).start()
    sm.wait_synced(stop, timeout=5)
    rec.names.clear()
    return stop


def test_node_to_lease_rules() -> None:
    node = kube.NodeInfo("a", "10.244.1.0/24", ("10.244.1.0/24",), flannel_annotations("192.168.56.12", "0a:00:00:00:00:01"))
    assert kube.node_to_lease(node, KEYS) == Lease(IPv4Network("10.244.1.0/24"), IPv4Address("192.168.56.12"), "vxlan",
                                                   '{"VNI":1,"VtepMAC":"0a:00:00:00:00:01"}')
    dual = kube.NodeInfo("a", "fd00::/64", ("fd00::/64", "10.244.1.0/24"), node.annotations)
    assert kube.node_to_lease(dual, KEYS).subnet == IPv4Network("10.244.1.0/24")
    with pytest.raises(ValueError, match="^Invalid IP address format$"):
        kube.node_to_lease(kube.NodeInfo("a", "10.244.1.0/24", (), {}), KEYS)
    with pytest.raises(ValueError, match="pod cidr not assigned"):
        kube.node_to_lease(kube.NodeInfo("a", "", (), node.annotations), KEYS)
    with pytest.raises(ValueError, match="missing IPv4 address"):
        kube.node_to_lease(kube.NodeInfo("a", "", ("fd00::/64",), node.annotations), KEYS)


def test_changed_at_is_the_newest_managed_fields_time() -> None:
    def node(*times: object) -> dict[str, object]:
        return {"metadata": {"name": "n", "managedFields": [{"manager": "m%d" % i, "time": t} for i, t in enumerate(times)]}}

    assert kube.changed_at(node("2026-12-06T10:00:00Z", "2026-12-06T10:00:05Z", "2026-12-06T09:59:59Z")) == \
        datetime(2026, 12, 6, 10, 0, 5, tzinfo=timezone.utc).timestamp()
    for bad in ({"metadata": {"name": "n"}}, node(), node(None, 5), node("yesterday"), {"metadata": []}, []):
        assert kube.changed_at(bad) is None


def test_node_info_keeps_only_flannel_fields() -> None:
    obj = {"metadata": {"name": "n", "annotations": {PREFIX + "public-ip": "1.2.3.4", "other/x": "y"},
                        "labels": {"a": "b"}},
           "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}, "status": {"images": [1, 2, 3]}}
    info = kube.node_info(obj, PREFIX)
    assert info == kube.NodeInfo("n", "10.244.1.0/24", (), {PREFIX + "public-ip": "1.2.3.4"})
    obj["spec"]["podCIDRs"] = ["10.244.1.0/24", "fd00::/64"]
    assert kube.node_info(obj, PREFIX).pod_cidrs == ("10.244.1.0/24", "fd00::/64")


def test_list_in_pages_and_watch(api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sm, rec = manager
    monkeypatch.setattr(kube, "LIST_PAGE_SIZE", 2)
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    for i in range(2, 7):
        api.add_node("k8s%02d" % i, pod_cidr="10.244.%d.0/24" % i,
                     annotations=flannel_annotations("192.168.56.%d" % (10 + i), "0a:00:00:00:00:%02d" % i))
    api.add_node("plain", pod_cidr="10.244.50.0/24")  # no flannel annotations: no lease
    stop = start(sm, rec)
    try:
        assert sorted(sm.leases(IPV4)) == ["k8s02", "k8s03", "k8s04", "k8s05", "k8s06"]
        assert api.count("GET", "/api/v1/nodes?limit=2") >= 1 and "continue" in " ".join(p for _, p in api.requests)
        api.patch_node("k8s03", {"metadata": {"annotations": {PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"0a:00:00:00:00:33"}'}}})
        rec.wait_for("k8s03")
        assert "0a:00:00:00:00:33" in sm.lease_of("k8s03", IPV4).backend_data
        # The change counts from the API server's time of the write, which the watch event carries.
        written = api.get_node("k8s03")["metadata"]["managedFields"][0]["time"]
        assert rec.changed_at["k8s03"] == datetime.fromisoformat(written).timestamp()
        # A change flannel does not look at is not reported.
        rec.names.clear()
        api.patch_node("k8s04", {"metadata": {"labels": {"x": "y"}}})
        api.delete_node("k8s05")
        rec.wait_for("k8s05")
        assert "k8s04" not in rec.names
        assert sm.lease_of("k8s05", IPV4) is None
    finally:
        stop.set()


def test_relist_after_410_and_errors(api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sm, rec = manager
    monkeypatch.setattr(kube, "MAX_BACKOFF", 0.2)
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    api.add_node("k8s02", pod_cidr="10.244.2.0/24", annotations=flannel_annotations("192.168.56.12", "0a:00:00:00:00:02"))
    stop = start(sm, rec)
    try:
        lists = api.count("GET", "/api/v1/nodes?limit")
        api.fail_next("GET", r"watch=", status=500, count=2)
        api.drop_watches()
        # Deleted while the watch is down, then the history is gone: the watch gets 410 and re-lists.
        api.delete_node("k8s02")
        api.compact()
        rec.wait_for("k8s02")
        assert sm.leases(IPV4) == {}
        assert api.count("GET", "/api/v1/nodes?limit") > lists
        api.add_node("k8s03", pod_cidr="10.244.3.0/24", annotations=flannel_annotations("192.168.56.13", "0a:00:00:00:00:03"))
        rec.wait_for("k8s03")
    finally:
        stop.set()


def test_acquire_lease_errors(api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder]) -> None:
    sm, rec = manager
    api.add_node("k8s02")
    stop = start(sm, rec)
    try:
        with pytest.raises(LeaseError, match='^node "k8s01" not found$'):
            v4_lease(sm, "192.168.56.11", "{}")
        api.add_node("k8s01")
        rec.wait_for("k8s01")
        with pytest.raises(LeaseError, match='^node "k8s01" pod cidr not assigned$'):
            v4_lease(sm, "192.168.56.11", "{}")
        api.set_pod_cidr("k8s01", "10.10.1.0/24")
        rec.wait_for("k8s01")
        with pytest.raises(LeaseError) as exc:
            v4_lease(sm, "192.168.56.11", "{}")
        assert str(exc.value) == ('subnet "10.244.0.0/16" specified in the flannel net config doesn\'t contain '
                                  '"10.10.1.0/24" PodCIDR of the "k8s01" node')
        assert api.count("PATCH", "/") == 0
    finally:
        stop.set()


def test_acquire_lease_patches_only_what_differs(api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder]) -> None:
    sm, rec = manager
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    stop = start(sm, rec)
    data = '{"VNI":1,"VtepMAC":"0a:00:00:00:00:01"}'
    try:
        lease = v4_lease(sm, "192.168.56.11", data)
        assert lease == Lease(IPv4Network("10.244.1.0/24"), IPv4Address("192.168.56.11"), "vxlan", data)
        assert api.get_node("k8s01")["metadata"]["annotations"] == flannel_annotations("192.168.56.11", "0a:00:00:00:00:01")
        assert [p for m, p in api.requests if m == "PATCH"] == ["/api/v1/nodes/k8s01/status"]
        rec.wait_for("k8s01")
        v4_lease(sm, "192.168.56.11", data)
        assert api.count("PATCH", "/") == 1, "an unchanged lease must not be written again"
        # A user's public-ip-overwrite wins over the detected address.
        api.patch_node("k8s01", {"metadata": {"annotations": {PREFIX + "public-ip-overwrite": "203.0.113.7"}}})
        rec.wait_for("k8s01")
        assert v4_lease(sm, "192.168.56.11", data).public_ip == IPv4Address("203.0.113.7")
        assert api.get_node("k8s01")["metadata"]["annotations"][PREFIX + "public-ip"] == "203.0.113.7"
        sm.complete_lease()
        cond = [c for c in api.get_node("k8s01")["status"]["conditions"] if c["type"] == "NetworkUnavailable"][0]
        assert (cond["status"], cond["reason"], cond["message"]) == ("False", "FlannelIsUp", "Flannel is running on this node")
    finally:
        stop.set()


def test_patch_error_is_reported(api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder]) -> None:
    sm, rec = manager
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    stop = start(sm, rec)
    try:
        api.fail_next("PATCH", "k8s01", status=403)
        with pytest.raises(LeaseError):
            v4_lease(sm, "192.168.56.11", "{}")
    finally:
        stop.set()


def test_unauthorized_client_gets_api_error(api: FakeKubeAPI) -> None:
    with pytest.raises(ApiError) as exc:
        KubeClient(kube_api_url=api.url).list_nodes(10)
    assert exc.value.status == 401


def test_service_account_token_is_reread_when_rotated(tmp_path: Path) -> None:
    from pyflannel.kubeclient import _TokenFile

    token = tmp_path / "token"
    token.write_text("first\n")
    read = _TokenFile(str(token))
    assert read() == "Bearer first"
    rotated = tmp_path / "token.new"
    rotated.write_text("second")
    rotated.rename(token)  # the kubelet swaps a symlinked directory: a new inode
    assert read() == "Bearer second"


def test_in_cluster_config_needs_the_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ApiError, match="fail to create kubernetes config: unable to load in-cluster configuration"):
        KubeClient()


def test_api_url_overrides_the_kubeconfig_server(api: FakeKubeAPI, tmp_path: Path) -> None:
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://192.0.2.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    api.add_node("n1")
    page = KubeClient(kube_api_url=api.url, kubeconfig_file=str(cfg)).list_nodes(10)
    assert [n["metadata"]["name"] for n in page["items"]] == ["n1"]


def test_own_node_is_read_alone_before_the_list(api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder]) -> None:
    sm, _ = manager
    for i in range(1, 6):
        api.add_node("k8s%02d" % i, pod_cidr="10.244.%d.0/24" % i)
    sm.fetch_own_node()
    assert [p for m, p in api.requests if m == "GET"] == ["/api/v1/nodes?limit=1&fieldSelector=metadata.name%3Dk8s01"]
    assert sm.own_node() == kube.NodeInfo("k8s01", "10.244.1.0/24", (), {})
    assert sm.leases(IPV4) == {} and not sm.synced.is_set()
    lease = v4_lease(sm, "192.168.56.11", "{}")
    assert lease.subnet == IPv4Network("10.244.1.0/24")


# -- one pod-CIDR choice, one paged listing ------------------------------------------------------

def test_ipv4_pod_cidr_is_the_first_ipv4_entry() -> None:
    assert kube.ipv4_pod_cidr(kube.NodeInfo("a", "10.244.1.0/24", (), {})) == "10.244.1.0/24"
    assert kube.ipv4_pod_cidr(kube.NodeInfo("a", "fd00::/64", ("fd00::/64", "10.244.1.0/24", "10.244.2.0/24"), {})) \
        == "10.244.1.0/24"
    assert kube.ipv4_pod_cidr(kube.NodeInfo("a", "fd00::/64", (), {})) == ""
    assert kube.ipv4_pod_cidr(kube.NodeInfo("a", "", (), {})) == ""


def test_own_lease_takes_the_same_pod_cidr_as_the_other_nodes(
        api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder]) -> None:
    sm, _ = manager
    api.add_node("k8s01")
    api.patch_node("k8s01", {"spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "10.244.2.0/24"]}})
    sm.fetch_own_node()
    own = sm.own_node()
    assert own is not None
    lease = v4_lease(sm, "192.168.56.11", "{}")
    assert str(lease.subnet) == kube.ipv4_pod_cidr(own) == "10.244.1.0/24"


def test_list_nodes_pages_oldest_first(api: FakeKubeAPI, client: KubeClient) -> None:
    for name in ("c", "a", "b"):
        api.add_node(name)
        time.sleep(1.05)  # creationTimestamp has whole seconds
    pages: list[float] = []
    nodes, rv = kube.list_nodes(client, PREFIX, page_size=2, on_page=lambda: pages.append(time.monotonic()))
    assert [n.name for n in nodes] == ["c", "a", "b"]
    assert len(pages) == 2 and rv == api.get_node("b")["metadata"]["resourceVersion"]


# -- bad data from other nodes -------------------------------------------------------------------

def bad_node_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == kube.__name__ and r.levelname == "WARNING"]


def test_bad_pod_cidrs_never_become_leases(api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder],
                                           caplog: pytest.LogCaptureFixture) -> None:
    sm, rec = manager
    ann = flannel_annotations
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    api.add_node("k8s02", pod_cidr="10.244.2.0/24", annotations=ann("192.168.56.12", "0a:00:00:00:00:02"))
    stop = start(sm, rec)
    try:
        bad = {
            "outside": "172.31.5.0/24", "half": "0.0.0.0/1", "whole": "10.244.0.0/16", "bigger": "10.0.0.0/8",
            "dup": "10.244.2.0/24", "covers": "10.244.2.0/23", "inside": "10.244.2.128/25", "mine": "10.244.1.0/24",
        }
        for i, (name, cidr) in enumerate(bad.items()):
            api.add_node(name, pod_cidr=cidr, annotations=ann("192.168.56.%d" % (50 + i), "0a:00:00:00:01:%02d" % i))
        api.add_node("v6", annotations=ann("192.168.56.70", "0a:00:00:00:02:00"))
        api.patch_node("v6", {"spec": {"podCIDR": "fd00::/64", "podCIDRs": ["fd00::/64"]}})
        api.add_node("k8s03", pod_cidr="10.244.3.0/24", annotations=ann("192.168.56.13", "0a:00:00:00:00:03"))
        rec.wait_for("k8s03")
        assert sorted(sm.leases(IPV4)) == ["k8s02", "k8s03"]
        assert sm.lease_of("k8s02", IPV4).subnet == IPv4Network("10.244.2.0/24")
        warnings = bad_node_warnings(caplog)
        assert 'Ignoring node "outside": its pod CIDR 172.31.5.0/24 (spec.podCIDR) is outside the Network ' \
               '10.244.0.0/16' in warnings
        assert 'Ignoring node "whole": its pod CIDR 10.244.0.0/16 (spec.podCIDR) is the whole Network 10.244.0.0/16' \
            in warnings
        assert 'Ignoring node "dup": its pod CIDR 10.244.2.0/24 (spec.podCIDR) overlaps the pod CIDR of node ' \
               '"k8s02", which held it first' in warnings
        assert 'Ignoring node "mine": its pod CIDR 10.244.1.0/24 (spec.podCIDR) overlaps the pod CIDR of this node' \
            in warnings
        for name in ("half", "bigger", "covers", "inside"):
            assert sum('"%s"' % name in w for w in warnings) == 1, warnings

        # A relist (410 Gone) says nothing again and changes nothing.
        before = len(bad_node_warnings(caplog))
        lists = api.count("GET", "/api/v1/nodes?limit")
        api.fail_next("GET", r"watch=", status=410, message="too old resource version")
        api.drop_watches()
        deadline = time.monotonic() + 10
        while api.count("GET", "/api/v1/nodes?limit") == lists:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        api.add_node("k8s04", pod_cidr="10.244.4.0/24", annotations=ann("192.168.56.14", "0a:00:00:00:00:04"))
        rec.wait_for("k8s04")
        assert len(bad_node_warnings(caplog)) == before
        assert sorted(sm.leases(IPV4)) == ["k8s02", "k8s03", "k8s04"]

        # The first holder goes: the node that claimed the same subnet first after it takes it over.
        api.delete_node("k8s02")
        rec.wait_for("dup")
        assert sm.lease_of("dup", IPV4).subnet == IPv4Network("10.244.2.0/24")
        assert all(sm.lease_of(name, IPV4) is None for name in ("k8s02", "covers", "inside"))
    finally:
        stop.set()


def test_a_node_that_takes_this_nodes_subnet_later_loses_it(
        api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder]) -> None:
    sm, rec = manager
    api.add_node("k8s02", pod_cidr="10.244.1.0/24", annotations=flannel_annotations("192.168.56.12", "0a:00:00:00:00:02"))
    api.add_node("k8s01")
    stop = start(sm, rec)
    try:
        assert sorted(sm.leases(IPV4)) == ["k8s02"]  # this node has no pod CIDR yet
        api.set_pod_cidr("k8s01", "10.244.1.0/24")
        rec.wait_for("k8s02")
        assert sm.leases(IPV4) == {}
    finally:
        stop.set()


# -- this node's public-ip-overwrite -------------------------------------------------------------

def test_public_ip_overwrite_that_is_not_an_ip_is_ignored(
        api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder], caplog: pytest.LogCaptureFixture) -> None:
    sm, rec = manager
    api.add_node("k8s01", pod_cidr="10.244.1.0/24", annotations={PREFIX + "public-ip-overwrite": "garbage"})
    stop = start(sm, rec)
    try:
        for _ in range(3):
            lease = v4_lease(sm, "192.168.56.11", "{}")
            assert lease.public_ip == IPv4Address("192.168.56.11")
        assert api.get_node("k8s01")["metadata"]["annotations"][PREFIX + "public-ip"] == "192.168.56.11"
        assert bad_node_warnings(caplog) == [
            'Ignoring annotation flannel.alpha.coreos.com/public-ip-overwrite="garbage" of this node: it is not an '
            'IPv4 address; advertising 192.168.56.11']
    finally:
        stop.set()


# -- API pressure and errors ---------------------------------------------------------------------

def test_backoff_is_exponential_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    backoff = kube._Backoff()
    delays = [backoff.next() for _ in range(200)]
    caps = [min(kube.INITIAL_BACKOFF * 2 ** i, kube.MAX_BACKOFF) for i in range(200)]
    assert all(0 <= d <= c for d, c in zip(delays, caps))
    assert len(set(delays)) == len(delays) and max(delays[10:]) > kube.MAX_BACKOFF / 2
    backoff.reset()
    assert backoff.next() <= kube.INITIAL_BACKOFF
    assert kube.PROGRESS_BOUND == 130.0


def test_429_retry_after_is_honoured(api: FakeKubeAPI, manager: tuple[kube.KubeSubnetManager, Recorder]) -> None:
    sm, rec = manager
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    stop = start(sm, rec)
    try:
        api.fail_next("GET", r"watch=", status=429, retry_after=2, message="too many requests, please try again later")
        watches = api.count("GET", "/api/v1/nodes?watch")
        api.drop_watches()
        deadline = time.monotonic() + 5
        while api.count("GET", "/api/v1/nodes?watch") < watches + 1:  # the one that gets the 429
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = time.monotonic()
        while api.count("GET", "/api/v1/nodes?watch") < watches + 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waited = time.monotonic() - refused
        print("retried %.2fs after a 429 with Retry-After: 2" % waited)
        assert waited >= 1.9
        api.add_node("k8s02", pod_cidr="10.244.2.0/24", annotations=flannel_annotations("192.168.56.12", "0a:00:00:00:00:02"))
        rec.wait_for("k8s02")
    finally:
        stop.set()


def test_forbidden_and_unauthorized_are_said_once(api: FakeKubeAPI, client: KubeClient, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kube, "MAX_BACKOFF", 0.05)
    api.add_node("k8s01", pod_cidr="10.244.1.0/24")
    forbidden = 'nodes is forbidden: User "system:serviceaccount:kube-flannel:flannel" cannot list resource ' \
                '"nodes" in API group "" at the cluster scope'
    api.fail_next("GET", r"limit=", status=403, count=5, message=forbidden)
    sm = kube.KubeSubnetManager(client, "k8s01", KEYS, PREFIX, {IPV4: NETWORK}, Recorder())
    stop = threading.Event()
    threading.Thread(target=sm.run, args=(stop,), daemon=True).start()
    try:
        sm.wait_synced(stop, timeout=10)
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert errors == ["Failed to list nodes: %s: forbidden: the user of %s needs list and watch on nodes "
                          "(ClusterRole flannel)" % (forbidden, tmp_path / "kubeconfig")]
    finally:
        stop.set()
    with pytest.raises(ApiError) as exc:
        KubeClient(kube_api_url=api.url).list_nodes(1)
    assert str(exc.value) == "Unauthorized: this client sent no credentials; give it a --kubeconfig-file"


def test_connections_have_timeouts_and_keepalive(api: FakeKubeAPI, client: KubeClient) -> None:
    import socket

    from pyflannel import kubeclient

    seen: list[float | None] = []
    conn = kubeclient._HTTPConnection(api.url.removeprefix("http://"), timeout=42)
    kubeclient._open(conn, lambda: (seen.append(conn.timeout), http_connect(conn)))
    assert seen == [kubeclient.CONNECT_TIMEOUT]  # the timeout in force while connecting
    sock = conn.sock
    assert sock.gettimeout() == 42
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == kubeclient.KEEPALIVE_IDLE
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == kubeclient.USER_TIMEOUT * 1000
    conn.close()


def http_connect(conn: object) -> None:
    import http.client

    http.client.HTTPConnection.connect(conn)  # type: ignore[arg-type]


def test_progress_advances_with_bookmarks(client: KubeClient, tmp_path: Path) -> None:
    server = FakeKubeAPI(token="t0ken", bookmark_interval=0.2)
    server.start()
    try:
        cfg = tmp_path / "kubeconfig2"
        cfg.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": server.url}}],
            "users": [{"name": "u", "user": {"token": "t0ken"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        }))
        server.add_node("k8s01", pod_cidr="10.244.1.0/24")
        rec = Recorder()
        sm = kube.KubeSubnetManager(KubeClient(kubeconfig_file=str(cfg)), "k8s01", KEYS, PREFIX, {IPV4: NETWORK}, rec)
        stop = start(sm, rec)
        try:
            first = sm.progress
            time.sleep(1)
            assert sm.progress > first and time.monotonic() - sm.progress < 0.5
        finally:
            stop.set()
    finally:
        server.stop()


# -- in-cluster over HTTPS -----------------------------------------------------------------------

def test_in_cluster_https_with_a_rotating_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.kubeapi import make_test_certs, tls_context

    ca, cert, key = make_test_certs(str(tmp_path))
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(Path(ca).read_bytes())
    (sa / "token").write_text("token-1\n")
    server = FakeKubeAPI(token="token-1")
    url = server.start(tls=tls_context(cert, key))
    try:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", url.rsplit(":", 1)[1])
        server.add_node("k8s01", pod_cidr="10.244.1.0/24")
        client = KubeClient(service_account=str(sa))
        assert client.host == url
        rec = Recorder()
        sm = kube.KubeSubnetManager(client, "k8s01", KEYS, PREFIX, {IPV4: NETWORK}, rec)
        stop = start(sm, rec)
        try:
            server.add_node("k8s02", pod_cidr="10.244.2.0/24",
                            annotations=flannel_annotations("192.168.56.12", "0a:00:00:00:00:02"))
            rec.wait_for("k8s02")
            # The kubelet rotates the token; from now on the server takes only the new one.
            new = sa / "token.new"
            new.write_text("token-2\n")
            new.rename(sa / "token")
            server.token = "token-2"
            server.drop_watches()
            server.add_node("k8s03", pod_cidr="10.244.3.0/24",
                            annotations=flannel_annotations("192.168.56.13", "0a:00:00:00:00:03"))
            rec.wait_for("k8s03", timeout=10)
            v4_lease(sm, "192.168.56.11", "{}")
            assert server.get_node("k8s01")["metadata"]["annotations"][PREFIX + "public-ip"] == "192.168.56.11"
        finally:
            stop.set()
    finally:
        server.stop()
    bad = FakeKubeAPI(token="other")
    url = bad.start(tls=tls_context(cert, key))
    try:
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", url.rsplit(":", 1)[1])
        with pytest.raises(ApiError) as exc:
            KubeClient(service_account=str(sa)).list_nodes(1)
        assert str(exc.value) == "Unauthorized: the token at %s was refused" % (sa / "token")
    finally:
        bad.stop()
