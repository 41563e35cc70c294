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
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from ipaddress import IPv4Network, ip_network
from typing import Any, TextIO, TypeVar, cast

from . import flags, ip, subnetfile
from .config import OVERHEAD, Config, ConfigError, VXLANConfig, default_subnet_len, load
from .kubeclient import ApiError, KubeClient
from .netlink import Netlink
from .subnet.annotations import AnnotationKeys, PrefixError
from .backend.vxlan import DEFAULT_PORT, VXLANLink, device_name, read_link
from .family import IPV4
from .subnet.kube import NodeInfo, ipv4_pod_cidr, list_nodes, node_info

__all__ = ["CHECKS", "Context", "Problem", "Unavailable", "main", "run"]

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
SUBNET_ENV_KEYS = ("FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ")
IP_FORWARD = "sys/net/ipv4/ip_forward"
BRIDGE_NF_CALL_IPTABLES = "sys/net/bridge/bridge-nf-call-iptables"
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

    def __init__(self, opts: flags.Options, environ: Mapping[str, str], proc: str = "/proc") -> None:
        self.opts = opts
        self.environ = environ
        self.proc = proc
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

    @cached_property
    def nl(self) -> Netlink:
        """A netlink socket of this network namespace."""
        return Netlink()

    def close(self) -> None:
        """Close the netlink socket if one was opened."""
        if "nl" in self.__dict__:
            self.nl.close()

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
            page = client.list_nodes(1, field_selector="metadata.name=" + name)
        except ApiError as exc:
            raise Unavailable("the node list from the API server", exc) from exc
        for item in page.get("items") or ():
            return node_info(item, prefix)
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
            return ip.select(self.nl, o.iface, o.iface_regex, o.iface_can_reach, o.public_ip)
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

    def network_text(self) -> str:
        """net-conf.json's Network, or a placeholder when it cannot be read."""
        try:
            return str(self.config().network)
        except Unavailable:
            return "<the Network of net-conf.json>"

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
    network = ctx.network_text()
    fixes = [
        "let kube-controller-manager assign pod CIDRs: run it with --allocate-node-cidrs=true "
        "--cluster-cidr=%s (the Network of net-conf.json)" % network,
        "with kubeadm: kubeadm init --pod-network-cidr=%s; on an existing cluster add both flags to "
        "/etc/kubernetes/manifests/kube-controller-manager.yaml" % network,
    ]
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
        problems.append(Problem(
            "--kube-subnet-mgr is not set\n"
            "The daemon then keeps its leases in etcd (%s); diagnose checks only Kubernetes clusters."
            % ctx.opts.etcd_endpoints,
            ["in a Kubernetes cluster, add --kube-subnet-mgr to the daemon's command line (diagnose takes the "
             "daemon's flags; give it the same ones)",
             "in etcd mode, read the leases with: etcdctl --endpoints=%s get --prefix %s"
             % (ctx.opts.etcd_endpoints, ctx.opts.etcd_prefix)]))
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
    vx = ctx.vxlan()
    return "net-conf.json %s: Network %s, backend %s, VNI %d, UDP port %d" % (
        ctx.opts.net_config_path, cfg.network, cfg.backend_type, vx.vni, vx.port or DEFAULT_PORT)


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
    cidr = ipv4_pod_cidr(node)
    if cidr:
        return 'node "%s" has the pod CIDR %s' % (node.name, cidr)
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
    missing = [n.name for n in others if not ipv4_pod_cidr(n)]
    if not missing:
        return "the other %d nodes have pod CIDRs" % len(others)
    return [Problem(
        "other nodes without a pod CIDR: %s\n"
        "flannel cannot run on them (flanneld logs `failed to acquire lease: node \"<name>\" pod cidr not "
        "assigned`), so their pods stay in ContainerCreating and no node can route to them." % ", ".join(missing),
        _pod_cidr_fixes(ctx, missing))]


