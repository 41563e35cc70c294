"""The built image, run as the kube-flannel DaemonSets run it, in the namespace cluster.

scripts/build-image.sh builds the image (or finds it up to date: it is labelled with a hash of its
inputs). Three nodes run a DaemonSet's pod with podman (tools/kubelet.py), each with only the image
names changed to the local image:

- k8s02: pyflannel's own deploy/kube-flannel.yml (deploy/render.sh), on a node whose iptables rules
  were made with iptables-legacy;
- k8s03: flannel v0.28.9's Documentation/kube-flannel.yml, on a node whose rules were made with
  iptables-nft;
- k8s04: the v0.28.9 Helm chart's DaemonSet, rendered with its default values.

k8s01 runs pyflannel from the virtualenv. The API server speaks HTTPS with a test CA, and the pods
reach it with the service-account token mounted in kubelet's layout, as in a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import needs_netns
from tools.kubelet import DaemonSetPod, podman
from tools.netcluster import HUB_IP, Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns]

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "flannel-v0.28.9"
IMAGE = os.environ.get("PYFLANNEL_IMAGE", "localhost/pyflannel:dev")
FLANNEL_IMAGE = "ghcr.io/flannel-io/flannel:v0.28.9"
DAEMON = "kube-flannel"
SUBNET_ENV = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.%d.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built by scripts/build-image.sh or found up to date."""
    missing = [tool for tool in ("podman", "buildah", "mmdebstrap", "runc") if shutil.which(tool) is None]
    if missing:
        pytest.skip("the image cannot be built here: %s missing (scripts/setup.sh installs them)" % " ".join(missing))
    res = subprocess.run(["bash", str(ROOT / "scripts" / "build-image.sh")], env=dict(os.environ, IMAGE=IMAGE, NO_INSTALL="1"),
                         capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert res.returncode == 0, "scripts/build-image.sh failed:\n" + res.stdout + res.stderr
    return IMAGE


def manifest(path: Path | None = None) -> list[dict[str, Any]]:
    """A manifest's documents; pyflannel's own as deploy/render.sh prints it for IMAGE when no path."""
    if path is None:
        text = subprocess.run(["sh", str(ROOT / "deploy" / "render.sh"), IMAGE], capture_output=True, text=True,
                              check=True, timeout=30).stdout
    else:
        text = path.read_text()
    return [d for d in yaml.safe_load_all(text) if d is not None]


def container_node(cluster: Cluster, name: str) -> Node:
    """A node as kubeadm makes one: with a default route, which flanneld's interface choice follows."""
    node = cluster.add_node(name)
    Cluster.ns_run(node.netns, "ip", "route", "add", "default", "via", HUB_IP)
    return node


class Setup:
    def __init__(self, cluster: Cluster, pods: dict[str, DaemonSetPod]) -> None:
        self.cluster, self.pods = cluster, pods

    def node(self, name: str) -> Node:
        return self.cluster.nodes[name]


@pytest.fixture(scope="module")
def setup(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    pods: dict[str, DaemonSetPod] = {}
    with Cluster(tmp_path_factory.mktemp("image"), tls=True) as cluster:
        assert cluster.ca_cert is not None
        try:
            n1 = cluster.add_node("k8s01")
            cluster.start(n1)
            # The hosts' iptables backends: kubelet's hint chain made by each (k8s04: none, an empty host).
            k8s02, k8s03, k8s04 = (container_node(cluster, n) for n in ("k8s02", "k8s03", "k8s04"))
            Cluster.ns_run(k8s02.netns, "iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
            Cluster.ns_run(k8s03.netns, "iptables-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
            for node, docs, images in (
                (k8s02, manifest(), {IMAGE: image}),
                (k8s03, manifest(DATA / "kube-flannel.yml"), {FLANNEL_IMAGE: image}),
                (k8s04, manifest(DATA / "chart-rendered.yml"), {FLANNEL_IMAGE: image}),
            ):
                pods[node.name] = DaemonSetPod(cluster, node, docs, images, cluster.ca_cert)
                pods[node.name].start()
            cluster.wait_ready(n1)
            for pod in pods.values():
                pod.wait_ready(DAEMON)
            for i, node in enumerate(cluster.nodes.values()):
                cluster.add_pod(node, "pod%d" % (i + 1))
            yield Setup(cluster, pods)
        except BaseException:
            for name, pod in pods.items():
                if pod.containers:
                    print("---- %s container ----\n%s" % (name, pod.logs(DAEMON)))
            raise
        finally:
            for pod in pods.values():
                pod.close()


def test_init_containers_install_the_cni_config_from_the_image(setup: Setup) -> None:
    """install-cni runs /opt/bin/install-conf from the image: the ConfigMap's conflist, atomically
    (no temporary file left), with the mounted file's mode. flannel's CNI plugin image is not here."""
    for name, pod in setup.pods.items():
        conf_dir = pod.host_path("/etc/cni/net.d")
        assert sorted(p.name for p in conf_dir.iterdir()) == ["10-flannel.conflist"], name
        conflist = conf_dir / "10-flannel.conflist"
        cni_conf = next(iter(pod.config_maps.values()))["data"]["cni-conf.json"]
        assert conflist.read_text() == cni_conf, name
        assert json.loads(conflist.read_text())["plugins"][0]["type"] == "flannel"
        assert conflist.stat().st_mode & 0o777 == 0o644, name
        assert pod.skipped == ["install-cni-plugin"], name


def test_older_manifests_cp_runs_from_the_image(setup: Setup) -> None:
    """Up to flannel v0.28.5, install-cni runs ``cp -f``: from pyflannel's image too."""
    docs = manifest(DATA / "kube-flannel.yml")
    init = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]["initContainers"]
    install_cni = next(c for c in init if c["name"] == "install-cni")
    install_cni["command"], install_cni["args"] = ["cp"], ["-f", *install_cni["args"]]
    node = setup.cluster.add_node("k8s05")
    try:
        pod = DaemonSetPod(setup.cluster, node, docs, {FLANNEL_IMAGE: IMAGE}, str(setup.cluster.ca_cert))
        pod.run_init_containers()
        conflist = pod.host_path("/etc/cni/net.d") / "10-flannel.conflist"
        assert conflist.read_text() == next(iter(pod.config_maps.values()))["data"]["cni-conf.json"]
    finally:
        assert setup.cluster.api is not None
        setup.cluster.api.delete_node("k8s05")


def test_daemons_come_up_with_each_manifest_and_pods_ping(setup: Setup) -> None:
    cluster = setup.cluster
    for i, name in enumerate(("k8s02", "k8s03", "k8s04"), start=2):
        assert setup.node(name).subnet_file.read_text() == SUBNET_ENV % i, name
        logs = setup.pods[name].logs(DAEMON)
        assert "Using the inClusterConfig" in logs and "Created subnet manager: Kubernetes Subnet Manager - %s" % name in logs
    # pyflannel's manifest: healthz on the node's loopback only, where its probes look.
    assert "Start healthz server on 127.0.0.1:8081" in setup.pods["k8s02"].logs(DAEMON)
    assert setup.pods["k8s02"].probe(DAEMON, "livenessProbe") == 200
    pods = [p for n in cluster.nodes.values() for p in n.pods]
    for src in pods:
        for dst in pods:
            if src is not dst:
                assert cluster.ping(src, dst.ip, count=2), "%s cannot reach %s" % (src.name, dst.name)


def _saved(node: Node, backend: str) -> str:
    return Cluster.ns_run(node.netns, "iptables-%s-save" % backend).stdout


def test_iptables_backend_follows_the_host(setup: Setup) -> None:
    """The wrapper picks the backend whose rules kubelet made: legacy on k8s02 (read-only root: the
    choice is kept in the emptyDir), nf_tables on k8s03 (the alternatives switched in the image)."""
    for name, backend, other in (("k8s02", "legacy", "nft"), ("k8s03", "nft", "legacy"), ("k8s04", "nft", "legacy")):
        node = setup.node(name)
        assert "-A FLANNEL-POSTRTG" in _saved(node, backend), name
        assert "FLANNEL" not in _saved(node, other), name
    wrapper_state = setup.pods["k8s02"].volumes["iptables-wrapper"][0]
    assert (wrapper_state / "mode").read_text() == "legacy\n"
    switched = setup.pods["k8s03"].exec(DAEMON, "readlink", "/etc/alternatives/iptables")
    assert switched.stdout.strip() == "/usr/sbin/iptables-nft"


def test_container_has_the_manifest_s_limits_and_privileges(setup: Setup) -> None:
    """NET_ADMIN and NET_RAW only, no new privileges, seccomp, a read-only root, 50 MiB and 100m."""
    pod = setup.pods["k8s02"]
    status = dict(line.split(":\t", 1) for line in pod.exec(DAEMON, "cat", "/proc/1/status").stdout.splitlines()
                  if ":\t" in line)
    assert int(status["CapEff"], 16) == (1 << 12) | (1 << 13)  # CAP_NET_ADMIN, CAP_NET_RAW
    assert (status["NoNewPrivs"].strip(), status["Seccomp"].strip()) == ("1", "2")
    assert pod.exec(DAEMON, "touch", "/etc/x").returncode != 0
    inspected = json.loads(podman("inspect", pod.containers[DAEMON]).stdout)[0]["HostConfig"]
    assert inspected["Memory"] == 50 << 20
    assert inspected["CpuQuota"] * 10 == inspected["CpuPeriod"]
    # flannel's manifests keep the runtime's default capabilities (and no limits).
    flannel = setup.pods["k8s03"].exec(DAEMON, "cat", "/proc/1/status").stdout
    assert "CapEff:\t00000000a80435fb" in flannel


def test_debugging_tools_work_in_the_container(setup: Setup) -> None:
    """kubectl exec ... -- ip, nft, wg, iptables: flannel's image has them, so has ours."""
    pod = setup.pods["k8s02"]
    assert "flannel.1" in pod.exec(DAEMON, "ip", "-br", "link").stdout
    assert pod.exec(DAEMON, "nft", "list", "tables").returncode == 0
    assert pod.exec(DAEMON, "wg", "--version").stdout.startswith("wireguard-tools")
    assert "FLANNEL-POSTRTG" in pod.exec(DAEMON, "iptables", "-t", "nat", "-S").stdout


def test_sigterm_stops_the_container_and_keeps_the_datapath(setup: Setup) -> None:
    cluster = setup.cluster
    for name in ("k8s02", "k8s03"):
        node = setup.node(name)
        routes = Cluster.ns_run(node.netns, "ip", "route", "show", "dev", "flannel.1").stdout
        code, seconds = setup.pods[name].terminate(DAEMON)
        assert code == 0 and seconds < 5, (name, code, seconds)
        assert "Exiting cleanly" in setup.pods[name].logs(DAEMON)
        assert Cluster.ns_run(node.netns, "ip", "route", "show", "dev", "flannel.1").stdout == routes
        assert node.subnet_file.read_text()
        for other in cluster.nodes.values():
            if other is not node and other.pods:
                assert cluster.ping(node.pods[0], other.pods[0].ip, count=2), (name, other.name)


def test_image_bench_runs_and_prints_its_figures(image: str) -> None:
    """bench/image.py on the built image (no timings checked: benchmarks are not tests)."""
    if shutil.which("skopeo") is None:
        pytest.skip("bench.image needs skopeo (scripts/setup.sh installs it)")
    res = subprocess.run([sys.executable, "-m", "bench.image", "--image", image, "--runs", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    for line in ("  uncompressed: ", "  compressed: ", "  layers: 4", "build tools among them: none",
                 "debugging tools: ip nft wg iptables iptables-legacy iptables-nft", "  flanneld --version "):
        assert line in res.stdout, res.stdout
