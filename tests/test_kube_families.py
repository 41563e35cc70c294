"""The kube subnet manager per family: dual-stack and IPv6-only leases, the mismatch matrix (spec §2.3),
the annotations flanneld v0.20.2 writes (§3.2, §3.3), and remote nodes validated per family."""

from __future__ import annotations

import copy
import json
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

import pytest

from pyflannel.family import IPV4, IPV6, Family, IPNetwork
from pyflannel.lease import Lease, LeaseError
from pyflannel.subnet import kube
from pyflannel.subnet.annotations import AnnotationKeys

P = "flannel.alpha.coreos.com/"
KEYS = AnnotationKeys.from_prefix(P)
NET4, NET6 = IPv4Network("10.244.0.0/16"), IPv6Network("fd00:10:244::/56")
DUAL: dict[Family, IPNetwork] = {IPV4: NET4, IPV6: NET6}
MAC4, MAC6 = "6e:4b:3c:91:a2:10", "8a:3c:1f:2d:4e:50"
DATA4, DATA6 = '{"VNI":1,"VtepMAC":"%s"}' % MAC4, '{"VNI":1,"VtepMAC":"%s"}' % MAC6
IP4, IP6 = ip_address("192.168.56.11"), ip_address("fd56::11")


class RecordingClient:
    """The API client boundary: nodes in memory; the PATCH bodies as sent on the wire (compact JSON)."""

    def __init__(self, *nodes: dict[str, Any]) -> None:
        self.nodes = {n["metadata"]["name"]: n for n in nodes}
        self.bodies: list[str] = []

    def list_nodes(self, limit: int, cont: str = "", field_selector: str = "", decode: Any = None) -> dict[str, Any]:
        name = field_selector.partition("=")[2]
        return {"metadata": {"resourceVersion": "1"},
                "items": [copy.deepcopy(n) for n in self.nodes.values() if not name or n["metadata"]["name"] == name]}

    def patch_node_status(self, name: str, patch: dict[str, Any]) -> None:
        self.bodies.append(json.dumps(patch, separators=(",", ":")))
        self.nodes[name]["metadata"].setdefault("annotations", {}).update(patch["metadata"]["annotations"])


def node(name: str, *cidrs: str, **annotations: str) -> dict[str, Any]:
    spec = {"podCIDR": cidrs[0], "podCIDRs": list(cidrs)} if cidrs else {}
    return {"metadata": {"name": name, "annotations": {P + k.replace("_", "-"): v for k, v in annotations.items()}},
            "spec": spec}


def peer(name: str, i: int, *cidrs: str, **extra: str) -> dict[str, Any]:
    """A dual-stack flannel peer with its annotations."""
    ann = {"kube_subnet_manager": "true", "backend_type": "vxlan", "public_ip": "192.168.56.%d" % (10 + i),
           "public_ipv6": "fd56::%d" % (10 + i), "backend_data": '{"VNI":1,"VtepMAC":"0a:00:00:00:00:%02x"}' % i,
           "backend_v6_data": '{"VNI":1,"VtepMAC":"0a:00:00:00:06:%02x"}' % i}
    ann.update(extra)
    return node(name, *(cidrs or ("10.244.%d.0/24" % i, "fd00:10:244:%x::/64" % i)), **ann)


def manager(client: RecordingClient, networks: dict[Family, IPNetwork] = DUAL) -> kube.KubeSubnetManager:
    sm = kube.KubeSubnetManager(client, "k8s01", KEYS, P, networks, lambda names, changed_at: None)  # type: ignore[arg-type]
    sm._list()
    return sm


def acquire(sm: kube.KubeSubnetManager, backend_type: str = "vxlan",
            data: dict[Family, str] | None = None) -> dict[Family, Lease]:
    public = {f: a for f, a in ((IPV4, IP4), (IPV6, IP6)) if f in sm.networks}
    return sm.acquire_lease(public, backend_type, data or {f: d for f, d in ((IPV4, DATA4), (IPV6, DATA6))
                                                           if f in sm.networks})


# --- own lease and annotations ----------------------------------------------------------------------------

