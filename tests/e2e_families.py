"""Helpers for the dual-stack and host-gw end-to-end tests: each pod-network family's kernel entries,
read with iproute2, and the entries the API server's node objects call for."""

from __future__ import annotations

import json
import socket
import threading
from ipaddress import ip_network
from typing import Any

from tools.netcluster import Cluster, Node, Pod, socket_in_netns

PREFIX = "flannel.alpha.coreos.com/"
# family -> (vxlan device, backend-data annotation, public-ip annotation, iproute2 family flag, listener address)
FAMILY = {
    4: ("flannel.1", PREFIX + "backend-data", PREFIX + "public-ip", "-4", "192.168.56.1"),
    6: ("flannel-v6.1", PREFIX + "backend-v6-data", PREFIX + "public-ipv6", "-6", "fd56::1"),
}


def families(cluster: Cluster) -> list[int]:
    """The cluster's pod-network families, IPv4 first."""
    return [f for f, on in ((4, cluster.ipv4), (6, cluster.ipv6)) if on]


def ip_json(node: Node, *args: str) -> list[dict[str, Any]]:
    out = Cluster.ns_run(node.netns, *args).stdout
    return json.loads(out) if out.strip() else []


def pod_cidr(cluster: Cluster, name: str, family: int) -> Any:
    """The node's pod CIDR of that family, from spec.podCIDRs."""
    assert cluster.api is not None
    return next(ip_network(c) for c in cluster.api.get_node(name)["spec"]["podCIDRs"] if ip_network(c).version == family)


def underlay_ip(node: Node, family: int) -> str:
    ip = node.ip if family == 4 else node.ip6
    assert ip is not None
    return ip


def vxlan_datapath(node: Node, family: int) -> dict[str, set[tuple[str, str | None]]]:
    """The family's vxlan device's routes (with a gateway), permanent neighbours and FDB entries."""
    dev, _, _, flag, _ = FAMILY[family]
    return {
        "routes": {(r["dst"], r["gateway"]) for r in ip_json(node, "ip", "-j", flag, "route", "show", "dev", dev)
                   if r.get("gateway")},
        "neigh": {(n["dst"], n.get("lladdr")) for n in ip_json(node, "ip", "-j", flag, "neigh", "show", "dev", dev,
                                                                "nud", "permanent")},
        "fdb": {(f["mac"], f.get("dst")) for f in ip_json(node, "bridge", "-j", "fdb", "show", "dev", dev)
                if f.get("dst")},
    }


def expected_vxlan(cluster: Cluster, others: list[Node], family: int) -> dict[str, set[tuple[str, str | None]]]:
    """What flanneld programs for ``others`` on the family's device (spec §6.4, §10)."""
    assert cluster.api is not None
    _, data_key, _, _, _ = FAMILY[family]
    routes, neigh, fdb = set(), set(), set()
    for other in others:
        mac = json.loads(cluster.api.get_node(other.name)["metadata"]["annotations"][data_key])["VtepMAC"]
        subnet = pod_cidr(cluster, other.name, family)
        routes.add((str(subnet), str(subnet.network_address)))
        neigh.add((str(subnet.network_address), mac))
        fdb.add((mac, underlay_ip(other, family)))
    return {"routes": routes, "neigh": neigh, "fdb": fdb}


def hostgw_routes(node: Node, family: int) -> set[tuple[str, str | None]]:
    """The routes with a gateway on eth1 (host-gw's, spec §8.3), as (dst, gateway)."""
    flag = FAMILY[family][3]
    return {(r["dst"], r["gateway"]) for r in ip_json(node, "ip", "-j", flag, "route", "show", "dev", "eth1")
            if r.get("gateway") and r["dst"] != "default"}


def expected_hostgw(cluster: Cluster, others: list[Node], family: int) -> set[tuple[str, str | None]]:
    return {(str(pod_cidr(cluster, o.name, family)), underlay_ip(o, family)) for o in others}


def pod_ip(pod: Pod, family: int) -> str:
    ip = next((a for a in pod.ips if (":" in a) == (family == 6)), None)
    assert ip is not None, "%s has no IPv%d address" % (pod.name, family)
    return ip


def source_seen_by_hub(cluster: Cluster, pod: Pod, family: int, port: int = 9999) -> tuple[str, str]:
    """Send a UDP datagram from the pod to the hub's underlay address; the source address the hub saw
    and the one the pod got echoed back."""
    hub_ip = FAMILY[family][4]
    sock = socket_in_netns(cluster.hub, (hub_ip, port), socket.SOCK_DGRAM)
    seen: list[str] = []

    def echo() -> None:
        sock.settimeout(10)
        data, addr = sock.recvfrom(100)
        seen.append(addr[0])
        sock.sendto(addr[0].encode(), addr)

    t = threading.Thread(target=echo)
    t.start()
    af = "AF_INET6" if family == 6 else "AF_INET"
    client = ("import socket;s=socket.socket(socket.%s,socket.SOCK_DGRAM);s.settimeout(5);"
              "s.sendto(b'hi',('%s',%d));print(s.recvfrom(100)[0].decode())" % (af, hub_ip, port))
    try:
        out = Cluster.ns_run(pod.netns, "python3", "-c", client).stdout.strip()
    finally:
        t.join()
        sock.close()
    return (seen[0] if seen else ""), out