def check_pod_cidrs_in_network(ctx: Context) -> Result:
    """Every pod CIDR lies inside net-conf's Network."""
    network = ctx.config().network
    outside: list[tuple[str, str]] = []
    for node in ctx.nodes():
        cidr = ipv4_pod_cidr(node)
        if not cidr:
            continue
        try:
            net = ip_network(cidr, strict=False)
        except ValueError:
            outside.append((node.name, cidr + ", not a valid CIDR"))
            continue
        if network is not None and not (isinstance(net, IPv4Network) and net.subnet_of(network)):
            outside.append((node.name, cidr))
    if not outside:
        return "every pod CIDR is inside the Network %s" % network
    name, cidr = outside[0]
    return [Problem(
        "pod CIDRs outside the Network %s of net-conf.json: %s\n"
        "flanneld refuses such a node (`subnet \"%s\" specified in the flannel net config doesn't contain "
        "\"%s\" PodCIDR of the \"%s\" node`), and the routes and masquerading rules of every node cover "
        "only the Network." % (network, ", ".join("%s (%s)" % o for o in outside), network, cidr, name),
        ["make kube-controller-manager's --cluster-cidr (kubeadm: --pod-network-cidr) and net-conf.json's "
         "Network agree; they must name the same network",
         "a node keeps the pod CIDR it was given: after changing --cluster-cidr, delete and re-join (or "
         "re-register) the nodes listed above so that they get a pod CIDR from the new range"])]


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
    missing = [k for k in SUBNET_ENV_KEYS if k not in env]
    if missing:
        return [Problem(
            "%s lacks %s\n"
            "The CNI plugin fails every pod ADD with `%s is missing %s`." % (path, ", ".join(missing), path,
                                                                              ", ".join(missing)),
            ["do not edit the file: restart pyflannel on this node, it rewrites the file at every start",
             "read the pyflannel log on this node: %s" % ctx.log_hint()])]
    return "%s exists (FLANNEL_SUBNET=%s, FLANNEL_MTU=%s)" % (path, env["FLANNEL_SUBNET"], env["FLANNEL_MTU"])


def check_subnet_env_network(ctx: Context) -> Result:
    """subnet.env's FLANNEL_NETWORK is net-conf's Network."""
    network = ctx.config().network
    path = _existing_subnet_env(ctx)
    previous, _ = subnetfile.read_previous(path, IPV4)
    if previous == network:
        return "FLANNEL_NETWORK in %s is net-conf.json's Network %s" % (path, network)
    return [Problem(
        "%s says FLANNEL_NETWORK=%s, but net-conf.json's Network is %s\n"
        "Either the file is stale (left from an older configuration) or net-conf.json changed after pyflannel "
        "wrote it. Until pyflannel rewrites it, new pods on this node get their addresses and their route to "
        "other pods from the old network." % (path, previous or "<missing or invalid>", network),
        ["restart pyflannel on this node (delete its flannel pod, or systemctl restart pyflannel): it "
         "rewrites the file from net-conf.json at every start",
         "if the new Network is intended: every node's pod CIDR must lie inside it (kube-controller-manager "
         "--cluster-cidr), and pods created before the change must be recreated",
         "if it is not: put the old Network back into net-conf.json"])]


def check_subnet_env_subnet(ctx: Context) -> Result:
    """subnet.env's FLANNEL_SUBNET is this node's pod CIDR."""
    path = _existing_subnet_env(ctx)
    cidr = ipv4_pod_cidr(ctx.own_node())
    if not cidr:
        raise Unavailable("a pod CIDR of this node", LookupError("no pod CIDR"))
    _, previous = subnetfile.read_previous(path, IPV4)
    try:
        own = ip_network(cidr, strict=False)
    except ValueError:
        own = None
    if previous is not None and previous == own:
        return "FLANNEL_SUBNET in %s is within this node's pod CIDR %s" % (path, cidr)
    return [Problem(
        "%s has FLANNEL_SUBNET for %s, but this node's pod CIDR is %s\n"
        "New pods on this node get addresses that the other nodes do not route here." % (
            path, previous or "<missing or invalid>", cidr),
        ["restart pyflannel on this node: it rewrites the file from the node's pod CIDR at every start",
         "then recreate the pods of this node that have addresses outside %s" % cidr])]


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
    return problems or "interface %s (%s, MTU %d) from %s carries the tunnel" % (ext.name, ext.iface_addr,
                                                                                  ext.mtu, chosen)