def test_dual_stack_first_patch_is_flanneld_s() -> None:
    """Spec §3.2: the captured first PATCH of a dual-stack vxlan node, byte for byte."""
    client = RecordingClient(node("k8s01", "10.244.0.0/24", "fd00:10:244::/64"))
    sm = manager(client)
    leases = acquire(sm)
    assert client.bodies == [
        '{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":"{\\"VNI\\":1,\\"VtepMAC\\":'
        '\\"6e:4b:3c:91:a2:10\\"}","flannel.alpha.coreos.com/backend-type":"vxlan","flannel.alpha.coreos.com/backe'
        'nd-v6-data":"{\\"VNI\\":1,\\"VtepMAC\\":\\"8a:3c:1f:2d:4e:50\\"}","flannel.alpha.coreos.com/kube-subnet-'
        'manager":"true","flannel.alpha.coreos.com/public-ip":"192.168.56.11","flannel.alpha.coreos.com/public-ipv6":'
        '"fd56::11"}}}']
    assert leases == {IPV4: Lease(IPv4Network("10.244.0.0/24"), IP4, "vxlan", DATA4),
                      IPV6: Lease(IPv6Network("fd00:10:244::/64"), IP6, "vxlan", DATA6)}
    acquire(sm)
    assert len(client.bodies) == 1  # a restart with the same values sends nothing


@pytest.mark.parametrize("backend,networks,written", [
    ("vxlan", {IPV4: NET4}, {"backend-data": DATA4, "public-ip": "192.168.56.11"}),
    ("vxlan", {IPV6: NET6}, {"backend-v6-data": DATA6, "public-ipv6": "fd56::11"}),
    ("host-gw", {IPV4: NET4}, {"backend-data": "null", "public-ip": "192.168.56.11"}),
    ("host-gw", DUAL, {"backend-data": "null", "public-ip": "192.168.56.11", "backend-v6-data": "null",
                       "public-ipv6": "fd56::11"}),
    ("host-gw", {IPV6: NET6}, {"backend-data": "null", "public-ip": "0.0.0.0", "backend-v6-data": "null",
                               "public-ipv6": "fd56::11"}),
])
def test_annotation_rows(backend: str, networks: dict[Family, IPNetwork], written: dict[str, str]) -> None:
    """Spec §3.2's table: each backend and stack writes exactly these keys (and kube-subnet-manager)."""
    client = RecordingClient(node("k8s01", "10.244.0.0/24", "fd00:10:244::/64"))
    sm = manager(client, networks)
    data = {f: "null" if backend == "host-gw" else d for f, d in ((IPV4, DATA4), (IPV6, DATA6)) if f in networks}
    leases = acquire(sm, backend, data)
    assert list(leases) == list(networks)
    annotations = json.loads(client.bodies[0])["metadata"]["annotations"]
    assert annotations == {P + k: v for k, v in {**written, "backend-type": backend,
                                                  "kube-subnet-manager": "true"}.items()}
    assert list(annotations) == sorted(annotations)


def test_ipv6_only_lease_and_restart_sends_nothing() -> None:
    client = RecordingClient(node("k8s01", "fd00:10:244:5::/64"))
    sm = manager(client, {IPV6: NET6})
    assert acquire(sm) == {IPV6: Lease(IPv6Network("fd00:10:244:5::/64"), IP6, "vxlan", DATA6)}
    acquire(sm)
    assert len(client.bodies) == 1  # flanneld sends an empty {} PATCH on every restart; nothing is needed


def test_public_ipv6_overwrite(caplog: pytest.LogCaptureFixture) -> None:
    """Spec §3.3: validated like the IPv4 one; only the advertised address changes."""
    caplog.set_level("INFO")
    client = RecordingClient(node("k8s01", "10.244.0.0/24", "fd00:10:244::/64", public_ipv6_overwrite="2001:db8::7",
                                  public_ip_overwrite="203.0.113.7"))
    leases = acquire(manager(client))
    assert (leases[IPV4].public_ip, leases[IPV6].public_ip) == (ip_address("203.0.113.7"), ip_address("2001:db8::7"))
    assert P + "public-ipv6\":\"2001:db8::7" in client.bodies[0]
    assert "Overriding public ipv6 with '2001:db8::7' from node annotation " \
           "'flannel.alpha.coreos.com/public-ipv6-overwrite'" in caplog.messages
    assert "Overriding public ip with '203.0.113.7' from node annotation " \
           "'flannel.alpha.coreos.com/public-ip-overwrite'" in caplog.messages
    for bad in ("192.168.56.99", "fd56::zz"):
        client = RecordingClient(node("k8s01", "10.244.0.0/24", "fd00:10:244::/64", public_ipv6_overwrite=bad))
        assert acquire(manager(client))[IPV6].public_ip == IP6
        assert ('Ignoring annotation flannel.alpha.coreos.com/public-ipv6-overwrite="%s" of this node: it is not an '
                "IPv6 address; advertising fd56::11" % bad) in caplog.messages


