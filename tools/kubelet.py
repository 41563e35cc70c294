"""A DaemonSet's pod on one node of a ``tools.netcluster.Cluster``, run with podman as a kubelet runs it.

``DaemonSetPod`` reads the DaemonSet (and the ConfigMaps it mounts) from a manifest's documents, then
runs its init containers in order and its containers detached, each from a local image, with:

- the node's network namespace as the host network (``hostNetwork: true``);
- ``command`` as the entrypoint and ``args`` as its arguments, as Kubernetes replaces the image's;
- ``env``: values, and the downward API's ``metadata.name``, ``metadata.namespace``, ``spec.nodeName``,
  ``spec.serviceAccountName``, ``status.hostIP`` and ``status.podIP``, plus ``KUBERNETES_SERVICE_HOST``
  and ``KUBERNETES_SERVICE_PORT``;
- ``volumeMounts``: a ``hostPath`` is a directory under the node's own directory (``host_path()``;
  ``/run/flannel`` is the node's directory itself, where the cluster reads subnet.env), created as its
  ``type`` says; a ``configMap`` and the service-account token are written in kubelet's layout
  (``..data`` pointing at a timestamped directory, each key a link through it) and mounted read-only;
  an ``emptyDir`` is a fresh directory;
- ``securityContext``: containerd's default capabilities with ``drop`` and ``add`` applied,
  ``readOnlyRootFilesystem``, ``allowPrivilegeEscalation: false`` (no_new_privs), and seccomp
  ``RuntimeDefault`` (pod or container level; unconfined otherwise, the kubelet's default);
- ``resources.limits`` cpu and memory (requests do not limit, as on a node).

Images missing from ``images`` (the manifest's image -> the local one) are not run: their names go to
``skipped``. Nothing is created outside the node's directory and the podman containers of this pod,
which ``close()`` removes.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

from tools.netcluster import API_PORT, HUB_IP, TOKEN, Cluster, Node

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# This machine's hard limits; podman's defaults are higher than root may set here.
PODMAN_ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
# containerd's default capabilities for a container that is not privileged.
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP",
                "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")


def podman_command() -> list[str]:
    """podman with an OCI runtime that works here: crun 1.8 refuses cgroup v1 and hybrid hosts."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return ["podman"]
    return ["podman", "--runtime", "runc"]


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*podman_command(), *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError("podman %s failed (%d): %s%s" % (" ".join(args), res.returncode, res.stdout, res.stderr))
    return res


def _cpus(quantity: str) -> str:
    return "%g" % (int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity))


def _bytes(quantity: str) -> str:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return str(int(quantity[:-len(suffix)]) * factor)
    return str(int(quantity))