def _interface_problem(ctx: Context, error: str) -> Problem:
    o = ctx.opts
    given = ["--iface=%s" % v for v in o.iface] + ["--iface-regex=%s" % v for v in o.iface_regex]
    if o.iface_can_reach:
        given.append("--iface-can-reach=%s" % o.iface_can_reach)
    if "failed to find IPv4 address for interface" in error:
        name = error.rsplit(" ", 1)[-1]
        headline = "interface %s has no IPv4 address" % name
        why = "The VXLAN tunnel runs over IPv4, and that address is where the other nodes send to."
        fixes = ["give %s its IPv4 address (check the node's network configuration), or point --iface at the "
                 "interface that has the node's IP" % name]
    elif "default" in error:
        headline = "no interface given and no default route to choose one from"
        why = "Without --iface, flannel uses the interface of the default route."
        fixes = ["pass --iface=<interface or IP> of the node's network, or add a default route"]
    else:
        headline = "no interface matches %s" % " ".join(given or ["--public-ip=%s" % o.public_ip])
        why = "flannel needs the interface that carries the node's IP to run the tunnel over."
        fixes = ["pass --iface=<interface or IP> with the interface that has the node's IP (ip -4 addr); the "
                 "same flag must be in the DaemonSet's args"]
    lines = [headline, why, "pyflannel stops with `%s`." % error]
    lines += ["it logs: %s" % line for line in ctx.interface_log if line.startswith("Could not find")]
    lines.append("interfaces here: %s" % _interfaces_text(ctx))
    return Problem("\n".join(lines), fixes)


def _interfaces_text(ctx: Context) -> str:
    addrs: dict[int, list[str]] = {}
    for m in ctx.nl.addresses():
        addrs.setdefault(int(m["index"]), []).append(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
    parts = []
    for link in sorted(ctx.nl.links(), key=lambda m: int(m["index"])):
        name = link.get_attr("IFLA_IFNAME")
        parts.append("%s (%s)" % (name, ", ".join(addrs.get(int(link["index"]), [])) or "no IPv4 address"))
    return ", ".join(parts)


def check_network_overlap(ctx: Context) -> Result:
    """net-conf's Network does not contain this node's own address."""
    network = ctx.config().network
    ext = ctx.interface()
    if network is None or ext.iface_addr not in network:
        return "the Network %s does not contain this node's address %s" % (network, ext.iface_addr)
    return [Problem(
        "the Network %s contains this node's own address %s (on %s)\n"
        "Pod routes then cover the node network: nodes and pods get unreachable." % (network, ext.iface_addr,
                                                                                       ext.name),
        ["choose a Network that does not overlap the node network, in net-conf.json and in "
         "kube-controller-manager's --cluster-cidr alike"])]


def check_vxlan_port(ctx: Context) -> Result:
    """The VXLAN UDP port is free, or used by flannel's own device."""
    vx = ctx.vxlan()
    port = vx.port or DEFAULT_PORT
    ours = device_name(vx.vni)
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
    if (ours, True) in users:
        return "UDP port %d is in use by %s, flannel's own VXLAN device" % (port, ours)
    others = [name for name, up in users if up and name != ours]
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
        ext.name, ext.mtu, ours, device[0] if device else "not created yet", written or want, source, OVERHEAD)


def check_ip_forward(ctx: Context) -> Result:
    """net.ipv4.ip_forward is on."""
    value = _read_sysctl(ctx, IP_FORWARD)
    if value == "1":
        return "IP forwarding is on (net.ipv4.ip_forward = 1)"
    return [Problem(
        "IP forwarding is off (net.ipv4.ip_forward = %s)\n"
        "The node does not pass packets between pods, the VXLAN device and the network: pods cannot reach "
        "pods on other nodes, Services or the outside." % (value or "missing"),
        ["sysctl -w net.ipv4.ip_forward=1",
         "make it persistent: echo 'net.ipv4.ip_forward = 1' > /etc/sysctl.d/99-kubernetes.conf"])]


def check_br_netfilter(ctx: Context) -> Result:
    """br_netfilter is loaded and bridged traffic goes through iptables."""
    value = _read_sysctl(ctx, BRIDGE_NF_CALL_IPTABLES)
    if value == "1":
        return "br_netfilter is loaded (net.bridge.bridge-nf-call-iptables = 1)"
    persist = ("sysctl -w net.bridge.bridge-nf-call-iptables=1, and put net.bridge.bridge-nf-call-iptables = 1 "
               "into /etc/sysctl.d/99-kubernetes.conf")
    if value is None:
        return [Problem(
            "the br_netfilter module is not loaded (%s is missing)\n"
            "Traffic between pods on this node's bridge then bypasses iptables: Services (kube-proxy's rules) do "
            "not work between pods on the same node." % os.path.join(ctx.proc, BRIDGE_NF_CALL_IPTABLES),
            ["modprobe br_netfilter",
             "load it at boot: echo br_netfilter > /etc/modules-load.d/br_netfilter.conf",
             persist])]
    return [Problem(
        "bridged traffic bypasses iptables (net.bridge.bridge-nf-call-iptables = %s)\n"
        "Services (kube-proxy's rules) do not work between pods on the same node." % value, [persist])]


