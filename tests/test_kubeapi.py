"""tools.kubeapi.FakeKubeAPI driven by the real kubernetes client over HTTP."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tools.kubeapi import FakeKubeAPI, realistic_node

TOKEN = "t0ken"

CoreFactory = Callable[..., client.CoreV1Api]


@pytest.fixture
def core() -> Iterator[CoreFactory]:
    """Makes a CoreV1Api for a server, with a bearer token if given."""
    clients: list[client.ApiClient] = []

    def make(server: FakeKubeAPI, token: str | None = None) -> client.CoreV1Api:
        cfg = client.Configuration(host=server.url)
        if token is not None:
            cfg.api_key = {"BearerToken": token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
        clients.append(client.ApiClient(cfg))
        return client.CoreV1Api(clients[-1])

    yield make
    for api_client in clients:
        api_client.close()


def raw(server: FakeKubeAPI) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=5)


def status_body(exc: ApiException) -> dict[str, Any]:
    return json.loads(exc.body)


def test_list_pages_with_limit_and_continue(api: FakeKubeAPI, core: CoreFactory) -> None:
    for i in (5, 3, 0, 6, 1, 4, 2):
        api.add_node("node-%d" % i, "10.244.%d.0/24" % i)
    v1 = core(api)
    names, rvs, cont, pages = [], set(), None, 0
    while True:
        page = v1.list_node(limit=3, _continue=cont)
        pages += 1
        names += [n.metadata.name for n in page.items]
        rvs.add(page.metadata.resource_version)
        cont = page.metadata._continue
        if not cont:
            break
        assert page.metadata.remaining_item_count == 7 - len(names)
    assert pages == 3
    assert names == ["node-%d" % i for i in range(7)]
    assert len(rvs) == 1
    first = v1.list_node().items[0]
    assert first.spec.pod_cidr == "10.244.0.0/24" and first.spec.pod_cidrs == ["10.244.0.0/24"]
    assert first.metadata.uid and first.metadata.creation_timestamp and first.metadata.resource_version


def test_list_continue_skips_deleted_and_sees_added(api: FakeKubeAPI, core: CoreFactory) -> None:
    for name in ("a", "c", "e", "g"):
        api.add_node(name)
    v1 = core(api)
    page = v1.list_node(limit=2)
    api.delete_node("e")
    api.add_node("d")
    rest = v1.list_node(limit=10, _continue=page.metadata._continue)
    assert [n.metadata.name for n in rest.items] == ["d", "g"]
    assert rest.metadata.resource_version == page.metadata.resource_version
    with pytest.raises(ApiException) as err:
        v1.list_node(_continue="not-a-token")
    assert err.value.status == 400


def test_watch_from_list_rv_sees_added_modified_deleted(api: FakeKubeAPI, core: CoreFactory) -> None:
    api.add_node("old")
    v1 = core(api)
    rv = v1.list_node().metadata.resource_version
    api.add_node("n1", annotations={"x": "1"})  # before the watch: replayed from the history
    events = []
    w = watch.Watch()
    for ev in w.stream(v1.list_node, resource_version=rv, timeout_seconds=5):
        events.append((ev["type"], ev["object"].metadata.name, int(ev["object"].metadata.resource_version),
                       ev["object"].spec.pod_cidr))
        if len(events) == 1:
            api.set_pod_cidr("n1", "10.244.9.0/24")
        elif len(events) == 2:
            api.delete_node("n1")
        else:
            w.stop()
    assert [e[:2] for e in events] == [("ADDED", "n1"), ("MODIFIED", "n1"), ("DELETED", "n1")]
    assert [e[2] for e in events] == [int(rv) + 1, int(rv) + 2, int(rv) + 3]
    assert events[2][3] == "10.244.9.0/24"  # DELETED carries the last state
    assert api.node_names() == ["old"]


def test_watch_from_zero_lists_then_times_out_with_bookmarks(core: CoreFactory) -> None:
    server = FakeKubeAPI(bookmark_interval=0.3)
    server.start()
    try:
        server.add_node("a")
        server.add_node("b")
        resp = core(server).list_node(watch=True, timeout_seconds=1, allow_watch_bookmarks=True,
                                      _preload_content=False)
        assert resp.headers["Transfer-Encoding"] == "chunked"
        start = time.monotonic()
        lines = [json.loads(line) for line in watch.watch.iter_resp_lines(resp)]
        elapsed = time.monotonic() - start
        resp.release_conn()
    finally:
        server.stop()
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in lines[:2]] == [("ADDED", "a"), ("ADDED", "b")]
    bookmarks = lines[2:]
    assert 2 <= len(bookmarks) <= 4 and {e["type"] for e in bookmarks} == {"BOOKMARK"}
    assert bookmarks[0]["object"] == {"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": "3"}}
    assert 0.9 < elapsed < 1.5


def test_watch_before_compact_is_gone(api: FakeKubeAPI, core: CoreFactory) -> None:
    api.add_node("n1")
    v1 = core(api)
    rv = v1.list_node().metadata.resource_version
    api.set_pod_cidr("n1", "10.244.1.0/24")
    api.compact()
    with pytest.raises(ApiException) as err:
        for _ in watch.Watch().stream(v1.list_node, resource_version=rv):
            pass
    assert err.value.status == 410

    resp = v1.list_node(watch=True, resource_version=rv, _preload_content=False)
    events = [json.loads(line) for line in watch.watch.iter_resp_lines(resp)]
    assert events == [{"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version: %s (%d)" % (rv, int(rv) + 1), "reason": "Expired", "code": 410}}]

    current = v1.list_node().metadata.resource_version  # a fresh list's RV is watchable again
    api.add_node("n2")
    w = watch.Watch()
    for ev in w.stream(v1.list_node, resource_version=current, timeout_seconds=5):
        assert (ev["type"], ev["object"].metadata.name) == ("ADDED", "n2")
        w.stop()
        break
    else:
        pytest.fail("no event")


def test_history_overflow_expires_old_resource_versions(core: CoreFactory) -> None:
    server = FakeKubeAPI(history=3)
    server.start()
    try:
        v1 = core(server)
        rv = int(v1.list_node().metadata.resource_version)
        for i in range(5):
            server.add_node("n%d" % i)
        for since, expected in ((rv, "ERROR"), (rv + 2, "ADDED")):
            resp = v1.list_node(watch=True, resource_version=str(since), timeout_seconds=1, _preload_content=False)
            first = json.loads(next(watch.watch.iter_resp_lines(resp)))
            resp.close()
            assert first["type"] == expected
    finally:
        server.stop()


def test_patch_node_status_strategic_merge(api: FakeKubeAPI, core: CoreFactory) -> None:
    api.add_node("n1", "10.244.1.0/24", annotations={"keep": "me"}, realistic=True)
    before = api.get_node("n1")
    v1 = core(api)
    patch = {
        "metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "10.0.0.1", "keep": None}},
        "spec": {"podCIDR": "10.244.99.0/24"},  # ignored by the status subresource
        "status": {"conditions": [
            {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp",
             "message": "Flannel is running on this node"},
            {"type": "Ready", "status": "False", "reason": "KubeletNotReady"},
        ]},
    }
    node = v1.patch_node_status("n1", patch)
    assert node.metadata.annotations["flannel.alpha.coreos.com/public-ip"] == "10.0.0.1"
    assert "keep" not in node.metadata.annotations
    assert node.metadata.annotations["node.alpha.kubernetes.io/ttl"] == "0"
    assert node.spec.pod_cidr == "10.244.1.0/24"
    conditions = {c.type: c for c in node.status.conditions}
    assert len(node.status.conditions) == len(before["status"]["conditions"]) + 1
    assert conditions["NetworkUnavailable"].reason == "FlannelIsUp"
    assert conditions["Ready"].status == "False" and conditions["Ready"].reason == "KubeletNotReady"
    assert conditions["Ready"].message == "kubelet is posting ready status"  # merged, not replaced
    assert conditions["MemoryPressure"].status == "False"
    rv = int(node.metadata.resource_version)
    assert rv == int(before["metadata"]["resourceVersion"]) + 1

    assert int(v1.patch_node_status("n1", patch).metadata.resource_version) == rv  # no change, no new RV

    node = v1.patch_node("n1", {"spec": {"unschedulable": True}, "status": {"conditions": []}},
                         _content_type="application/merge-patch+json")
    assert node.spec.unschedulable and len(node.status.conditions) == 6  # nodes/<name> keeps the status
    with pytest.raises(ApiException) as err:
        v1.patch_node("n1", [{"op": "remove", "path": "/spec/unschedulable"}])  # JSON patch
    assert err.value.status == 415


def test_node_crud_errors(api: FakeKubeAPI, core: CoreFactory) -> None:
    v1 = core(api)
    created = v1.create_node({"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.244.1.0/24"}})
    assert created.metadata.uid and created.metadata.resource_version
    with pytest.raises(ApiException) as err:
        v1.create_node({"metadata": {"name": "n1"}})
    assert err.value.status == 409 and status_body(err.value)["reason"] == "AlreadyExists"

    body = api.get_node("n1")
    body["metadata"]["labels"] = {"role": "x"}
    assert v1.replace_node("n1", body).metadata.labels == {"role": "x"}
    with pytest.raises(ApiException) as err:
        v1.replace_node("n1", body)  # body's resourceVersion is stale now
    assert err.value.status == 409

    v1.delete_node("n1")
    for call in (lambda: v1.delete_node("n1"), lambda: v1.read_node("n1")):
        with pytest.raises(ApiException) as err:
            call()
        assert err.value.status == 404
        assert status_body(err.value) == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                          "message": 'nodes "n1" not found', "reason": "NotFound", "code": 404}


def test_bearer_token_required(core: CoreFactory) -> None:
    server = FakeKubeAPI(token=TOKEN)
    server.start()
    try:
        server.add_node("n1")
        with pytest.raises(ApiException) as err:
            core(server).list_node()
        assert err.value.status == 401 and status_body(err.value)["reason"] == "Unauthorized"
        with pytest.raises(ApiException) as err:
            core(server, "wrong").read_node("n1")
        assert err.value.status == 401
        assert [n.metadata.name for n in core(server, TOKEN).list_node().items] == ["n1"]
    finally:
        server.stop()


def test_fail_next_answers_once_then_works(api: FakeKubeAPI, core: CoreFactory) -> None:
    api.add_node("n1")
    v1 = core(api)
    api.fail_next("GET", r"^/api/v1/nodes/n1$")
    api.fail_next("PATCH", r"/status$", status=503, count=2)
    with pytest.raises(ApiException) as err:
        v1.read_node("n1")
    assert err.value.status == 500 and status_body(err.value)["reason"] == "InternalError"
    assert v1.read_node("n1").metadata.name == "n1"
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            v1.patch_node_status("n1", {"metadata": {"annotations": {"a": "b"}}})
        assert err.value.status == 503
    v1.patch_node_status("n1", {"metadata": {"annotations": {"a": "b"}}})
    assert api.count("GET", "/api/v1/nodes/n1") == 2
    assert api.count("PATCH", "/api/v1/nodes/n1/status") == 3
    assert ("GET", "/api/v1/nodes/n1") in api.requests


def test_drop_watches_ends_open_stream(api: FakeKubeAPI, core: CoreFactory) -> None:
    api.add_node("n1")
    v1 = core(api)
    received: list[str] = []
    ended = threading.Event()

    def consume() -> None:
        try:
            for ev in watch.Watch().stream(v1.list_node, timeout_seconds=30):
                received.append(ev["type"])
        except urllib3.exceptions.ProtocolError:
            pass  # the stream was cut mid-chunk, as when an apiserver goes away
        ended.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    deadline = time.monotonic() + 2
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    api.drop_watches()
    assert ended.wait(1)
    assert received == ["ADDED"]
    assert v1.read_node("n1").metadata.name == "n1"  # the server keeps serving


def test_get_pod(api: FakeKubeAPI, core: CoreFactory) -> None:
    api.add_pod("kube-flannel", "kube-flannel-ds-abcde", "node-7")
    v1 = core(api)
    pod = v1.read_namespaced_pod("kube-flannel-ds-abcde", "kube-flannel")
    assert pod.spec.node_name == "node-7" and pod.metadata.namespace == "kube-flannel"
    with pytest.raises(ApiException) as err:
        v1.read_namespaced_pod("missing", "kube-flannel")
    assert err.value.status == 404


def test_realistic_node() -> None:
    node = realistic_node("worker-17", "10.244.17.0/24", "10.0.1.17")
    assert 10_000 < len(json.dumps(node)) < 13_000
    assert node == realistic_node("worker-17", "10.244.17.0/24", "10.0.1.17")
    assert node != realistic_node("worker-18", "10.244.17.0/24", "10.0.1.17")
    assert len(node["status"]["images"]) == 40 and len(node["status"]["conditions"]) == 5
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "10.0.1.17"}
    assert len(realistic_node("w", None, "10.0.0.1", images=2)["status"]["images"]) == 2


def test_realistic_node_through_client(api: FakeKubeAPI, core: CoreFactory) -> None:
    api.add_node("worker-1", "10.244.1.0/24", realistic=True)
    node = core(api).read_node("worker-1")
    assert node.status.node_info.kubelet_version.startswith("v1.")
    assert node.status.addresses[0].type == "InternalIP"
    assert len(node.status.images[0].names) == 2


def test_raw_http_keep_alive_and_unknown_path(api: FakeKubeAPI) -> None:
    api.add_node("n1")
    conn = raw(api)
    conn.request("GET", "/api/v1/nodes/n1")
    first = conn.getresponse()
    assert json.loads(first.read())["metadata"]["name"] == "n1"
    sock = conn.sock
    conn.request("GET", "/apis/apps/v1/deployments")
    second = conn.getresponse()
    assert conn.sock is sock  # the same connection
    assert second.status == 404 and json.loads(second.read())["reason"] == "NotFound"
    conn.request("POST", "/api/v1/nodes/n1", body=b"{}")
    assert conn.getresponse().status == 405
    conn.close()


def test_stop_is_quick_with_open_connections(core: CoreFactory) -> None:
    server = FakeKubeAPI()
    server.start()
    server.add_node("n1")
    v1 = core(server)
    v1.list_node()  # leaves an idle keep-alive connection in the pool
    resp = v1.list_node(watch=True, _preload_content=False)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 1
    resp.close()
