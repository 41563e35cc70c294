"""The node list decoder: the same NodeInfo as from the whole JSON, for any page the API server sends."""

from __future__ import annotations

import json

from pyflannel.kubeclient import KubeClient
from pyflannel.subnet import kube
from tools.kubeapi import FakeKubeAPI, realistic_node

PREFIX = "flannel.alpha.coreos.com/"


def infos(page: dict) -> list[kube.NodeInfo]:
    return [kube.node_info(obj, PREFIX) for obj in page.get("items") or ()]


def test_realistic_page_gives_what_the_whole_json_gives() -> None:
    items = []
    for i, cidr in enumerate(["10.244.1.0/24", None, "10.244.3.0/24"]):
        node = realistic_node("node-%d" % i, cidr, "192.168.56.%d" % (10 + i))
        node["metadata"]["annotations"][PREFIX + "backend-data"] = '{"VNI":1,"VtepMAC":"0a:00:00:00:00:0%d"}' % i
        node["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
        items.append(node)
    items[2]["spec"]["podCIDRs"] = ["10.244.3.0/24", "fd00::/64"]
    raw = json.dumps({"kind": "NodeList", "metadata": {"resourceVersion": "7", "continue": "abc"},
                      "items": items}).encode()
    page = kube.decode_node_list(raw)
    assert page["metadata"] == {"resourceVersion": "7", "continue": "abc"}
    assert infos(page) == infos(json.loads(raw))
    assert "status" not in page["items"][0] and "labels" not in page["items"][0]["metadata"]


def test_unexpected_shapes_are_parsed_whole() -> None:
    for raw in (b'{"items":[{"metadata":null}]}', b'{"items":[{"metadata":{"name":"a"},"spec":{"podCIDRs":null}}]}',
                b'{"items":[{"metadata":{"name":"a","annotations":{"x":1}}}]}', b'{"items":null}'):
        assert kube.decode_node_list(raw) == json.loads(raw)


def test_list_nodes_decodes_with_the_given_decoder() -> None:
    api = FakeKubeAPI()
    url = api.start()
    try:
        api.add_node("n1", pod_cidr="10.244.1.0/24", annotations={PREFIX + "public-ip": "192.168.56.11"},
                     internal_ip="192.168.56.11", realistic=True)
        client = KubeClient(kube_api_url=url)
        page = client.list_nodes(10, decode=kube.decode_node_list)
        assert infos(page) == infos(client.list_nodes(10))
        assert "status" not in page["items"][0]
    finally:
        api.stop()