# --- the mismatch matrix ----------------------------------------------------------------------------------

def lease_error(cidrs: tuple[str, ...], networks: dict[Family, IPNetwork]) -> str:
    sm = manager(RecordingClient(node("k8s01", *cidrs)), networks)
    with pytest.raises(LeaseError) as exc:
        acquire(sm)
    return str(exc.value)


def test_ipv4_net_conf_on_a_dual_stack_node_uses_ipv4() -> None:
    """flanneld v0.20.2 exits on every start ("... specified in the PodCIDR, but doesn't exist ..."); v0.28 and
    pyflannel use the IPv4 pod CIDR and leave the IPv6 one alone."""
    sm = manager(RecordingClient(node("k8s01", "10.244.0.0/24", "fd00:10:244::/64")), {IPV4: NET4})
    assert list(acquire(sm)) == [IPV4]
    sm = manager(RecordingClient(node("k8s01", "fd00:99::/64", "10.244.0.0/24")), {IPV4: NET4})
    assert acquire(sm)[IPV4].subnet == IPv4Network("10.244.0.0/24")


def test_dual_net_conf_on_an_ipv4_node_names_the_missing_family_and_the_fix() -> None:
    """flanneld v0.20.2 panics; pyflannel says what is missing and waits (the daemon retries)."""
    assert lease_error(("10.244.0.0/24",), DUAL) == (
        'node "k8s01" has no IPv6 pod CIDR (spec.podCIDR: 10.244.0.0/24) but the flannel net config enables IPv6 '
        "(IPv6Network fd00:10:244::/56): give the nodes a pod CIDR of each enabled family (kube-controller-manager "
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56, kubeadm --pod-network-cidr=10.244.0.0/16,fd00:10:244::/56) "
        'or set "EnableIPv6": false; waiting for it')


def test_dual_net_conf_on_an_ipv6_node_names_ipv4() -> None:
    """flanneld v0.20.2 takes 0.0.0.0/0 as the IPv4 lease, writes FLANNEL_SUBNET=0.0.0.1/0 and then panics."""
    message = lease_error(("fd00:10:244::/64",), DUAL)
    assert message.startswith('node "k8s01" has no IPv4 pod CIDR (spec.podCIDR: fd00:10:244::/64) but the flannel '
                              "net config enables IPv4 (Network 10.244.0.0/16)")
    assert message.endswith('or set "EnableIPv4": false; waiting for it')


def test_ipv6_only_net_conf() -> None:
    assert lease_error(("10.244.0.0/24",), {IPV6: NET6}) == (
        'node "k8s01" has no IPv6 pod CIDR (spec.podCIDR: 10.244.0.0/24) but the flannel net config enables IPv6 '
        "(IPv6Network fd00:10:244::/56): give the nodes a pod CIDR of each enabled family (kube-controller-manager "
        "--cluster-cidr=fd00:10:244::/56, kubeadm --pod-network-cidr=fd00:10:244::/56) or enable in the flannel net "
        "config the families the pod CIDRs have; waiting for it")
    sm = manager(RecordingClient(node("k8s01", "10.244.0.0/24", "fd00:10:244::/64")), {IPV6: NET6})
    assert list(acquire(sm)) == [IPV6]


def test_flanneld_errors_per_family() -> None:
    assert lease_error(("10.244.0.0/24", "fd00:99::/64"), DUAL) == (
        'subnet "fd00:10:244::/56" specified in the flannel net config doesn\'t contain "fd00:99::/64" IPv6 PodCIDR '
        'of the "k8s01" node')
    assert lease_error(("10.9.0.0/24", "fd00:10:244::/64"), DUAL) == (
        'subnet "10.244.0.0/16" specified in the flannel net config doesn\'t contain "10.9.0.0/24" PodCIDR of the '
        '"k8s01" node')
    assert lease_error(("10.244.0.0/24", "fd00::/64", "10.244.1.0/24"), DUAL) == \
        'node "k8s01" pod cidrs should be IPv4/IPv6 only or dualstack'
    assert lease_error((), DUAL) == 'node "k8s01" pod cidr not assigned'
    assert lease_error(("10.244.0.0/24", "fd00:zz::/64"), DUAL) == "invalid CIDR address: fd00:zz::/64"