def write_kubelet_volume(directory: Path, files: dict[str, str], mode: int = 0o644) -> None:
    """Files as the kubelet writes a configMap or projected volume: ``..data`` links to a timestamped
    directory holding them, and each name links through ``..data``."""
    directory.mkdir(parents=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.") + "%09d" % (time.time_ns() % 10**9)
    (directory / stamp).mkdir()
    for name, text in files.items():
        path = directory / stamp / name
        path.write_text(text)
        path.chmod(mode)
        (directory / name).symlink_to(Path("..data") / name)
    (directory / "..data").symlink_to(stamp)


class DaemonSetPod:
    """One pod of the DaemonSet in ``documents`` on ``node``; see the module's docstring."""

    def __init__(self, cluster: Cluster, node: Node, documents: list[dict[str, Any]], images: dict[str, str],
                 ca_cert: str) -> None:
        (self.daemonset,) = [d for d in documents if d["kind"] == "DaemonSet"]
        self.config_maps = {d["metadata"]["name"]: d for d in documents if d["kind"] == "ConfigMap"}
        self.cluster, self.node, self.images = cluster, node, images
        self.spec: dict[str, Any] = self.daemonset["spec"]["template"]["spec"]
        self.namespace = self.daemonset["metadata"].get("namespace", "default")
        self.name = "%s-%s" % (self.daemonset["metadata"]["name"], secrets.token_hex(3))
        self.root = node.dir / "pod"
        self.skipped: list[str] = []
        self.containers: dict[str, str] = {}  # container name -> podman container name
        assert self.spec.get("hostNetwork"), "only hostNetwork pods run here"
        assert cluster.api is not None
        cluster.api.add_pod(self.namespace, self.name, node.name)
        self.volumes = {v["name"]: self._volume(v) for v in self.spec.get("volumes", [])}
        self.token_dir = self.root / "volumes" / "kube-api-access"
        write_kubelet_volume(self.token_dir, {"token": TOKEN, "ca.crt": Path(ca_cert).read_text(),
                                              "namespace": self.namespace})

    # -- volumes ----------------------------------------------------------------------------------

    def host_path(self, path: str) -> Path:
        """Where the node's ``path`` is: ``/run/flannel`` is the node's directory, the rest lies under host/."""
        if path.rstrip("/") == "/run/flannel":
            return self.node.dir
        return self.node.dir / "host" / path.lstrip("/")

    def _volume(self, volume: dict[str, Any]) -> tuple[Path, bool]:
        """The volume's directory or file on the node, and whether it is mounted read-only."""
        if "hostPath" in volume:
            path = self.host_path(volume["hostPath"]["path"])
            kind = volume["hostPath"].get("type", "")
            if kind == "FileOrCreate":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            elif kind in ("", "DirectoryOrCreate"):
                path.mkdir(parents=True, exist_ok=True)
            return path, False
        path = self.root / "volumes" / volume["name"]
        if "configMap" in volume:
            data = self.config_maps[volume["configMap"]["name"]]["data"]
            write_kubelet_volume(path, data, volume["configMap"].get("defaultMode", 0o644))
            return path, True
        if "emptyDir" in volume:
            path.mkdir(parents=True)
            return path, False
        raise ValueError("volume %s: only hostPath, configMap and emptyDir volumes run here" % volume["name"])

    # -- containers -------------------------------------------------------------------------------

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        fields = {"metadata.name": self.name, "metadata.namespace": self.namespace, "spec.nodeName": self.node.name,
                  "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
                  "status.hostIP": self.node.ip, "status.podIP": self.node.ip}
        env = {"KUBERNETES_SERVICE_HOST": HUB_IP, "KUBERNETES_SERVICE_PORT": str(API_PORT)}
        for var in container.get("env", []):
            env[var["name"]] = var["value"] if "value" in var else fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    def run_args(self, container: dict[str, Any]) -> list[str]:
        """podman run's options, image and arguments for one container of the pod spec."""
        args = ["--pull=never", "--network", "ns:/run/netns/" + self.node.netns, "--log-driver", "k8s-file",
                *PODMAN_ULIMITS]
        if "command" in container:
            args += ["--entrypoint", json.dumps(container["command"])]
        for key, value in self._env(container).items():
            args += ["--env", "%s=%s" % (key, value)]
        mounts = [(self.token_dir, SERVICE_ACCOUNT_DIR, True)]
        for mount in container.get("volumeMounts", []):
            source, read_only = self.volumes[mount["name"]]
            mounts.append((source, mount["mountPath"].rstrip("/"), read_only or mount.get("readOnly", False)))
        for source, target, read_only in mounts:
            args += ["--mount", "type=bind,src=%s,dst=%s%s" % (source, target, ",ro=true" if read_only else "")]
        security = container.get("securityContext", {})
        assert not security.get("privileged"), "privileged containers do not run here"
        caps = security.get("capabilities", {})
        dropped = {c.upper() for c in caps.get("drop", [])}
        keep = [] if "ALL" in dropped else [c for c in DEFAULT_CAPS if c not in dropped]
        args += ["--cap-drop", "all"] + [a for c in keep + list(caps.get("add", [])) for a in ("--cap-add", c)]
        if security.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        seccomp = security.get("seccompProfile") or self.spec.get("securityContext", {}).get("seccompProfile") or {}
        if seccomp.get("type") != "RuntimeDefault":
            args += ["--security-opt", "seccomp=unconfined"]
        limits = container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            args += ["--cpus", _cpus(limits["cpu"])]
        if "memory" in limits:
            args += ["--memory", _bytes(limits["memory"]), "--memory-swap", _bytes(limits["memory"])]
        return [*args, self.images[container["image"]], *container.get("args", [])]

    def run_init_containers(self) -> None:
        """Run each init container to completion, in order (RuntimeError if one fails)."""
        for container in self.spec.get("initContainers", []):
            if container["image"] not in self.images:
                self.skipped.append(container["name"])
                continue
            res = podman("run", "--rm", "--name", self._container_name(container), *self.run_args(container),
                         check=False)
            if res.returncode != 0:
                raise RuntimeError("init container %s exited %d: %s%s" % (container["name"], res.returncode,
                                                                           res.stdout, res.stderr))

    def start(self) -> None:
        """Run the init containers, then start the containers, detached."""
        self.run_init_containers()
        for container in self.spec["containers"]:
            if container["image"] not in self.images:
                self.skipped.append(container["name"])
                continue
            name = self._container_name(container)
            podman("run", "-d", "--name", name, *self.run_args(container))
            self.containers[container["name"]] = name

    def _container_name(self, container: dict[str, Any]) -> str:
        return "%s-%s-%s" % (self.cluster.prefix, self.node.name, container["name"])

    def container(self, name: str) -> dict[str, Any]:
        """A container of the pod spec, by name."""
        (found,) = [c for c in self.spec["containers"] if c["name"] == name]
        return found

    def logs(self, name: str) -> str:
        """A running (or stopped) container's output so far."""
        res = podman("logs", self.containers[name], check=False)
        return res.stdout + res.stderr

    def probe(self, name: str, kind: str = "readinessProbe") -> int:
        """The HTTP status of a container's httpGet probe, sent from the node's network namespace as the
        kubelet sends it (to ``host``, else the pod's IP: the node's); 0 if it got no answer."""
        container = self.container(name)
        get = container[kind]["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            (port,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
        url = "http://%s:%d%s" % (get.get("host", self.node.ip), port, urllib.parse.quote(get.get("path", "/")))
        return self.cluster.http_get(self.node.netns, url, timeout=2)[0]

    def wait_ready(self, name: str, timeout: float = 90) -> None:
        """Wait until the container's readiness probe answers 200 (RuntimeError if the container exits)."""
        def ready() -> bool:
            state = podman("inspect", "--format", "{{.State.Status}}", self.containers[name]).stdout.strip()
            if state != "running":
                raise RuntimeError("%s on %s is %s:\n%s" % (name, self.node.name, state, self.logs(name)))
            return self.probe(name) == 200
        self.cluster.wait_for("%s on %s to be ready" % (name, self.node.name), ready, timeout, 0.5)

    def exec(self, name: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        """Run a command in a running container (as ``kubectl exec`` does)."""
        return podman("exec", self.containers[name], *cmd, check=False)

    def terminate(self, name: str, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM to the container, as the kubelet sends it; its exit code and seconds to exit."""
        started = time.monotonic()
        podman("kill", "--signal", "TERM", self.containers[name])
        code = int(podman("wait", self.containers[name], timeout=timeout).stdout.strip())
        return code, time.monotonic() - started

    def close(self) -> None:
        """Remove this pod's containers, running or not."""
        for name in self.containers.values():
            podman("rm", "-f", "-t", "0", name, check=False)
        self.containers.clear()
