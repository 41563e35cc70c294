"""A cluster of network namespaces for tests, the demo and benchmarks.

An underlay namespace ``<prefix>-hub`` holds the bridge ``br0`` (192.168.56.1/24) and the in-repo
API server, listening on 192.168.56.1:6443. Each node is a namespace with an ``eth1`` on that
bridge, running a real pyflannel process; each pod is a namespace attached to its node by the real
CNI ``bridge`` and ``host-local`` plugins, configured from the node's subnet.env the way flannel's
CNI plugin does. Nothing is created outside these namespaces except files under ``workdir``.

The stack is ``v4`` (the default), ``dual`` or ``v6`` (IPv6-only: ``"EnableIPv4": false``). With
IPv6 the bridge also has fd56::1/64 and node i fd56::<10+i>/64 (ULA) with an IPv6 default route via
the hub; each node gets a /64 of the IPv6 Network as its second pod CIDR (its only one in ``v6``).
The underlay keeps IPv4 in every stack: the API server listens there.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import TypeVar

from tools.etcdserver import EtcdServer
from tools.kubeapi import FakeKubeAPI, make_test_certs, tls_context

REPO = Path(__file__).resolve().parent.parent
CNI_PATH = os.environ.get("CNI_PATH", "/usr/lib/cni")
HUB_IP = "192.168.56.1"
HUB_IP6 = "fd56::1"
STACKS = ("v4", "dual", "v6")
API_PORT = 6443
ETCD_PORT = 2379
ETCD_PREFIX = "/coreos.com/network"
TOKEN = "pyflannel-test-token"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def run(*cmd: str, check: bool = True, input: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command (an argument list, never a shell string)."""
    res = subprocess.run(list(cmd), input=input, capture_output=True, text=True, env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError("%s failed (%d): %s%s" % (" ".join(cmd), res.returncode, res.stdout, res.stderr))
    return res


def in_netns(netns: str, make: Callable[[], T]) -> T:
    """``make()``, called in a short-lived thread that entered ``netns``: a socket it creates lives there."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T | BaseException] = []

    def enter() -> None:
        try:
            fd = os.open("/var/run/netns/%s" % netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns %s" % netns)
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def socket_in_netns(netns: str, addr: tuple[str, int], kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket bound to ``addr`` inside ``netns``."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        return s

    return in_netns(netns, make)


@dataclass
class Pod:
    name: str
    netns: str
    ips: list[str]
    node: "Node"

    @property
    def ip(self) -> str:
        """The pod's first address (its IPv4 one unless the stack is IPv6-only)."""
        return self.ips[0]

    @property
    def ip6(self) -> str | None:
        """The pod's IPv6 address, if it has one."""
        return next((ip for ip in self.ips if ":" in ip), None)


@dataclass
class Node:
    name: str
    netns: str
    ip: str
    dir: Path
    ip6: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    pods: list[Pod] = field(default_factory=list)

    @property
    def subnet_file(self) -> Path:
        return self.dir / "subnet.env"

    @property
    def log_file(self) -> Path:
        return self.dir / "pyflannel.log"

    def log(self) -> str:
        """The daemon's log so far."""
        try:
            return self.log_file.read_text()
        except OSError:
            return ""


class Cluster:
    """Namespaces, an API server and pyflannel processes; ``close()`` removes them all."""

    def __init__(self, workdir: str | Path, network: str = "10.244.0.0/16", backend: dict | None = None,
                 prefix: str | None = None, python: str = sys.executable, kubeconfig: bool = True,
                 stack: str = "v4", ipv6_network: str = "fd00:10:244::/56", etcd: bool = False,
                 tls: bool = False) -> None:
        """``kubeconfig=False``: the daemons reach the API with ``--kube-api-url`` alone, unauthenticated,
        the way a pod's in-cluster config costs nothing more than HTTP (benchmarks use this).
        ``stack``: one of STACKS; ``backend``: net-conf's Backend (default vxlan).
        ``etcd=True``: the daemons run in etcd mode against a real etcd in the hub, at
        HUB_IP:ETCD_PORT, holding the network config under ETCD_PREFIX.
        ``tls=True``: the API server speaks HTTPS with a certificate for HUB_IP from a test CA
        (``ca_cert``, named in the kubeconfig), as a real one does for in-cluster clients."""
        if stack not in STACKS:
            raise ValueError("stack must be one of %s" % (STACKS,))
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix or "pf" + secrets.token_hex(2)
        self.stack = stack
        self.network = IPv4Network(network)
        self.ipv6_network = IPv6Network(ipv6_network)
        self.python = python
        self.nodes: dict[str, Node] = {}
        self.namespaces: list[str] = []
        self.api: FakeKubeAPI | None = None
        self.etcd: EtcdServer | None = None
        self.net_conf = self.workdir / "net-conf.json"
        conf: dict[str, object] = {"Network": network} if self.ipv4 else {"EnableIPv4": False}
        if self.ipv6:
            conf.update(EnableIPv6=True, IPv6Network=ipv6_network)
        conf["Backend"] = backend or {"Type": "vxlan"}
        self.net_conf.write_text(json.dumps(conf))
        self.kubeconfig: Path | None = self.workdir / "kubeconfig" if kubeconfig else None
        self.api_url = "%s://%s:%d" % ("https" if tls else "http", HUB_IP, API_PORT)
        self.ca_cert: str | None = None
        cert = key = ""
        if tls:
            self.ca_cert, cert, key = make_test_certs(str(self.workdir), HUB_IP)
        if self.kubeconfig is not None:
            cluster_entry = {"server": self.api_url}
            if self.ca_cert:
                cluster_entry["certificate-authority"] = self.ca_cert
            self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
                "clusters": [{"name": "test", "cluster": cluster_entry}],
                "users": [{"name": "test", "user": {"token": TOKEN}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            }))
        try:
            self.hub = self._netns("hub")
            self.ns_run(self.hub, "ip", "link", "add", "br0", "type", "bridge")
            self.ns_run(self.hub, "ip", "addr", "add", HUB_IP + "/24", "dev", "br0")
            if self.ipv6:
                self.ns_run(self.hub, "ip", "addr", "add", HUB_IP6 + "/64", "dev", "br0")
            self.ns_run(self.hub, "ip", "link", "set", "br0", "up")
            self.api = FakeKubeAPI(token=TOKEN if kubeconfig else None)
            self.api.start(sock=socket_in_netns(self.hub, (HUB_IP, API_PORT)),
                           tls=tls_context(cert, key) if tls else None)
            if etcd:
                self.etcd = EtcdServer(self.workdir / "etcd", HUB_IP, ETCD_PORT, ETCD_PORT + 1, netns=self.hub)
                self.etcd.start()
                self.etcd.etcdctl("put", ETCD_PREFIX + "/config", self.net_conf.read_text())
        except BaseException:
            self.close()
            raise

    @property
    def ipv4(self) -> bool:
        """True if the pod network has IPv4 (stacks v4 and dual)."""
        return self.stack != "v6"

    @property
    def ipv6(self) -> bool:
        """True if the pod network and the underlay have IPv6 (stacks dual and v6)."""
        return self.stack != "v4"

    # -- namespaces --------------------------------------------------------------------------------

    def _netns(self, name: str) -> str:
        ns = "%s-%s" % (self.prefix, name)
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        if self.ipv6:
            # Addresses are usable at once, not "tentative" for a second of duplicate address detection.
            self.ns_run(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        self.ns_run(ns, "ip", "link", "set", "lo", "up")
        return ns

    @staticmethod
    def ns_run(netns: str, *cmd: str, check: bool = True, input: str | None = None,
               env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command inside a namespace."""
        return run("ip", "netns", "exec", netns, *cmd, check=check, input=input, env=env, timeout=timeout)

    @staticmethod
    def http_get(netns: str, url: str, timeout: float = 5) -> tuple[int, str]:
        """GET ``url`` from inside a namespace: the HTTP status (0 if no answer came) and the body ('' with an
        error status)."""
        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as res:
                    return res.status, res.read().decode(errors="replace")
            except urllib.error.HTTPError as exc:
                return exc.code, ""
            except (OSError, http.client.HTTPException):
                return 0, ""

        return in_netns(netns, get)

    def pod_cidrs(self, i: int) -> list[str]:
        """The pod CIDRs the controller-manager gives the i-th node: 10.244.<i>.0/24 and/or the i-th /64."""
        cidrs = [str(IPv4Network((int(self.network.network_address) + (i << 8), 24)))] if self.ipv4 else []
        if self.ipv6:
            cidrs.append(str(IPv6Network((int(self.ipv6_network.network_address) + (i << 64), 64))))
        return cidrs

    def add_node(self, name: str, pod_cidr: str | list[str] | None = "auto") -> Node:
        """A node namespace with eth1 on the underlay, registered with the API server.

        ``pod_cidr="auto"`` gives the n-th node pod_cidrs(n) (within the networks); None gives none;
        a list is the node's spec.podCIDRs.
        """
        assert self.api is not None
        i = len(self.nodes) + 1
        netns = self._netns(name)
        ip = "192.168.56.%d" % (10 + i)
        ip6 = "fd56::%d" % (10 + i) if self.ipv6 else None
        peer = "%sv%d" % (self.prefix, i)
        run("ip", "link", "add", "eth1", "netns", netns, "type", "veth", "peer", "name", peer, "netns", self.hub)
        self.ns_run(self.hub, "ip", "link", "set", peer, "master", "br0", "up")
        self.ns_run(netns, "ip", "addr", "add", ip + "/24", "dev", "eth1")
        if ip6 is not None:
            self.ns_run(netns, "ip", "addr", "add", ip6 + "/64", "dev", "eth1")
        self.ns_run(netns, "ip", "link", "set", "eth1", "up")
        self.ns_run(netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        if ip6 is not None:
            self.ns_run(netns, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
            self.ns_run(netns, "ip", "-6", "route", "add", "default", "via", HUB_IP6, "dev", "eth1")
        if pod_cidr == "auto":
            pod_cidr = self.pod_cidrs(i)
        d = self.workdir / name
        d.mkdir(exist_ok=True)
        node = Node(name, netns, ip, d, ip6)
        self.nodes[name] = node
        self.api.add_node(name, pod_cidr=pod_cidr, internal_ip=ip)
        return node

    # -- the daemon ---------------------------------------------------------------------------------

    def flags(self, node: Node) -> list[str]:
        """The kube-flannel command line's flags for a node (the tests' health port and iptables resync)."""
        api = "--kubeconfig-file=%s" % self.kubeconfig if self.kubeconfig else "--kube-api-url=" + self.api_url
        sm = ["--etcd-endpoints=" + self.etcd.url] if self.etcd else ["--kube-subnet-mgr", api]
        return ["--ip-masq", *sm, "--iface=eth1", "--net-config-path=%s" % self.net_conf,
                "--subnet-file=%s" % node.subnet_file, "--healthz-port=8471", "--iptables-resync=1"]

    def start(self, node: Node, *extra: str, env: dict[str, str] | None = None) -> None:
        """Start pyflannel on a node with the kube-flannel command line."""
        args = [self.python, "-m", "pyflannel", *self.flags(node), *extra]
        penv = self._env(node)
        penv.update(env or {})
        with open(node.log_file, "ab") as out:
            node.proc = subprocess.Popen(["ip", "netns", "exec", node.netns, *args], stdout=out,
                                         stderr=subprocess.STDOUT, env=penv, cwd=str(REPO))

    @staticmethod
    def _env(node: Node) -> dict[str, str]:
        """The environment of a pyflannel process on a node: this one's, with NODE_NAME and this repository."""
        return dict(os.environ, NODE_NAME=node.name, PYTHONPATH=str(REPO))

    def probes(self, node: Node) -> dict:
        """The datapath probes' results of the node's daemon (its /probes, as JSON)."""
        url = "http://127.0.0.1:8471/probes"
        status, body = self.http_get(node.netns, url)
        if status != 200:
            raise RuntimeError("GET %s on %s: %s" % (url, node.name, status or "no answer"))
        return json.loads(body)  # type: ignore[no-any-return]

    def command(self, node: Node, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """Run ``pyflannel <name>`` (diagnose, check) on a node with its daemon's flags."""
        return self.ns_run(node.netns, self.python, "-m", "pyflannel", name, *self.flags(node), *extra, check=False,
                           env=self._env(node), timeout=60)

    def stop(self, node: Node, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Signal the daemon and wait for it; its exit code (None if it had to be killed)."""
        if node.proc is None:
            return None
        proc, node.proc = node.proc, None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return None
        return proc.returncode

    def wait_for(self, what: str, cond: object, timeout: float = 30, interval: float = 0.1) -> object:
        """Poll ``cond()`` until it returns something truthy; raise TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            value = cond()  # type: ignore[operator]
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError("timed out waiting for " + what)
            time.sleep(interval)

    def wait_ready(self, node: Node, timeout: float = 60) -> None:
        """Wait until the node's /readyz says ready."""
        def ready() -> bool:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError("pyflannel on %s exited %s:\n%s" % (node.name, node.proc.returncode, node.log()))
            return self.http_get(node.netns, "http://127.0.0.1:8471/readyz", timeout=2)[0] == 200
        self.wait_for("%s to be ready" % node.name, ready, timeout, 0.3)

    # -- pods ---------------------------------------------------------------------------------------

    def subnet_env(self, node: Node) -> dict[str, str]:
        """The node's subnet.env as the CNI plugin reads it."""
        values = {}
        for line in node.subnet_file.read_text().splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values

    def _cni(self, node: Node, command: str, pod_name: str, netns: str) -> str:
        # flannel's CNI plugin: one range per subnet in subnet.env (IPv4 first), masked, and a route to
        # each Network via the bridge's gateway.
        env = self.subnet_env(node)
        ranges, routes = [], []
        for net_key, subnet_key in (("FLANNEL_NETWORK", "FLANNEL_SUBNET"), ("FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET")):
            if subnet_key in env:
                ranges.append([{"subnet": str(ip_network(env[subnet_key], strict=False))}])
                routes.append({"dst": env[net_key]})
        conf = {
            "cniVersion": "0.3.1", "name": "cbr0", "type": "bridge", "hairpinMode": True,
            "ipMasq": env["FLANNEL_IPMASQ"] != "true", "isGateway": True, "isDefaultGateway": True,
            "mtu": int(env["FLANNEL_MTU"]),
            "ipam": {"type": "host-local", "ranges": ranges, "routes": routes, "dataDir": str(node.dir / "ipam")},
        }
        cni_env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=pod_name, CNI_NETNS="/var/run/netns/" + netns,
                       CNI_IFNAME="eth0", CNI_PATH=CNI_PATH)
        res = self.ns_run(node.netns, os.path.join(CNI_PATH, "bridge"), input=json.dumps(conf), env=cni_env)
        return res.stdout

    def start_nodes_with_pods(self, *names: str) -> list[Node]:
        """Add and start the named nodes, wait until each is ready, then attach one pod to each
        (``pod1``, ``pod2``, … in the order given)."""
        nodes = []
        for name in names:
            nodes.append(self.add_node(name))
            self.start(nodes[-1])
        for node in nodes:
            self.wait_ready(node)
        for i, node in enumerate(nodes):
            self.add_pod(node, "pod%d" % (i + 1))
        return nodes

    def add_pod(self, node: Node, name: str) -> Pod:
        """A pod namespace attached by the CNI bridge plugin from the node's subnet.env."""
        netns = self._netns(name)
        result = json.loads(self._cni(node, "ADD", name, netns))
        pod = Pod(name, netns, [entry["address"].split("/")[0] for entry in result["ips"]], node)
        node.pods.append(pod)
        return pod

    def ping(self, src: Pod | Node, dst_ip: str, count: int = 1, timeout: int = 2) -> bool:
        """One ping from a pod or node (``ping -6`` for an IPv6 address); True if it was answered."""
        family = "-6" if ":" in dst_ip else "-4"
        res = self.ns_run(src.netns, "ping", family, "-c", str(count), "-i", "0.2", "-W", str(timeout), dst_ip,
                          check=False, timeout=count * timeout + 5)
        return res.returncode == 0

    def logs(self) -> str:
        """Every node's daemon log, for a failure report."""
        return "".join("---- %s ----\n%s" % (node.name, node.log()) for node in self.nodes.values())

    # -- cleanup ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every daemon and the API server, and delete every namespace this cluster made."""
        for node in self.nodes.values():
            self.stop(node, signal.SIGKILL, timeout=5)
        if self.api is not None:
            self.api.stop()
        if self.etcd is not None:
            self.etcd.close()
        for ns in reversed(self.namespaces):
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None and self.nodes:
            print(self.logs(), file=sys.stderr)  # what the daemons said before it went wrong
        self.close()