def flannel_rules(node: Node, family: int) -> list[str]:
    saved = Cluster.ns_run(node.netns, "iptables-save" if family == 4 else "ip6tables-save").stdout
    return sorted(line for line in saved.splitlines() if line.startswith("-A") and "flannel" in line)


def kernel_snapshot(node: Node) -> dict[str, Any]:
    """Both families' routes, permanent neighbours, the flannel devices' FDB entries and flannel's rules,
    for before/after comparisons."""
    snap: dict[str, Any] = {}
    for family in (4, 6):
        flag = FAMILY[family][3]
        snap["routes%d" % family] = sorted(json.dumps(r, sort_keys=True) for r in ip_json(node, "ip", "-j", flag, "route"))
        snap["neigh%d" % family] = sorted(json.dumps(n, sort_keys=True) for n in
                                          ip_json(node, "ip", "-j", flag, "neigh", "show", "nud", "permanent"))
        snap["rules%d" % family] = flannel_rules(node, family)
    snap["fdb"] = sorted(json.dumps(f, sort_keys=True) for dev in ("flannel.1", "flannel-v6.1")
                         if Cluster.ns_run(node.netns, "ip", "link", "show", dev, check=False).returncode == 0
                         for f in ip_json(node, "bridge", "-j", "fdb", "show", "dev", dev))
    return snap


def flanneld_state(cluster: Cluster, node: Node, peers: list[Node], macs: dict[int, str]) -> None:
    """Leave ``node`` in the state flanneld v0.20.2 leaves with vxlan (spec §10), built with iproute2:
    per family the device with its MAC, address and per-peer entries for ``peers``, subnet.env, and
    flanneld's node patch. ``macs``: the VtepMAC per IP version."""
    assert cluster.api is not None
    annotations = {PREFIX + "backend-type": "vxlan", PREFIX + "kube-subnet-manager": "true"}
    env = []
    for family in families(cluster):
        dev, data_key, ip_key, flag, _ = FAMILY[family]
        subnet = pod_cidr(cluster, node.name, family)
        local = underlay_ip(node, family)
        for cmd in (f"ip link add {dev} address {macs[family]} txqueuelen 0 type vxlan id 1 local {local} dev eth1 "
                    f"dstport 8472 nolearning",
                    f"ip {flag} addr add {subnet.network_address}/{subnet.max_prefixlen} dev {dev}",
                    f"ip link set {dev} up"):
            Cluster.ns_run(node.netns, *cmd.split())
        if family == 6:
            Cluster.ns_run(node.netns, "sysctl", "-q", "-w", "net.ipv6.conf.flannel-v6/1.accept_ra=0")
        for peer in peers:
            mac = json.loads(cluster.api.get_node(peer.name)["metadata"]["annotations"][data_key])["VtepMAC"]
            peer_net = pod_cidr(cluster, peer.name, family)
            gw = peer_net.network_address
            for cmd in (f"ip {flag} neigh replace {gw} lladdr {mac} dev {dev} nud permanent",
                        f"bridge fdb append {mac} dev {dev} dst {underlay_ip(peer, family)} self permanent",
                        f"ip {flag} route replace {peer_net} via {gw} dev {dev} onlink"):
                Cluster.ns_run(node.netns, *cmd.split())
        annotations[data_key] = '{"VNI":1,"VtepMAC":"%s"}' % macs[family]
        annotations[ip_key] = local
        key = "FLANNEL_" if family == 4 else "FLANNEL_IPV6_"
        network = cluster.network if family == 4 else cluster.ipv6_network
        env += ["%sNETWORK=%s" % (key, network), "%sSUBNET=%s/%d" % (key, subnet.network_address + 1, subnet.prefixlen)]
    node.subnet_file.write_text("\n".join(env + ["FLANNEL_MTU=1450", "FLANNEL_IPMASQ=true"]) + "\n")
    # flanneld's patch of nodes/<name>/status (spec §3.2)
    cluster.api.patch_node(node.name, {"metadata": {"annotations": annotations}})


def probe_outcomes(cluster: Cluster, node: Node) -> dict[int, dict[str, str]]:
    """The datapath probes' last outcome of each peer, per IP version, from the node's /probes."""
    return {4 if fam["family"] == "IPv4" else 6: {r["name"]: r["outcome"] for r in fam["recent"]}
            for fam in cluster.probes(node)["families"]}