def check_node_backends(ctx: Context) -> Result:
    """Every node flannel registered uses this backend and VNI."""
    keys = ctx.keys()
    cfg = ctx.config()
    vni = ctx.vxlan().vni
    other_type, other_vni = [], []
    for node in ctx.nodes():
        kind = node.annotations.get(keys.backend_type)
        if kind is None:
            continue
        if kind != cfg.backend_type:
            other_type.append("%s (%s)" % (node.name, kind or "empty"))
            continue
        try:
            theirs = json.loads(node.annotations.get(keys.backend_data, ""))["VNI"]
        except (ValueError, KeyError, TypeError):
            other_vni.append("%s (backend-data unreadable)" % node.name)
            continue
        if theirs != vni:
            other_vni.append("%s (VNI %s)" % (node.name, theirs))
    problems = []
    same_conf = ("use one net-conf.json on every node (one kube-flannel-cfg ConfigMap for the DaemonSet), "
                 "then restart flannel on the nodes listed")
    if other_type:
        problems.append(Problem(
            "nodes whose annotation %s is not %s: %s\n"
            "This node installs no routes to their pods (`ignoring non-%s v4Subnet(...): type=...`), so pods "
            "there are unreachable from here." % (keys.backend_type, cfg.backend_type, ", ".join(other_type),
                                                  cfg.backend_type),
            [same_conf, "Backend.Type in net-conf.json must be the same everywhere"]))
    if other_vni:
        problems.append(Problem(
            "nodes with another VXLAN VNI than this node's %d in %s: %s\n"
            "VXLAN packets carry the VNI, and a node drops those with another one: pods on those nodes and this "
            "one cannot talk." % (vni, keys.backend_data, ", ".join(other_vni)),
            [same_conf, "Backend.VNI in net-conf.json must be the same everywhere"]))
    return problems or "every node flannel registered uses %s with VNI %d" % (cfg.backend_type, vni)


def check_nodes_registered(ctx: Context) -> Result:
    """Every node with a pod CIDR has flannel's annotations."""
    keys = ctx.keys()
    own = ctx.node_name()[0]
    missing = []
    for node in ctx.nodes():
        ann = node.annotations
        if not ipv4_pod_cidr(node):
            continue
        if ann.get(keys.subnet_kube_managed) != "true" or not ann.get(keys.backend_public_ip):
            missing.append(node.name + (" (this node)" if node.name == own else ""))
    if not missing:
        return "flannel has registered every node that has a pod CIDR"
    return [Problem(
        "nodes flannel has not registered: %s\n"
        "They lack flannel's annotations (%s, %s), so no node routes to their pods: flannel is not running "
        "there or cannot start." % (", ".join(missing), keys.subnet_kube_managed, keys.backend_public_ip),
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
    ("VXLAN UDP port", check_vxlan_port),
    ("MTU", check_mtu),
    ("net.ipv4.ip_forward", check_ip_forward),
    ("br_netfilter", check_br_netfilter),
    ("other nodes' backend", check_node_backends),
    ("nodes registered by flannel", check_nodes_registered),
)


def _write(out: TextIO, result: Result) -> int:
    """Print one check's lines; the number of problems."""
    if isinstance(result, str):
        print("ok    %s" % result, file=out)
        return 0
    for problem in result:
        headline, *explanation = problem.what.split("\n")
        print("FAIL  %s" % headline, file=out)
        for line in explanation:
            print("      %s" % line, file=out)
        for line in problem.fix:
            print("      fix: %s" % line, file=out)
    return len(result)


def run(ctx: Context, out: TextIO) -> int:
    """Run every check in order, print the results, and return the number of problems."""
    problems = 0
    for title, check in CHECKS:
        try:
            result = check(ctx)
        except Unavailable as exc:
            print("skip  %s: needs %s" % (title, exc.needs), file=out)
            continue
        problems += _write(out, result)
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
    ctx = Context(opts, environ, proc)
    try:
        return 1 if run(ctx, out or sys.stdout) else 0
    finally:
        ctx.close()