# --- remote nodes, per family -----------------------------------------------------------------------------

def test_remote_nodes_per_family(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    client = RecordingClient(
        node("k8s01", "10.244.0.0/24", "fd00:10:244::/64"),
        peer("k8s02", 2),
        peer("v4only", 3, "10.244.3.0/24"),  # no IPv6 pod CIDR: IPv4 only
        peer("nov6ip", 4, public_ipv6="garbage"),  # flanneld v0.20.2 skips it in both families
        peer("outside6", 5, "10.244.5.0/24", "fd00:99::/64"),
        peer("later6", 6, "10.244.6.0/24", "fd00:10:244:2::/64"),  # k8s02 holds its IPv6 subnet first
        peer("mine6", 7, "10.244.7.0/24", "fd00:10:244::/64"),  # this node's IPv6 subnet
        peer("whole6", 8, "10.244.8.0/24", "fd00:10:244::/56"),
        peer("v4in6", 9, "10.244.9.0/24", "10.244.10.0/24"),  # two IPv4 entries: no IPv6
    )
    sm = manager(client)
    assert sorted(sm.leases(IPV4)) == ["k8s02", "later6", "mine6", "nov6ip", "outside6", "v4in6", "v4only", "whole6"]
    assert sorted(sm.leases(IPV6)) == ["k8s02"]
    assert sm.lease_of("k8s02", IPV6) == Lease(IPv6Network("fd00:10:244:2::/64"), ip_address("fd56::12"), "vxlan",
                                               '{"VNI":1,"VtepMAC":"0a:00:00:00:06:02"}')
    assert sm.lease_of("k8s02", IPV4) == Lease(IPv4Network("10.244.2.0/24"), ip_address("192.168.56.12"), "vxlan",
                                               '{"VNI":1,"VtepMAC":"0a:00:00:00:00:02"}')
    text = caplog.text
    assert 'Error turning node "v4only" to lease: missing IPv6 address on n.Spec.PodCIDRs (skipped for IPv6 only)' \
        in text
    assert 'Error turning node "nov6ip" to lease: Invalid IP address format (skipped for IPv6 only)' in text
    assert 'Ignoring node "outside6": its pod CIDR fd00:99::/64 (spec.podCIDRs) is outside the Network ' \
           'fd00:10:244::/56 (skipped for IPv6 only)' in text
    assert "overlaps the pod CIDR of node \"k8s02\", which held it first (skipped for IPv6 only)" in text
    assert 'Ignoring node "mine6": its pod CIDR fd00:10:244::/64 (spec.podCIDRs) overlaps the pod CIDR of this node' \
        in text
    assert "is the whole Network fd00:10:244::/56" in text
    # the first holder leaves: the waiting node takes the subnet
    del client.nodes["k8s02"]
    sm._list()
    assert sm.lease_of("later6", IPV6) is not None and sm.lease_of("k8s02", IPV4) is None


def test_single_stack_ipv6_leases() -> None:
    client = RecordingClient(node("k8s01", "fd00:10:244::/64"), peer("k8s02", 2, "fd00:10:244:2::/64"),
                             peer("k8s03", 3, "10.244.3.0/24"))
    sm = manager(client, {IPV6: NET6})
    assert sorted(sm.leases(IPV6)) == ["k8s02"]
    assert str(sm.lease_of("k8s02", IPV6).public_ip) == "fd56::12"  # type: ignore[union-attr]


def test_pod_cidr_choice() -> None:
    n = kube.NodeInfo("a", "10.244.1.0/24", ("10.244.1.0/24", "fd00::/64", "fd00:1::/64"), {})
    assert (kube.pod_cidr(n, IPV4), kube.pod_cidr(n, IPV6)) == ("10.244.1.0/24", "fd00::/64")
    n = kube.NodeInfo("a", "fd00::/64", (), {})
    assert (kube.ipv4_pod_cidr(n), kube.pod_cidr(n, IPV6)) == ("", "fd00::/64")
    assert ip_network(kube.pod_cidr(n, IPV6)).version == 6
