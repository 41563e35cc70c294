"""``pyflannel diagnose``: read-only checks of this node and the cluster, each problem with its fix.

It takes the daemon's flags and configuration, looks at the node (interface, VXLAN device and
port, sysctls, subnet.env) and at the nodes in the API, and prints ``ok    <what>`` for each check
that passed and, for each problem, ``FAIL  <what is wrong>`` followed by indented ``fix:`` lines.
Nothing is changed: no API writes, no link, route, sysctl or file changes; the VXLAN port is tested
by binding a UDP socket to it for a moment.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, ip_network
from typing import Any, TextIO, TypeVar, cast

from . import brnetfilter, flags, ip, subnetfile
from .config import OVERHEAD, Config, ConfigError, VXLANConfig, default_subnet_len, load
from .kubeclient import ApiError, KubeClient
from .netlink import Netlink
from .subnet.annotations import AnnotationKeys, PrefixError, node_public_ips
from .backend.hostgw import l2_networks, on_link
from .backend.vxlan import DEFAULT_PORT, VXLANLink, device_name, read_link
from .family import IPV4, IPV6, Family
from .log import printable, redact_urls
from .subnet.kube import (NodeInfo, decode_node_list, ipv4_pod_cidr, list_nodes, node_info, node_to_lease, pod_cidr,
                          pod_cidr_field)

__all__ = ["CHECKS", "Context", "Problem", "Unavailable", "main", "run", "write"]

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
SUBNET_ENV_KEYS = ("FLANNEL_MTU", "FLANNEL_IPMASQ")  # after each family's network and subnet
FORWARDING = {IPV4: "net.ipv4.ip_forward", IPV6: "net.ipv6.conf.all.forwarding"}  # the sysctl of each family
FORWARDING_CAVEAT = {  # what else turning a family's forwarding on needs (%s: the interface)
    IPV4: "",
    IPV6: "with forwarding on, the kernel ignores router advertisements on an interface whose accept_ra is 1: "
          "if the node takes its IPv6 default route from them, set net.ipv6.conf.%s.accept_ra=2 as well",
}
NETWORK_KEY = {IPV4: "Network", IPV6: "IPv6Network"}  # net-conf.json's key of each family's Network
PODCIDR_NAME = {IPV4: "PodCIDR", IPV6: "IPv6 PodCIDR"}  # as flanneld's errors name a family's pod CIDR
UNREACHABLE = {IPV4: "network is unreachable", IPV6: "no route to host"}  # the kernel's refusal of an off-link gateway
IGNORED_LOG = {"vxlan": "ignoring non-vxlan v4Subnet(...): type=...",  # what a backend logs of another's node
               "host-gw": "Ignoring non-host-gw subnet: type=..."}
FLANNEL_RBAC = "nodes: list, watch; nodes/status: patch; pods: get"

T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """Something wrong: ``what`` (first line a headline, further lines the explanation) and how to fix it."""

    what: str
    fix: list[str]


Result = str | list[Problem]


class Unavailable(Exception):
    """Something a check needs could not be read: ``needs`` names it for skip lines, ``error`` is the cause."""

    def __init__(self, needs: str, error: Exception) -> None:
        super().__init__("%s: %s" % (needs, error))
        self.needs = needs
        self.error = error


class _NotFound(LookupError):
    """This node is not in the node list, or its name cannot be worked out."""


class _Collect(logging.Handler):
    """Keeps the messages logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Context:
    """What the checks look at, each read once on first use. ``proc`` is the root of /proc."""

    def __init__(self, opts: flags.Options, environ: Mapping[str, str], proc: str = "/proc",
                 nl: Netlink | None = None) -> None:
        self.opts = opts
        self.environ = environ
        self.proc = proc
        self._nl = nl
        self.interface_log: list[str] = []
        self._results: dict[str, tuple[bool, Any]] = {}

    def _once(self, key: str, needs: str, compute: Callable[[], T]) -> T:
        """``compute()`` once; its failure is raised as :class:`Unavailable` on every call."""
        if key not in self._results:
            try:
                self._results[key] = (True, compute())
            except Unavailable as exc:
                self._results[key] = (False, exc)
            except (ConfigError, PrefixError, ApiError, ip.InterfaceError, _NotFound) as exc:
                self._results[key] = (False, Unavailable(needs, exc))
        ok, value = self._results[key]
        if not ok:
            raise value
        return cast(T, value)

    @property
    def nl(self) -> Netlink:
        """The kernel's netlink: the one given, else a socket of this network namespace, opened on first use."""
        if self._nl is None:
            self._nl = Netlink()
        return self._nl

    def close(self) -> None:
        """Close the netlink socket if one was opened."""
        if self._nl is not None:
            self._nl.close()

    def config(self) -> Config:
        """net-conf.json, parsed as the daemon does in kube mode."""
        return self._once("config", "a valid net-conf.json",
                          lambda: load(self.opts.net_config_path, kube=True))

    def vxlan(self) -> VXLANConfig:
        """The VXLAN backend's settings from net-conf.json."""
        return self.config().vxlan or VXLANConfig()

    def keys(self) -> AnnotationKeys:
        """The annotation keys under ``--kube-annotation-prefix``."""
        return self._once("keys", "a valid --kube-annotation-prefix",
                          lambda: AnnotationKeys.from_prefix(self.opts.kube_annotation_prefix))

    def client(self) -> KubeClient:
        """The API client, built from ``--kube-api-url``/``--kubeconfig-file`` or the in-cluster config."""
        return self._once("client", "an API client",
                          lambda: KubeClient(self.opts.kube_api_url, self.opts.kubeconfig_file))

    def nodes(self) -> list[NodeInfo]:
        """Every node, read in pages, keeping only the fields flannel uses."""
        return self._once("nodes", "the node list from the API server", self._list_nodes)

    def _list_nodes(self) -> list[NodeInfo]:
        client = self.client()
        try:
            prefix = self.keys().prefix
        except Unavailable:
            prefix = ""
        return list_nodes(client, prefix)[0]

    def node_name(self) -> tuple[str, str]:
        """This node's name and where it came from, found the way the daemon finds it."""
        return self._once("node_name", "this node's name", self._find_node_name)

    def _find_node_name(self) -> tuple[str, str]:
        name = self.environ.get("NODE_NAME", "")
        if name:
            return name, "NODE_NAME"
        pod, ns = self.environ.get("POD_NAME", ""), self.environ.get("POD_NAMESPACE", "")
        if not pod or not ns:
            raise _NotFound("env variables POD_NAME and POD_NAMESPACE must be set")
        try:
            spec = self.client().get_pod(ns, pod).get("spec") or {}
        except ApiError as exc:
            raise _NotFound("error retrieving pod spec for '%s/%s': %s" % (ns, pod, exc)) from exc
        name = spec.get("nodeName") or ""
        if not name:
            raise _NotFound("node name not present in pod spec '%s/%s'" % (ns, pod))
        return name, "the spec of pod %s/%s" % (ns, pod)

    def own_node(self) -> NodeInfo:
        """This node as the API shows it, read as the daemon reads it: a node list with a field selector
        (flannel's RBAC grants list and watch on nodes, not get)."""
        return self._once("own_node", "this node in the node list", self._fetch_own_node)

    def _fetch_own_node(self) -> NodeInfo:
        name = self.node_name()[0]
        client = self.client()
        try:
            prefix = self.keys().prefix
        except Unavailable:
            prefix = ""
        try:
            page = client.list_nodes(1, field_selector="metadata.name=" + name, decode=decode_node_list)
            for item in page.get("items") or ():
                return node_info(item, prefix)
        except (ApiError, ValueError) as exc:
            raise Unavailable("the node list from the API server", exc) from exc
        raise _NotFound('node "%s" not found' % name)

    def interface(self) -> ip.ExternalInterface:
        """The external interface chosen by the daemon's rules; its log lines go to ``interface_log``."""
        return self._once("interface", "a usable network interface", self._select)

    def _select(self) -> ip.ExternalInterface:
        logger = logging.getLogger(ip.__name__)
        collect = _Collect()
        level, propagate = logger.level, logger.propagate
        logger.addHandler(collect)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            o = self.opts
            publics = {IPV4: o.public_ip, IPV6: o.public_ipv6}
            try:  # the node-public-ip(v6) annotations replace the flags, as in the daemon
                publics.update(node_public_ips(self.keys(), self.own_node().annotations))
            except Unavailable:
                pass
            except ValueError as exc:
                raise ip.InterfaceError("Failed to find any valid interface to use: %s" % exc) from None
            return ip.select(self.nl, o.iface, o.iface_regex, o.iface_can_reach, publics[IPV4], publics[IPV6],
                             _families(self))
        finally:
            logger.removeHandler(collect)
            logger.setLevel(level)
            logger.propagate = propagate
            self.interface_log = collect.lines

    def subnet_env(self) -> dict[str, str] | None:
        """subnet.env's keys and values as the CNI plugin reads them, or None if it does not exist."""
        try:
            with open(self.opts.subnet_file) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Unavailable("a readable subnet.env", exc) from exc
        values = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key] = value
        return values

    def log_hint(self) -> str:
        """How to read the pyflannel log of this node."""
        pod, ns = self.environ.get("POD_NAME", ""), self.environ.get("POD_NAMESPACE", "")
        if pod and ns:
            return "kubectl -n %s logs %s" % (ns, pod)
        try:
            node = self.node_name()[0]
        except Unavailable:
            node = "<this node>"
        return ("kubectl -n kube-flannel get pods -o wide --field-selector spec.nodeName=%s, then "
                "kubectl -n kube-flannel logs <that pod> (journalctl -u pyflannel if it runs as a service)" % node)


