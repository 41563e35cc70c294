"""The node list and watch decoders: the same NodeInfo as from the whole JSON, for any page the API server
sends; pages over the size bound read again in smaller pages; a node that cannot be read skipped alone."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from pyflannel import kubeclient
from pyflannel.kubeclient import KubeClient
from pyflannel.subnet import kube
from tools.kubeapi import FakeKubeAPI, realistic_node

PREFIX = "flannel.alpha.coreos.com/"


def infos(page: dict) -> list[kube.NodeInfo]:
    return [kube.node_info(obj, PREFIX) for obj in page.get("items") or ()]


def realistic_items(count: int) -> list[dict[str, Any]]:
    items = []
    for i in range(count):
        node = realistic_node("node-%d" % i, None if i == 1 else "10.244.%d.0/24" % i, "192.168.56.%d" % (10 + i))
        node["metadata"]["annotations"][PREFIX + "backend-data"] = '{"VNI":1,"VtepMAC":"0a:00:00:00:00:0%d"}' % i
        node["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
        items.append(node)
    if count > 2:
        items[2]["spec"]["podCIDRs"] = ["10.244.2.0/24", "fd00::/64"]
    return items


def test_a_large_page_gives_what_the_whole_json_gives_less_the_rest() -> None:
    raw = json.dumps({"kind": "NodeList", "metadata": {"resourceVersion": "7", "continue": "abc"},
                      "items": realistic_items(8)}).encode()
    assert len(raw) > kube.SMALL_JSON
    page = kube.decode_node_list(raw)
    assert page["metadata"] == {"resourceVersion": "7", "continue": "abc"}
    assert infos(page) == infos(json.loads(raw))
    assert "status" not in page["items"][0] and "labels" not in page["items"][0]["metadata"]
    assert "managedFields" not in page["items"][0]["metadata"]


def test_a_small_page_or_event_is_parsed_whole() -> None:
    raw = json.dumps({"items": realistic_items(1)}).encode()
    assert kube.decode_node_list(raw) == json.loads(raw)
    event = json.dumps({"type": "MODIFIED", "object": realistic_items(1)[0]}).encode()
    assert kube.decode_watch_event(event) == json.loads(event)


def test_a_large_watch_event_keeps_what_flannel_reads() -> None:
    node = realistic_items(1)[0]
    node["status"]["images"] = [{"names": ["a"]}] * 10000
    event = kube.decode_watch_event(json.dumps({"type": "MODIFIED", "object": node}).encode())
    meta = node["metadata"]
    assert event == {"type": "MODIFIED", "object": {
        "metadata": {k: meta[k] for k in ("name", "annotations")},
        "spec": {k: node["spec"][k] for k in ("podCIDR", "podCIDRs")}}}
    error = kube.decode_watch_event(json.dumps({"type": "ERROR", "object": {
        "kind": "Status", "code": 410, "message": "too old", "details": {"x": ["y"] * 20000}}}).encode())
    assert error["object"] == {"code": 410, "message": "too old"}


def test_list_nodes_decodes_with_the_given_decoder(api: FakeKubeAPI) -> None:
    for i in range(8):
        api.add_node("n%d" % i, pod_cidr="10.244.%d.0/24" % i, annotations={PREFIX + "public-ip": "192.168.56.11"},
                     internal_ip="192.168.56.11", realistic=True)
    client = KubeClient(kube_api_url=api.url)
    page = client.list_nodes(10, decode=kube.decode_node_list)
    assert infos(page) == infos(client.list_nodes(10))
    assert "status" not in page["items"][0]


def test_a_page_over_the_bound_is_read_again_in_smaller_pages(api: FakeKubeAPI,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(25):
        api.add_node("n%02d" % i, pod_cidr="10.244.%d.0/24" % i, realistic=True)
    api.patch_node("n07", {"status": {"images": [{"names": ["x" * 100]}] * 2000}})  # some 230 KB
    monkeypatch.setattr(kubeclient, "MAX_BODY", 240_000)
    nodes, _ = kube.list_nodes(KubeClient(kube_api_url=api.url), PREFIX, page_size=20)
    assert sorted(n.name for n in nodes) == ["n%02d" % i for i in range(25)]
    limits = [p.split("limit=")[1].split("&")[0] for m, p in api.requests if "limit=" in p]
    assert limits[0] == "20" and "2" in limits and "20" in limits[1:]  # split, then back to whole pages


def test_a_node_larger_than_the_bound_fails_the_list_with_a_clear_error(
        api: FakeKubeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    api.add_node("big", pod_cidr="10.244.1.0/24", realistic=True)
    api.patch_node("big", {"status": {"images": [{"names": ["x" * 100]}] * 2000}})
    monkeypatch.setattr(kubeclient, "MAX_BODY", 100_000)
    with pytest.raises(kubeclient.ApiError, match="the node list holds a node of more than"):
        kube.list_nodes(KubeClient(kube_api_url=api.url), PREFIX)


def test_a_node_that_cannot_be_read_is_skipped_alone(api: FakeKubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(6):
        api.add_node("n%d" % i, pod_cidr="10.244.%d.0/24" % i, realistic=True)
    # Types the API server never stores: a small node json.loads reads, and a large one msgspec reads.
    api.patch_node("n2", {"metadata": {"annotations": {PREFIX + "public-ip": 5}}})
    api.patch_node("n4", {"spec": {"podCIDRs": "10.244.4.0/24"}, "status": {"images": [{"names": ["a"]}] * 8000}})
    with caplog.at_level(logging.WARNING):
        nodes, _ = kube.list_nodes(KubeClient(kube_api_url=api.url), PREFIX)
    assert [n.name for n in nodes] == ["n0", "n1", "n3", "n5"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith('Skipping node "n2" of the node list: metadata.annotations is not a map') for w in warnings)
    assert any(w.startswith("Skipping a node of the node list that cannot be read: ") for w in warnings), warnings


def test_a_large_event_is_read_without_the_nodes_managed_fields_and_status() -> None:
    node = realistic_items(3)[2]
    node["status"]["images"] = [{"names": ["a"]}] * 10000
    bulky = json.loads(json.dumps(node))
    bulky["metadata"]["managedFields"][0]["fieldsV1"] = {"f:%06d" % i: {} for i in range(10000)}
    for obj in (node, bulky):
        raw = json.dumps({"type": "MODIFIED", "object": obj}, separators=(",", ":")).encode()
        whole = kube._decode(raw, kube._WatchEvent)  # type: ignore[attr-defined]
        assert kube._cut_event(raw) == whole  # type: ignore[attr-defined]
        assert kube.decode_watch_event(memoryview(raw)) == whole
    # Managed fields whose trie holds a "spec" (the API server refuses such keys): the node's own spec is read.
    node["metadata"]["managedFields"][0]["fieldsV1"] = {"f:x": {}, "spec": {"podCIDR": "10.9.0.0/16"}}
    raw = json.dumps({"type": "MODIFIED", "object": node}, separators=(",", ":")).encode()
    assert kube._cut_event(raw) is None  # type: ignore[attr-defined]  # the cut there does not decode
    raw = json.dumps({"type": "MODIFIED", "object": node}, separators=(",", ":")).encode()
    assert kube.decode_watch_event(raw)["object"]["spec"]["podCIDR"] == "10.244.2.0/24"
    # Another order (not the API server's): the status first, or the spec missing before it: read whole.
    reordered = {"status": node["status"], "spec": node["spec"], "metadata": node["metadata"]}
    for obj in (reordered, {k: v for k, v in node.items() if k != "spec"} | {"spec": node["spec"]}):
        raw = json.dumps({"type": "MODIFIED", "object": obj}, separators=(",", ":")).encode()
        event = kube.decode_watch_event(raw)
        assert event["object"]["spec"]["podCIDRs"] == ["10.244.2.0/24", "fd00::/64"]
        assert event["object"]["metadata"]["name"] == "node-2"