# --- helpers ---------------------------------------------------------------------------------------

def _free_subnet(network: IPv4Network, used: list[IPv4Network]) -> IPv4Network | None:
    """The first node-sized subnet of ``network`` (/24, or prefix+2 in small networks) no node uses."""
    try:
        prefix = default_subnet_len(network)
    except ConfigError:
        return None
    size = 1 << (32 - prefix)
    start = int(network.network_address)
    for net in sorted(used, key=lambda n: int(n.network_address)):
        if int(net.network_address) >= start + size:
            break
        end = int(net.broadcast_address) + 1
        if end > start:
            start = -(-end // size) * size
    if start + size - 1 > int(network.broadcast_address):
        return None
    return IPv4Network((start, prefix))


def _used_subnets(nodes: list[NodeInfo]) -> list[IPv4Network]:
    used = []
    for node in nodes:
        try:
            net = ip_network(ipv4_pod_cidr(node), strict=False)
        except ValueError:
            continue
        if isinstance(net, IPv4Network):
            used.append(net)
    return used


def _pod_cidr_fixes(ctx: Context, names: list[str]) -> list[str]:
    network = _cluster_cidr(ctx)
    fixes = [
        "let kube-controller-manager assign pod CIDRs: run it with --allocate-node-cidrs=true "
        "--cluster-cidr=%s (the Networks of net-conf.json)" % network,
        "with kubeadm: kubeadm init --pod-network-cidr=%s; on an existing cluster add both flags to "
        "/etc/kubernetes/manifests/kube-controller-manager.yaml" % network,
    ]
    if _families(ctx) != [IPV4]:
        return fixes
    try:
        net = ctx.config().network
        free = _free_subnet(net, _used_subnets(ctx.nodes())) if net is not None else None
    except Unavailable:
        free = None
    example = str(free) if free is not None else "<a free subnet of %s>" % network
    name = names[0] if len(names) == 1 else "<node>"
    fixes.append("or set one by hand (possible only while it is empty): kubectl patch node %s -p "
                 "'{\"spec\":{\"podCIDR\":\"%s\",\"podCIDRs\":[\"%s\"]}}'%s"
                 % (name, example, example, " (no node uses %s)" % example if free is not None else ""))
    return fixes


def _families(ctx: Context) -> list[Family]:
    """The families net-conf.json enables, IPv4 first; IPv4 alone when it cannot be read."""
    try:
        return list(ctx.config().networks)
    except Unavailable:
        return [IPV4]


def _backend_type(ctx: Context) -> str:
    """net-conf.json's backend type; vxlan (the default) when it cannot be read."""
    try:
        return ctx.config().backend_type
    except Unavailable:
        return "vxlan"


def _cluster_cidr(ctx: Context) -> str:
    """net-conf.json's Networks as kube-controller-manager's --cluster-cidr takes them: "<v4>,<v6>"."""
    try:
        return ",".join(str(net) for net in ctx.config().networks.values())
    except Unavailable:
        return "<the Network of net-conf.json>"


def _has_pod_cidr(node: NodeInfo) -> bool:
    return bool(node.pod_cidr or node.pod_cidrs)


def _missing_family_problem(ctx: Context, nodes: list[NodeInfo], family: Family, own: bool) -> Problem:
    """Nodes that have pod CIDRs, but none of ``family``, which net-conf.json enables."""
    cidrs = _cluster_cidr(ctx)
    try:
        network = "%s %s" % (NETWORK_KEY[family], ctx.config().networks[family])
    except Unavailable:
        network = "Network"
    if own:
        node = nodes[0]
        headline = 'node "%s" (this node) has no %s pod CIDR (%s: %s), but net-conf.json enables %s (%s)' % (
            node.name, family, pod_cidr_field(node), ",".join(node.pod_cidrs or (node.pod_cidr,)), family, network)
        why = ("pyflannel waits for it and sets up no pod network on this node until it comes (its log says "
               '`node "%s" has no %s pod CIDR ...; waiting for it`); flanneld v0.20.2 panics and is restarted over '
               "and over." % (node.name, family))
    else:
        headline = "nodes without an %s pod CIDR, which net-conf.json enables (%s): %s" % (
            family, network, ", ".join("%s (%s)" % (n.name, ",".join(n.pod_cidrs or (n.pod_cidr,))) for n in nodes))
        why = ("pyflannel on those nodes waits for it and sets up nothing there, and the other nodes route no %s "
               "to them (each logs one warning); flanneld v0.20.2 panics on every node that sees them." % family)
    return Problem("\n".join([headline, why,
                              "kube-controller-manager gives each node one pod CIDR per family of its --cluster-cidr: "
                              "it has no %s range." % family]), [
        "run kube-controller-manager with --allocate-node-cidrs=true --cluster-cidr=%s (net-conf.json's "
        "Networks; the API server's --service-cluster-ip-range needs both families too for dual-stack)" % cidrs,
        "with kubeadm: kubeadm init --pod-network-cidr=%s (networking.podSubnet); on an existing cluster edit "
        "/etc/kubernetes/manifests/kube-controller-manager.yaml" % cidrs,
        "a node keeps the pod CIDRs it was given: then drain and delete each node listed (kubectl delete node) and "
        "restart its kubelet, so that it registers again and gets a pod CIDR of each family",
        'or, if the cluster is not meant to have %s, set "Enable%s": false in net-conf.json' % (family, family)])


def _vxlan_links(nl: Netlink) -> list[VXLANLink]:
    """Every VXLAN device, as the backend reads it."""
    return [link for link in map(read_link, nl.links()) if link.kind == "vxlan"]


def _existing_subnet_env(ctx: Context) -> str:
    """The subnet.env path; Unavailable when the file does not exist."""
    if ctx.subnet_env() is None:
        raise Unavailable("an existing subnet.env", FileNotFoundError(ctx.opts.subnet_file))
    return ctx.opts.subnet_file


def _read_sysctl(ctx: Context, path: str) -> str | None:
    """A value under /proc (``path`` relative to it), or None if the file does not exist."""
    try:
        with open(os.path.join(ctx.proc, path)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


# --- the checks ------------------------------------------------------------------------------------

def check_flags(ctx: Context) -> Result:
    """The daemon's mode and annotation prefix."""
    problems = []
    if not ctx.opts.kube_subnet_mgr:
        endpoints = redact_urls(ctx.opts.etcd_endpoints)
        problems.append(Problem(
            "--kube-subnet-mgr is not set\n"
            "The daemon then keeps its leases in etcd (%s); diagnose checks only Kubernetes clusters."
            % endpoints,
            ["in a Kubernetes cluster, add --kube-subnet-mgr to the daemon's command line (diagnose takes the "
             "daemon's flags; give it the same ones)",
             "in etcd mode, read the leases with: etcdctl --endpoints=%s get --prefix %s"
             % (endpoints, ctx.opts.etcd_prefix)]))
    try:
        prefix = ctx.keys().prefix
    except Unavailable as exc:
        problems.append(Problem(
            "--kube-annotation-prefix=%s is invalid: %s" % (ctx.opts.kube_annotation_prefix, exc.error),
            ["use a prefix like flannel.alpha.coreos.com (the default) or example.com/flannel, "
             "the same on every node"]))
        prefix = ""
    return problems or "flags: Kubernetes subnet manager, annotation prefix %s" % prefix


def check_net_conf(ctx: Context) -> Result:
    """net-conf.json can be read and parsed."""
    try:
        cfg = ctx.config()
    except Unavailable as exc:
        return [Problem(
            "net-conf.json is invalid: %s\n"
            "pyflannel stops at start-up with `Failed to create SubnetManager: %s`." % (exc.error, exc.error),
            ["correct %s: in a cluster it is the net-conf.json key of the kube-flannel-cfg ConfigMap "
             "(kubectl -n kube-flannel edit configmap kube-flannel-cfg), then restart the flannel pods"
             % ctx.opts.net_config_path,
             "check --net-config-path and that the ConfigMap is mounted there",
             'a minimal net-conf.json: {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'])]
    networks = ", ".join("%s %s" % (NETWORK_KEY[f], n) for f, n in cfg.networks.items())
    if cfg.vxlan is None:
        return "net-conf.json %s: %s, backend %s" % (ctx.opts.net_config_path, networks, cfg.backend_type)
    vx = cfg.vxlan
    return "net-conf.json %s: %s, backend %s, VNI %d, UDP port %d" % (
        ctx.opts.net_config_path, networks, cfg.backend_type, vx.vni, vx.port or DEFAULT_PORT)


def check_api(ctx: Context) -> Result:
    """The API server can be reached and lets us list the nodes."""
    try:
        client = ctx.client()
    except Unavailable as exc:
        return [Problem(
            "cannot set up the API client: %s" % exc.error,
            ["pass --kubeconfig-file=<kubeconfig> (and/or --kube-api-url=<https://server:6443>), or run "
             "inside a pod with a service account (KUBERNETES_SERVICE_HOST/PORT and "
             "/var/run/secrets/kubernetes.io/serviceaccount)"])]
    try:
        nodes = ctx.nodes()
    except Unavailable as exc:
        return [_api_problem(client.host, exc.error)]
    return "API server %s answers: %d nodes" % (client.host, len(nodes))


def _api_problem(url: str, error: Exception) -> Problem:
    status = getattr(error, "status", 0)
    if status == 403:
        return Problem(
            "the API server at %s forbids listing the nodes (HTTP 403): %s\n"
            "pyflannel must list and watch all nodes; flanneld logs `nodes is forbidden` until it gives up "
            "after 10 minutes." % (url, error),
            ["grant flannel's ClusterRole (%s) and bind it to the service account or user in use "
             "(the ClusterRole and ClusterRoleBinding of kube-flannel.yml)" % FLANNEL_RBAC,
             "test it: kubectl auth can-i list nodes --as=system:serviceaccount:kube-flannel:flannel, and the same "
             "with watch nodes"])
    if status == 401:
        return Problem(
            "the API server at %s rejects the credentials (HTTP 401): %s" % (url, error),
            ["the token or client certificate is wrong or expired: check the kubeconfig's user, or the pod's "
             "service-account token (/var/run/secrets/kubernetes.io/serviceaccount/token)"])
    if status:
        return Problem("the API server at %s answers HTTP %d: %s" % (url, status, error),
                       ["check the API server's health and log: kubectl get --raw /readyz?verbose"])
    return Problem(
        "cannot reach the API server at %s: %s\n"
        "pyflannel needs it for this node's pod CIDR and the other nodes' addresses." % (url, error),
        ["check that the API server runs and that this node reaches it: curl -k %s/version" % url,
         "check the server address in the kubeconfig or --kube-api-url (in a pod: KUBERNETES_SERVICE_HOST "
         "and KUBERNETES_SERVICE_PORT), and firewalls between this node and the control plane"])


def check_node_name(ctx: Context) -> Result:
    """This node's name is known and the node exists."""
    try:
        name, source = ctx.node_name()
    except Unavailable as exc:
        if exc.needs != "this node's name":
            raise
        return [Problem(
            "cannot tell which node this is: %s" % exc.error,
            ["set NODE_NAME to the node's name as `kubectl get nodes` shows it; in the DaemonSet set "
             "NODE_NAME (or POD_NAME and POD_NAMESPACE) from the downward API (fieldRef: spec.nodeName)"])]
    try:
        ctx.own_node()
    except Unavailable as exc:
        if exc.needs != "this node in the node list":
            return 'this node is "%s" (from %s; not checked against the cluster, that needs %s)' % (
                name, source, exc.needs)
        return [Problem(
            'node "%s" (this node, from %s) does not exist in the cluster\n'
            'This is why flanneld logs `failed to acquire lease: node "%s" not found`.' % (name, source, name),
            ["NODE_NAME must be the node's name exactly as `kubectl get nodes` shows it",
             "if the node was deleted, restart kubelet on it so that it registers again"])]
    return 'this node is "%s" (from %s)' % (name, source)


def check_own_pod_cidr(ctx: Context) -> Result:
    """This node has a pod CIDR."""
    node = ctx.own_node()
    if _has_pod_cidr(node):
        families = _families(ctx)
        missing = [f for f in families if not pod_cidr(node, f)]
        if missing:
            return [_missing_family_problem(ctx, [node], f, own=True) for f in missing]
        return 'node "%s" has the pod CIDR %s' % (node.name, ", ".join(pod_cidr(node, f) for f in families))
    return [Problem(
        'node "%s" (this node) has no pod CIDR (spec.podCIDR is empty)\n'
        "pyflannel takes the node's pod CIDR as its subnet and cannot go on without one: this is why flanneld "
        'logs `failed to acquire lease: node "%s" pod cidr not assigned` (flanneld then exits and is restarted; '
        "pyflannel waits for the pod CIDR), and why subnet.env is not written." % (node.name, node.name),
        _pod_cidr_fixes(ctx, [node.name]))]


def check_other_pod_cidrs(ctx: Context) -> Result:
    """The other nodes have pod CIDRs."""
    own = ctx.node_name()[0]
    others = [n for n in ctx.nodes() if n.name != own]
    problems = [_missing_family_problem(ctx, lacking, f, own=False) for f in _families(ctx)
                if (lacking := [n for n in others if _has_pod_cidr(n) and not pod_cidr(n, f)])]
    missing = [n.name for n in others if not _has_pod_cidr(n)]
    if not missing:
        return problems or "the other %d nodes have pod CIDRs" % len(others)
    return problems + [Problem(
        "other nodes without a pod CIDR: %s\n"
        "flannel cannot run on them (flanneld logs `failed to acquire lease: node \"<name>\" pod cidr not "
        "assigned`), so their pods stay in ContainerCreating and no node can route to them." % ", ".join(missing),
        _pod_cidr_fixes(ctx, missing))]


def check_pod_cidrs_in_network(ctx: Context) -> Result:
    """Every pod CIDR lies inside net-conf's Network of its family."""
    networks = ctx.config().networks
    problems = []
    for family, network in networks.items():
        outside: list[tuple[str, str]] = []
        for node in ctx.nodes():
            cidr = pod_cidr(node, family)
            if not cidr:
                continue
            try:
                net = family.network(cidr)
            except ValueError:
                outside.append((node.name, cidr + ", not a valid CIDR"))
                continue
            if not net.subnet_of(network):  # type: ignore[arg-type]
                outside.append((node.name, cidr))
        if not outside:
            continue
        name, cidr = outside[0]
        problems.append(Problem(
            "pod CIDRs outside the %s %s of net-conf.json: %s\n"
            "flanneld refuses such a node (`subnet \"%s\" specified in the flannel net config doesn't contain "
            "\"%s\" %s of the \"%s\" node`), and the routes and masquerading rules of every node cover "
            "only the Network." % (NETWORK_KEY[family], network, ", ".join("%s (%s)" % o for o in outside), network,
                                   cidr, PODCIDR_NAME[family], name),
            ["make kube-controller-manager's --cluster-cidr (kubeadm: --pod-network-cidr) and net-conf.json's "
             "%s agree: --cluster-cidr=%s" % (NETWORK_KEY[family], _cluster_cidr(ctx)),
             "a node keeps the pod CIDR it was given: after changing --cluster-cidr, delete and re-join (or "
             "re-register) the nodes listed above so that they get a pod CIDR from the new range"]))
    return problems or "every pod CIDR is inside the Network of its family: %s" % _cluster_cidr(ctx)


def check_subnet_env_exists(ctx: Context) -> Result:
    """subnet.env exists and has every key the CNI plugin needs."""
    path = ctx.opts.subnet_file
    env = ctx.subnet_env()
    if env is None:
        return [Problem(
            "%s does not exist\n"
            "The flannel CNI plugin reads it on every pod ADD, so no pod on this node can start: pods (CoreDNS "
            "first) stay in ContainerCreating or CrashLoopBackOff, and their events say `failed to load flannel "
            "'subnet.env' file: open %s: no such file or directory` (older plugins: `open %s: no such file or "
            "directory`).\n"
            "pyflannel writes it once it has this node's lease; it is missing because pyflannel is not running "
            "here or has not got a lease (see the other problems)." % (path, path, path),
            ["read the pyflannel log on this node: %s" % ctx.log_hint(),
             "--subnet-file must be the path the CNI plugin reads (its subnetFile, default "
             "/run/flannel/subnet.env), and /run/flannel must be the host's directory (a hostPath mount)"])]
    families = _families(ctx)
    keys = [k for f in families for k in (f.env_network, f.env_subnet)] + list(SUBNET_ENV_KEYS)
    missing = [k for k in keys if k not in env]
    if missing:
        return [Problem(
            "%s lacks %s\n"
            "The CNI plugin fails every pod ADD with `%s is missing %s`." % (path, ", ".join(missing), path,
                                                                              ", ".join(missing)),
            ["do not edit the file: restart pyflannel on this node, it rewrites the file at every start",
             "read the pyflannel log on this node: %s" % ctx.log_hint()])]
    return "%s exists (%s, FLANNEL_MTU=%s)" % (
        path, ", ".join("%s=%s" % (f.env_subnet, env[f.env_subnet]) for f in families), env["FLANNEL_MTU"])


def check_subnet_env_network(ctx: Context) -> Result:
    """subnet.env's FLANNEL_NETWORK (and FLANNEL_IPV6_NETWORK) are net-conf's Networks."""
    networks = ctx.config().networks
    path = _existing_subnet_env(ctx)
    problems = []
    for family, network in networks.items():
        previous, _ = subnetfile.read_previous(path, family)
        if previous == network:
            continue
        problems.append(Problem(
            "%s says %s=%s, but net-conf.json's %s is %s\n"
            "Either the file is stale (left from an older configuration) or net-conf.json changed after pyflannel "
            "wrote it. Until pyflannel rewrites it, new pods on this node get their addresses and their route to "
            "other pods from the old network." % (path, family.env_network, previous or "<missing or invalid>",
                                                  NETWORK_KEY[family], network),
            ["restart pyflannel on this node (delete its flannel pod, or systemctl restart pyflannel): it "
             "rewrites the file from net-conf.json at every start",
             "if the new %s is intended: every node's pod CIDR must lie inside it (kube-controller-manager "
             "--cluster-cidr), and pods created before the change must be recreated" % NETWORK_KEY[family],
             "if it is not: put the old %s back into net-conf.json" % NETWORK_KEY[family]]))
    return problems or "%s in %s: net-conf.json's %s" % (
        ", ".join(f.env_network for f in networks), path, ", ".join(str(n) for n in networks.values()))


def check_subnet_env_subnet(ctx: Context) -> Result:
    """subnet.env's FLANNEL_SUBNET (and FLANNEL_IPV6_SUBNET) are this node's pod CIDRs."""
    path = _existing_subnet_env(ctx)
    node = ctx.own_node()
    problems = []
    found = []
    for family in _families(ctx):
        cidr = pod_cidr(node, family)
        if not cidr:
            raise Unavailable("a pod CIDR of each family of this node", LookupError("no %s pod CIDR" % family))
        _, previous = subnetfile.read_previous(path, family)
        try:
            own = family.network(cidr)
        except ValueError:
            own = None
        if previous is not None and previous == own:
            found.append(cidr)
            continue
        problems.append(Problem(
            "%s has %s for %s, but this node's pod CIDR is %s\n"
            "New pods on this node get addresses that the other nodes do not route here." % (
                path, family.env_subnet, previous or "<missing or invalid>", cidr),
            ["restart pyflannel on this node: it rewrites the file from the node's pod CIDR at every start",
             "then recreate the pods of this node that have addresses outside %s" % cidr]))
    return problems or "%s in %s within this node's pod CIDR %s" % (
        ", ".join(f.env_subnet for f in _families(ctx)), path, ", ".join(found))


def check_interface(ctx: Context) -> Result:
    """The interface for the tunnel exists, has an IPv4 address and is up."""
    o = ctx.opts
    try:
        ext = ctx.interface()
    except Unavailable as exc:
        return [_interface_problem(ctx, str(exc.error))]
    link = ctx.nl.link(index=ext.index)
    link_flags = link["flags"] if link is not None else 0
    problems = []
    if not link_flags & IFF_UP:
        problems.append(Problem("interface %s is down" % ext.name, ["ip link set dev %s up, and fix the node's "
                                                                    "network configuration so it comes up at boot"
                                                                    % ext.name]))
    elif not link_flags & IFF_LOWER_UP:
        problems.append(Problem(
            "interface %s has no carrier: its link is down (cable, switch port or virtual NIC)" % ext.name,
            ["check the physical or virtual link of %s (ip link show %s says NO-CARRIER)" % (ext.name, ext.name)]))
    chosen = "--iface" if o.iface or o.iface_regex or o.iface_can_reach else "the default route"
    return problems or "interface %s (%s, MTU %d) from %s carries the pod network" % (
        ext.name, ", ".join(str(a.iface_addr) for a in ext.addrs.values()), ext.mtu, chosen)


def _interface_problem(ctx: Context, error: str) -> Problem:
    o = ctx.opts
    given = ["--iface=%s" % v for v in o.iface] + ["--iface-regex=%s" % v for v in o.iface_regex]
    if o.iface_can_reach:
        given.append("--iface-can-reach=%s" % o.iface_can_reach)
    missing = re.search(r"failed to find (IPv\d) address for interface (\S+)", error)
    v6 = "IPv6 " if " v6 " in error else ""  # flanneld's "default v6 route", "v6 interface"
    if missing:
        family, name = missing.groups()
        headline = "interface %s has no %s address" % (name, family)
        why = ("net-conf.json enables %s, and the other nodes send this node's pod traffic of that family to the "
               "%s address it advertises." % (family, family))
        fixes = ["give %s its %s address (check the node's network configuration), or point --iface at the "
                 "interface that has the node's IP" % (name, family),
                 'or, if the cluster is not meant to have %s, set "Enable%s": false in net-conf.json' % (family,
                                                                                                         family)]
    elif "must be the same" in error:
        headline = "the IPv6 default route and the IPv4 one use different interfaces"
        why = "Without --iface, flannel takes the interface of the default routes, and in dual-stack they must agree."
        fixes = ["pass --iface=<interface> with the interface that has both of the node's addresses"]
    elif "default" in error:
        headline = "no interface given and no %sdefault route to choose one from" % v6
        why = "Without --iface, flannel uses the interface of the %sdefault route." % v6
        fixes = ["pass --iface=<interface or IP> of the node's network, or add an %sdefault route" % v6]
    else:
        publics = ["--public-ip=%s" % o.public_ip] if o.public_ip else ["--public-ipv6=%s" % o.public_ipv6]
        headline = "no interface matches %s" % " ".join(given or publics)
        why = "flannel needs the interface that carries the node's IP to run the pod network over."
        fixes = ["pass --iface=<interface or IP> with the interface that has the node's IP (ip addr); the "
                 "same flag must be in the DaemonSet's args"]
    lines = [headline, why, "pyflannel stops with `%s`." % error]
    lines += ["it logs: %s" % line for line in ctx.interface_log if line.startswith("Could not find")]
    lines.append("interfaces here: %s" % _interfaces_text(ctx))
    return Problem("\n".join(lines), fixes)


def _interfaces_text(ctx: Context) -> str:
    families = _families(ctx)
    addrs: dict[int, list[str]] = {}
    for family in families:
        for m in ctx.nl.addresses(0, family.af):
            addrs.setdefault(int(m["index"]), []).append(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
    none = "no %s address" % " or ".join(str(f) for f in families)
    parts = []
    for link in sorted(ctx.nl.links(), key=lambda m: int(m["index"])):
        name = link.get_attr("IFLA_IFNAME")
        parts.append("%s (%s)" % (name, ", ".join(addrs.get(int(link["index"]), [])) or none))
    return ", ".join(parts)


def check_network_overlap(ctx: Context) -> Result:
    """net-conf's Networks do not contain this node's own addresses."""
    networks = ctx.config().networks
    ext = ctx.interface()
    problems = []
    for family, network in networks.items():
        own = ext.addrs[family].iface_addr
        if own in network:
            problems.append(Problem(
                "the %s %s contains this node's own address %s (on %s)\n"
                "Pod routes then cover the node network: nodes and pods get unreachable." % (
                    NETWORK_KEY[family], network, own, ext.name),
                ["choose a %s that does not overlap the node network, in net-conf.json and in "
                 "kube-controller-manager's --cluster-cidr alike" % NETWORK_KEY[family]]))
    return problems or "; ".join("the %s %s does not contain this node's address %s" % (
        NETWORK_KEY[f], network, ext.addrs[f].iface_addr) for f, network in networks.items())


def check_ipv6_interface(ctx: Context) -> Result:
    """With IPv6 enabled: the interface has a global IPv6 address, and the node an IPv6 default route."""
    if IPV6 not in _families(ctx):
        return "IPv6 is not enabled in net-conf.json"
    ext = ctx.interface()
    problems = []
    addr = ext.addrs[IPV6]
    if addr.iface_addr.is_link_local or addr.ext_addr.is_link_local:
        problems.append(Problem(
            "interface %s has no global IPv6 address, only the link-local %s\n"
            "net-conf.json enables IPv6, and pyflannel (as flanneld) then advertises that address as this node's "
            "public-ipv6: the other nodes cannot send this node's IPv6 pod traffic to it." % (
                ext.name, addr.iface_addr if addr.iface_addr.is_link_local else addr.ext_addr),
            ["give %s a global (or unique local, fc00::/7) IPv6 address in the node's network configuration, or "
             "point --iface at the interface that has one" % ext.name,
             'or, if the cluster is not meant to have IPv6, remove "EnableIPv6" from net-conf.json']))
    if not any(r.dst == IPV6.any_network for r in ctx.nl.routes(family=IPV6.af)):
        problems.append(Problem(
            "this node has no IPv6 default route\n"
            "The pods' IPv6 traffic to addresses outside the cluster (masqueraded to this node's address) has no "
            "route out, and without --iface pyflannel cannot pick its interface (`failed to get default v6 "
            "interface: unable to find default v6 route`).",
            ["add one in the node's network configuration: ip -6 route add default via <router> dev %s" % ext.name,
             "if the router advertises it: with IPv6 forwarding on, the kernel takes router advertisements only "
             "with net.ipv6.conf.%s.accept_ra=2" % ext.name]))
    return problems or "interface %s has the global IPv6 address %s, and the node an IPv6 default route" % (
        ext.name, addr.iface_addr)


def check_host_gw_l2(ctx: Context) -> Result:
    """With host-gw: every other node's public IP is on this node's L2 network (a subnet of the interface)."""
    cfg = ctx.config()
    if cfg.backend_type != "host-gw":
        return "the %s backend does not need the nodes on one L2 network" % cfg.backend_type
    ext = ctx.interface()
    keys = ctx.keys()
    own = ctx.node_name()[0]
    problems = []
    shared = []
    for family in cfg.networks:
        l2 = l2_networks(ctx.nl.routes(family=family.af), ext.index, family)
        nets = ", ".join(str(n) for n in l2) or "none: %s has no %s subnet" % (ext.name, family)
        shared.append(nets)
        far = []
        for node in ctx.nodes():
            try:
                lease = node_to_lease(node, keys, family)
            except ValueError:
                continue  # not registered by flannel: check_nodes_registered says so
            if node.name != own and lease.backend_type == cfg.backend_type and not on_link(l2, lease.public_ip):
                far.append("%s (%s)" % (node.name, lease.public_ip))
        if not far:
            continue
        problems.append(Problem(
            "nodes whose %s public IP is not on this node's L2 network (%s: %s): %s\n"
            "host-gw routes each node's pods via that node's public IP as the next hop on %s, so every node must "
            "be on one L2 network. pyflannel adds no route to these nodes' pods (it logs `Error adding route to "
            "...: node <name>'s public IP ... is not on the L2 network of %s`; flanneld's route fails with `%s`): "
            "their pods are unreachable from here." % (
                family, ext.name, nets, ", ".join(far), ext.name, ext.name, UNREACHABLE[family]),
            ['use the vxlan backend on every node ("Backend": {"Type": "vxlan", "DirectRouting": true} still routes '
             "directly, as host-gw does, between the nodes that share an L2 network)",
             "or give every node an address on one L2 network and make flannel use it (--iface=<that interface> on "
             "every node; the annotation %s shows the address a node advertises)" % keys.public_ip(family)]))
    return problems or "every node's public IP is on this node's L2 network (%s: %s)" % (ext.name, "; ".join(shared))


def check_vxlan_port(ctx: Context) -> Result:
    """The VXLAN UDP port is free, or used by flannel's own device."""
    backend = _backend_type(ctx)
    if backend != "vxlan":
        return "no VXLAN UDP port needed: the %s backend does not use one" % backend
    vx = ctx.vxlan()
    port = vx.port or DEFAULT_PORT
    devices = [device_name(vx.vni, f) for f in _families(ctx)]  # flannel.<VNI>, flannel-v6.<VNI>
    ours = devices[0]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("0.0.0.0", port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return [Problem("cannot test UDP port %d: %s" % (port, exc), ["run diagnose as root on the node"])]
    else:
        return "UDP port %d is free for %s" % (port, ours)
    finally:
        probe.close()
    users = [(link.name, link.up) for link in _vxlan_links(ctx.nl) if link.port == port]
    mine = [name for name, up in users if up and name in devices]
    if mine:
        return "UDP port %d is in use by %s, flannel's own VXLAN device" % (port, " and ".join(mine))
    others = [name for name, up in users if up and name not in devices]
    lines = ["UDP port %d (VXLAN) is taken by something other than %s" % (port, ours),
             "%s cannot be brought up while it is (`failed to set interface %s to UP state: address already in "
             "use`), so no traffic crosses between this node's pods and other nodes." % (ours, ours)]
    if others:
        lines.append("VXLAN devices using it: %s" % ", ".join(others))
    return [Problem("\n".join(lines), [
        "find the owner: ss -ulpn 'sport = :%d' (a program) or ip -d link show type vxlan (a VXLAN device of "
        "another network plugin, or an old flannel device with another VNI)" % port,
        "stop or remove it (only one network plugin may run on a node), or move flannel to another port: "
        "set \"Port\" in net-conf.json's Backend, on every node, and restart flannel everywhere"])]


def check_mtu(ctx: Context) -> Result:
    """flannel.<VNI> and subnet.env's MTU fit net-conf's MTU and the interface's."""
    if _backend_type(ctx) != "vxlan":
        return _routed_mtu(ctx)
    vx = ctx.vxlan()
    ext = ctx.interface()
    ours = device_name(vx.vni)
    want = vx.device_mtu(ext.mtu)
    source = "net-conf.json's MTU %d" % vx.mtu if 0 < vx.mtu < ext.mtu else "%s's MTU %d" % (ext.name, ext.mtu)
    problems = []
    if vx.mtu > ext.mtu:
        problems.append(Problem(
            "net-conf.json's Backend MTU %d is more than %s's MTU %d: pyflannel uses %d (%s and the pods %d)\n"
            "Packets larger than the interface's MTU cannot leave the node; flanneld would give the pods MTU %d "
            "and lose their large packets." % (vx.mtu, ext.name, ext.mtu, ext.mtu, ours, want, vx.mtu - OVERHEAD),
            ["set \"MTU\" in net-conf.json's Backend to at most the smallest interface MTU of the nodes, or "
             "remove it to use each node's interface MTU"]))
    device = [link.mtu for link in _vxlan_links(ctx.nl) if link.name == ours]
    if device and device[0] > want:
        problems.append(Problem(
            "%s has MTU %d, more than %s allows (%d = %d - %d bytes of VXLAN headers)\n"
            "Full-size packets between pods on different nodes are dropped: pings work, large transfers "
            "hang." % (ours, device[0], source, want, want + OVERHEAD, OVERHEAD),
            ["ip link set dev %s mtu %d, or delete %s (ip link del %s) and restart pyflannel, which creates it "
             "again with the right MTU" % (ours, want, ours, ours),
             "then recreate the pods on this node: a pod keeps the MTU it was created with"]))
    elif device and device[0] < want:
        problems.append(Problem(
            "%s has MTU %d, but %s allows %d: the MTU changed since %s was created"
            % (ours, device[0], source, want, ours),
            ["delete %s (ip link del %s) and restart pyflannel, which creates it again with MTU %d"
             % (ours, ours, want)]))
    env = ctx.subnet_env() or {}
    written = env.get("FLANNEL_MTU")
    if written is not None and written != str(want):
        problems.append(Problem(
            "%s says FLANNEL_MTU=%s, but %s gives %d: the MTU changed since pyflannel started\n"
            "Pods created from now on get MTU %s." % (ctx.opts.subnet_file, written, source, want, written),
            ["restart pyflannel on this node so that it writes FLANNEL_MTU=%d, then recreate the pods on this "
             "node" % want]))
    return problems or "MTU: %s %d, %s %s, pods %s (%s less %d)" % (
        ext.name, ext.mtu, ours, device[0] if device else "not created yet" if IPV4 in _families(ctx) else
        "not used (IPv6 only)", written or want, source, OVERHEAD)


def _routed_mtu(ctx: Context) -> Result:
    """host-gw's MTU: the pods get the external interface's, with nothing taken off."""
    ext = ctx.interface()
    written = (ctx.subnet_env() or {}).get("FLANNEL_MTU")
    if written is None or written == str(ext.mtu):
        return "MTU: %s %d, pods %s (host-gw: the interface's MTU)" % (ext.name, ext.mtu, written or ext.mtu)
    return [Problem(
        "%s says FLANNEL_MTU=%s, but host-gw gives the pods %s's MTU %d: the MTU changed since pyflannel started\n"
        "Pods created from now on get MTU %s." % (ctx.opts.subnet_file, written, ext.name, ext.mtu, written),
        ["restart pyflannel on this node so that it writes FLANNEL_MTU=%d, then recreate the pods on this node"
         % ext.mtu])]


def check_ip_forward(ctx: Context) -> Result:
    """IP forwarding is on for each enabled family (net.ipv4.ip_forward, net.ipv6.conf.all.forwarding)."""
    problems = []
    for family in _families(ctx):
        name = FORWARDING[family]
        value = _read_sysctl(ctx, "sys/" + name.replace(".", "/"))
        if value == "1":
            continue
        fixes = ["sysctl -w %s=1" % name,
                 "make it persistent: echo '%s = 1' >> /etc/sysctl.d/99-kubernetes.conf" % name]
        if FORWARDING_CAVEAT[family]:
            fixes.append(FORWARDING_CAVEAT[family] % _interface_name(ctx))
        problems.append(Problem(
            "IP forwarding is off (%s = %s)\n"
            "The node does not pass %s packets between its pods and the network: pods cannot reach pods on other "
            "nodes, Services or the outside over %s." % (name, value or "missing", family, family), fixes))
    return problems or "IP forwarding is on (%s)" % ", ".join("%s = 1" % FORWARDING[f] for f in _families(ctx))


def _interface_name(ctx: Context) -> str:
    """The external interface's name, or a placeholder."""
    try:
        return ctx.interface().name
    except Unavailable:
        return "<interface>"


def check_br_netfilter(ctx: Context) -> Result:
    """br_netfilter is loaded, and bridged traffic goes through iptables (ip6tables with IPv6)."""
    families = _families(ctx)
    missing = brnetfilter.missing(families, ctx.proc)
    if missing:
        return [Problem(
            "the br_netfilter module is not loaded (%s is missing)\n"
            "Traffic between pods on this node's bridge then bypasses iptables: Services (kube-proxy's rules) do "
            "not work between pods on the same node. pyflannel waits for it, not ready (/readyz 503), after "
            "logging `%s`; flanneld v0.26 and later exit." % (missing, brnetfilter.problem(missing)),
            brnetfilter.FIXES + [_persist_bridge_nf(families)])]
    names = {f: _sysctl_name(brnetfilter.SYSCTLS[f]) for f in families}
    off = {f: _read_sysctl(ctx, brnetfilter.SYSCTLS[f]) for f in families}
    off = {f: value for f, value in off.items() if value != "1"}
    if off:
        return [Problem(
            "bridged traffic bypasses %s (%s)\n"
            "Services (kube-proxy's rules) do not work between pods on the same node." % (
                " and ".join(f.iptables for f in off), ", ".join("%s = %s" % (names[f], v) for f, v in off.items())),
            [_persist_bridge_nf(list(off))])]
    return "br_netfilter is loaded (%s)" % ", ".join("%s = 1" % names[f] for f in families)


def _sysctl_name(path: str) -> str:
    """A sysctl's name from its path under /proc: ``net.bridge.bridge-nf-call-iptables``."""
    return path[len("sys/"):].replace("/", ".")


def _persist_bridge_nf(families: list[Family]) -> str:
    names = [_sysctl_name(brnetfilter.SYSCTLS[f]) for f in families]
    return "sysctl -w %s, and put %s into /etc/sysctl.d/99-kubernetes.conf" % (
        " ".join("%s=1" % n for n in names), ", ".join("%s = 1" % n for n in names))


def check_node_backends(ctx: Context) -> Result:
    """Every node flannel registered uses this backend (and, for vxlan, this VNI)."""
    keys = ctx.keys()
    cfg = ctx.config()
    data_key = keys.data(_families(ctx)[0])  # the first family's backend data: the VNI
    vni = cfg.vxlan.vni if cfg.vxlan is not None else None
    other_type, other_vni = [], []
    for node in ctx.nodes():
        kind = node.annotations.get(keys.backend_type)
        if kind is None:
            continue
        if kind != cfg.backend_type:
            other_type.append("%s (%s)" % (node.name, printable(kind, 40) or "empty"))
            continue
        if vni is None:
            continue
        try:
            theirs = json.loads(node.annotations.get(data_key, ""))["VNI"]
        except (ValueError, KeyError, TypeError, RecursionError):
            other_vni.append("%s (%s unreadable)" % (node.name, data_key))
            continue
        if theirs != vni:
            other_vni.append("%s (VNI %s)" % (node.name, printable(str(theirs), 40)))
    problems = []
    same_conf = ("use one net-conf.json on every node (one kube-flannel-cfg ConfigMap for the DaemonSet), "
                 "then restart flannel on the nodes listed")
    if other_type:
        problems.append(Problem(
            "nodes whose annotation %s is not %s: %s\n"
            "This node installs no routes to their pods (`%s`), so pods there are unreachable from here." % (
                keys.backend_type, cfg.backend_type, ", ".join(other_type),
                IGNORED_LOG.get(cfg.backend_type, "ignoring non-%s subnet" % cfg.backend_type)),
            [same_conf, "Backend.Type in net-conf.json must be the same everywhere"]))
    if other_vni:
        problems.append(Problem(
            "nodes with another VXLAN VNI than this node's %s in %s: %s\n"
            "VXLAN packets carry the VNI, and a node drops those with another one: pods on those nodes and this "
            "one cannot talk." % (vni, data_key, ", ".join(other_vni)),
            [same_conf, "Backend.VNI in net-conf.json must be the same everywhere"]))
    if vni is None:
        return problems or "every node flannel registered uses %s" % cfg.backend_type
    return problems or "every node flannel registered uses %s with VNI %d" % (cfg.backend_type, vni)


def check_nodes_registered(ctx: Context) -> Result:
    """Every node with a pod CIDR has flannel's annotations."""
    keys = ctx.keys()
    own = ctx.node_name()[0]
    public_ip = keys.public_ip(_families(ctx)[0])
    missing = []
    for node in ctx.nodes():
        ann = node.annotations
        if not _has_pod_cidr(node):
            continue
        if ann.get(keys.subnet_kube_managed) != "true" or not ann.get(public_ip):
            missing.append(node.name + (" (this node)" if node.name == own else ""))
    if not missing:
        return "flannel has registered every node that has a pod CIDR"
    return [Problem(
        "nodes flannel has not registered: %s\n"
        "They lack flannel's annotations (%s, %s), so no node routes to their pods: flannel is not running "
        "there or cannot start." % (", ".join(missing), keys.subnet_kube_managed, public_ip),
        ["check that a flannel pod runs on each: kubectl -n kube-flannel get pods -o wide (the DaemonSet's "
         "tolerations or nodeSelector can keep it off nodes)",
         "read the log of the flannel pod of each node listed"])]


CHECKS: tuple[tuple[str, Callable[[Context], Result]], ...] = (
    ("flags", check_flags),
    ("net-conf.json", check_net_conf),
    ("API server", check_api),
    ("this node's name", check_node_name),
    ("this node's pod CIDR", check_own_pod_cidr),
    ("other nodes' pod CIDRs", check_other_pod_cidrs),
    ("pod CIDRs inside the Network", check_pod_cidrs_in_network),
    ("subnet.env", check_subnet_env_exists),
    ("subnet.env's FLANNEL_NETWORK", check_subnet_env_network),
    ("subnet.env's FLANNEL_SUBNET", check_subnet_env_subnet),
    ("interface", check_interface),
    ("Network and the node's address", check_network_overlap),
    ("IPv6 on the interface", check_ipv6_interface),
    ("host-gw: nodes on one L2 network", check_host_gw_l2),
    ("VXLAN UDP port", check_vxlan_port),
    ("MTU", check_mtu),
    ("IP forwarding", check_ip_forward),
    ("br_netfilter", check_br_netfilter),
    ("other nodes' backend", check_node_backends),
    ("nodes registered by flannel", check_nodes_registered),
)


def write(out: TextIO, result: Result) -> int:
    """Print one check's lines; the number of problems."""
    if isinstance(result, str):
        print("ok    %s" % printable(result), file=out)
        return 0
    for problem in result:  # values from the API in these lines cannot send terminal escapes
        headline, *explanation = problem.what.split("\n")
        print("FAIL  %s" % printable(headline), file=out)
        for line in explanation:
            print("      %s" % printable(line), file=out)
        for line in problem.fix:
            print("      fix: %s" % printable(line), file=out)
    return len(result)


def run(ctx: Context, out: TextIO, found: int = 0) -> int:
    """Run every check in order, print the results, and return the number of problems (with ``found``,
    those a caller printed before, counted in the closing line)."""
    problems = found
    for title, check in CHECKS:
        try:
            result = check(ctx)
        except Unavailable as exc:
            print("skip  %s: needs %s" % (title, exc.needs), file=out)
            continue
        problems += write(out, result)
    if problems:
        print("%d problem%s found; fix them top down: later ones are often caused by earlier ones"
              % (problems, "" if problems == 1 else "s"), file=out)
    return problems


def main(argv: list[str], environ: Mapping[str, str], proc: str = "/proc", out: TextIO | None = None) -> int:
    """``pyflannel diagnose [flags]``: 0 if every check passed, 1 if any problem was found, 2 on bad flags."""
    opts = flags.parse_or_exit_code(argv, environ, "pyflannel diagnose",
                                    "Checks this node and the cluster with the daemon's flags; changes nothing.")
    if isinstance(opts, int):
        return opts
    return run_checks(opts, environ, proc, out or sys.stdout)


def run_checks(opts: flags.Options, environ: Mapping[str, str], proc: str, out: TextIO, found: int = 0) -> int:
    """Run every check of this node with the daemon's flags; 1 if any problem was found (``found``: the
    problems the caller found before), else 0."""
    ctx = Context(opts, environ, proc)
    try:
        return 1 if run(ctx, out, found) else 0
    finally:
        ctx.close()
