"""The shipped deployment: deploy/kube-flannel.yml, the Dockerfile and the scripts it runs."""

from __future__ import annotations

import ipaddress
import json
import os
import posixpath
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kube_schemas  # type: ignore[import-untyped]

from pyflannel import __version__, config, flags
from pyflannel.family import IPV4, IPV6

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kube-flannel.yml"
DOCKERFILE = ROOT / "Dockerfile"
WRAPPER = ROOT / "deploy" / "iptables-wrapper"
RENDER = ROOT / "deploy" / "render.sh"
EXAMPLES = ROOT / "deploy" / "examples"
IMAGE = "registry.example.com/pyflannel:v0.1.0"


# --- helpers -----------------------------------------------------------------------------------------

def documents() -> list[dict[str, Any]]:
    """The manifest's documents, in order."""
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]


def one(kind: str) -> dict[str, Any]:
    """The manifest's only document of ``kind``."""
    found = [d for d in documents() if d["kind"] == kind]
    assert len(found) == 1, "expected one %s, found %d" % (kind, len(found))
    return found[0]


def pod_spec() -> dict[str, Any]:
    """The DaemonSet's pod spec."""
    spec: dict[str, Any] = one("DaemonSet")["spec"]["template"]["spec"]
    return spec


def container(name: str, init: bool = False) -> dict[str, Any]:
    """A container (or init container) of the DaemonSet, by name."""
    found: list[dict[str, Any]] = [c for c in pod_spec()["initContainers" if init else "containers"]
                                   if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def mounts(c: dict[str, Any]) -> dict[str, str]:
    """A container's volume mounts: mount path (without a trailing slash) -> volume name."""
    return {m["mountPath"].rstrip("/"): m["name"] for m in c["volumeMounts"]}


def volumes() -> dict[str, dict[str, Any]]:
    """The pod's volumes by name."""
    return {v["name"]: v for v in pod_spec()["volumes"]}


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, stage by stage, as (INSTRUCTION, arguments)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            result.append([])
        result[-1].append((instruction.upper(), " ".join(args.split())))
    return result


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    """The arguments of every ``name`` instruction of a stage."""
    return [args for instruction, args in stage if instruction == name]


def install_command() -> list[str]:
    """The build stage's only RUN, as an argument list: deploy/install.sh with VENV and BINDIR."""
    runs = instructions(stages()[0], "RUN")
    assert len(runs) == 1, runs
    argv = shlex.split(runs[0])
    assert argv[0] == "sh" and argv[1].endswith("/deploy/install.sh") and len(argv) == 4, argv
    return argv


# --- the manifest ------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.25", kube_schemas.latest_version()])
def test_manifest_matches_the_kubernetes_schemas(version: str) -> None:
    """Every document is valid, with no unknown field, for Kubernetes 1.25 and the newest release."""
    kinds = []
    for doc in documents():
        # SchemaNotFoundError (an unknown kind or apiVersion) fails the test too.
        kube_schemas.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                    "ConfigMap", "DaemonSet"])


def test_namespace_admits_the_daemonset() -> None:
    """Pod Security Admission must let hostNetwork, hostPath and NET_ADMIN pods into kube-flannel."""
    ns = one("Namespace")
    assert ns["metadata"]["name"] == "kube-flannel"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for doc in documents():
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "kube-flannel", doc["kind"]


def test_rbac_is_exactly_what_pyflannel_calls() -> None:
    """get pods (node name lookup), list+watch nodes, patch nodes/status; nothing else."""
    granted = set()
    for rule in one("ClusterRole")["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("", "pods", "get"), ("", "nodes", "list"), ("", "nodes", "watch"),
                       ("", "nodes/status", "patch")}
    binding = one("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": one("ClusterRole")["metadata"]["name"]}
    account = one("ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                    "namespace": account["namespace"]}]
    assert pod_spec()["serviceAccountName"] == account["name"]


def test_net_conf_parses_with_pyflannel() -> None:
    """net-conf.json is what pyflannel reads in kube mode, from where its default flag looks."""
    cfg = config.parse(one("ConfigMap")["data"]["net-conf.json"], kube=True)
    assert cfg.network == ipaddress.IPv4Network("10.244.0.0/16")
    assert cfg.backend_type == "vxlan"
    path = flags.parse([], {}).net_config_path
    assert volumes()[mounts(container("kube-flannel"))[posixpath.dirname(path)]]["configMap"] == {
        "name": one("ConfigMap")["metadata"]["name"]}


def test_cni_conf_is_a_flannel_conflist() -> None:
    """The conflist the flannel CNI plugin expects: flannel with a delegate first, then portmap."""
    conf = json.loads(one("ConfigMap")["data"]["cni-conf.json"])
    assert conf["name"] == "cbr0" and conf["cniVersion"] == "0.3.1"
    first, second = conf["plugins"]
    assert first == {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}}
    assert second == {"type": "portmap", "capabilities": {"portMappings": True}}


def test_install_cni_copies_the_config_and_plugin_to_the_host() -> None:
    """The init containers write the host's /opt/cni/bin/flannel and /etc/cni/net.d conflist."""
    plugin = container("install-cni-plugin", init=True)
    assert plugin["image"].startswith("docker.io/flannel/flannel-cni-plugin:")
    assert [*plugin["command"], *plugin["args"]] == ["cp", "-f", "/flannel", "/opt/cni/bin/flannel"]
    assert volumes()[mounts(plugin)["/opt/cni/bin"]]["hostPath"]["path"] == "/opt/cni/bin"

    cni = container("install-cni", init=True)
    assert cni["image"] == container("kube-flannel")["image"] == "@IMAGE@", "the image the admin sets"
    assert [*cni["command"], *cni["args"]] == [
        "cp", "-f", "/etc/kube-flannel/cni-conf.json", "/etc/cni/net.d/10-flannel.conflist"]
    assert volumes()[mounts(cni)["/etc/cni/net.d"]]["hostPath"]["path"] == "/etc/cni/net.d"
    assert "configMap" in volumes()[mounts(cni)["/etc/kube-flannel"]]


def test_daemon_command_line_is_accepted_by_pyflannel() -> None:
    """The command is the image's /opt/bin/flanneld, and pyflannel parses the arguments."""
    main = container("kube-flannel")
    assert main["command"] == ["/opt/bin/flanneld"]
    assert main["args"] == ["--ip-masq", "--kube-subnet-mgr", "--healthz-port=8081"]
    opts = flags.parse(main["args"], {})
    assert opts.ip_masq and opts.kube_subnet_mgr
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": opts.healthz_port}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": opts.healthz_port}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in main["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


def test_daemon_runs_unprivileged_with_its_host_mounts() -> None:
    """privileged false, NET_ADMIN and NET_RAW only, and the host paths flanneld uses."""
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists", "effect": "NoSchedule"}]
    main = container("kube-flannel")
    assert main["securityContext"] == {"privileged": False, "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}}
    limits = {"cpu": "100m", "memory": "50Mi"}
    assert main["resources"] == {"requests": limits, "limits": limits}
    by_path = mounts(main)
    subnet_dir = posixpath.dirname(flags.parse([], {}).subnet_file)
    assert volumes()[by_path[subnet_dir]]["hostPath"] == {"path": subnet_dir}
    assert volumes()[by_path["/run/xtables.lock"]]["hostPath"] == {"path": "/run/xtables.lock",
                                                                   "type": "FileOrCreate"}


# --- rendering with the admin's image and a net-conf example ------------------------------------------

def render(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(RENDER), *args], capture_output=True, text=True, timeout=30)


# example -> (backend type, the Networks pyflannel enables, IPv4 first)
NET_CONFS = {
    None: ("vxlan", ["10.244.0.0/16"]),
    "net-conf-dual-stack.json": ("vxlan", ["10.244.0.0/16", "fd00:10:244::/56"]),
    "net-conf-ipv6-only.json": ("vxlan", ["fd00:10:244::/56"]),
    "net-conf-host-gw.json": ("host-gw", ["10.244.0.0/16"]),
    "net-conf-host-gw-dual-stack.json": ("host-gw", ["10.244.0.0/16", "fd00:10:244::/56"]),
}


@pytest.mark.parametrize("example", list(NET_CONFS))
def test_render_sets_the_image_and_the_net_conf(example: str | None) -> None:
    """deploy/render.sh IMAGE [NET_CONF]: a valid manifest with the admin's image in both pyflannel
    containers and the example's net-conf, which pyflannel parses into the expected stack and backend."""
    res = render(IMAGE, *([str(EXAMPLES / example)] if example else []))
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d is not None]
    for doc in docs:
        kube_schemas.validate(doc, kube_schemas.latest_version(), strict=True)
    assert [d["kind"] for d in docs] == [d["kind"] for d in documents()]
    pod = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    images = {c["name"]: c["image"] for c in pod["initContainers"] + pod["containers"]}
    assert images["install-cni"] == images["kube-flannel"] == IMAGE
    assert images["install-cni-plugin"] == container("install-cni-plugin", init=True)["image"]
    data = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert data["cni-conf.json"] == one("ConfigMap")["data"]["cni-conf.json"]
    if example:
        assert json.loads(data["net-conf.json"]) == json.loads((EXAMPLES / example).read_text())
    backend, networks = NET_CONFS[example]
    cfg = config.parse(data["net-conf.json"], kube=True)
    assert cfg.backend_type == backend
    assert [str(n) for n in cfg.networks.values()] == networks
    assert list(cfg.networks) == [f for f, n in ((IPV4, "."), (IPV6, ":")) if any(n in x for x in networks)]


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.iterdir()) == sorted(e for e in NET_CONFS if e)


@pytest.mark.parametrize("args", [[], ["a", "b", "c"], ["bad image name"], [IMAGE, "/nonexistent.json"]])
def test_render_refuses_bad_arguments(args: list[str]) -> None:
    res = render(*args)
    assert res.returncode == 2 and res.stdout == "" and res.stderr


def test_docs_name_no_unpublished_image() -> None:
    """No image is published: the docs and manifest name the admin's $IMAGE, never a registry of ours."""
    for path in (MANIFEST, DOCKERFILE, ROOT / "deploy" / "README.md"):
        assert "ghcr.io" not in path.read_text(), path
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "docker buildx build --platform linux/amd64,linux/arm64 -t \"$IMAGE\" --push ." in readme
    assert 'deploy/render.sh "$IMAGE"' in readme


# --- the image ---------------------------------------------------------------------------------------

def test_hadolint_finds_nothing() -> None:
    """hadolint (from the test extra) passes the Dockerfile; .hadolint.yaml says what it ignores."""
    found = shutil.which("hadolint", path=os.pathsep.join([sysconfig.get_path("scripts"),
                                                           os.environ.get("PATH", "")]))
    assert found, "hadolint is missing: install the test extra (pip install -e '.[test]')"
    proc = subprocess.run([found, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_runs_flanneld_and_picks_the_iptables_backend() -> None:
    """The final stage: exec-form /opt/bin/flanneld, both iptables backends behind the wrapper."""
    build, final = stages()
    assert instructions(build, "FROM") == ["python:3.11-slim-bookworm AS build"]
    assert instructions(final, "FROM") == ["python:3.11-slim-bookworm"]
    entrypoint = json.loads(instructions(final, "ENTRYPOINT")[0])
    assert entrypoint == container("kube-flannel")["command"]
    assert entrypoint == [posixpath.join(install_command()[3], "flanneld")]
    assert "--from=build /opt /opt" in instructions(final, "COPY")
    assert "--chmod=755 deploy/iptables-wrapper /usr/sbin/iptables-wrapper" in instructions(final, "COPY")
    (run,) = instructions(final, "RUN")
    assert "apt-get install -y --no-install-recommends iptables " in run
    assert "/usr/sbin/iptables-wrapper install" in run
    assert "python -m compileall" in run


def test_dockerfile_builds_for_every_platform() -> None:
    """Nothing tied to one architecture: no --platform pin, no arch names, no downloaded binaries;
    the base image is the official multi-arch python one."""
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#"))
    for word in ("--platform", "amd64", "x86_64", "arm64", "aarch64", "curl", "wget", "ADD "):
        assert word not in text, word
    assert all(image.startswith("python:") for stage in stages() for image in instructions(stage, "FROM"))


def test_install_script_builds_the_image_venv(tmp_path: Path) -> None:
    """The build stage's COPY and RUN, replayed under tmp_path: a working, precompiled pyflannel."""
    build = stages()[0]
    for copy in instructions(build, "COPY"):
        *sources, dest = shlex.split(copy)
        for source in sources:
            src = ROOT / source
            target = tmp_path / dest.lstrip("/")
            if dest.endswith("/"):
                target = target / src.name
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    argv = [str(tmp_path) + a if a.startswith("/") else a for a in install_command()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    venv, bindir = Path(argv[2]), Path(argv[3])
    assert not (venv / "bin" / "pip").exists()
    flanneld = bindir / "flanneld"
    assert os.readlink(flanneld) == str(venv / "bin" / "pyflannel")
    before = sorted(venv.rglob("*"))
    version = subprocess.run([str(flanneld), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert (version.returncode, version.stderr.strip()) == (0, __version__)
    helped = subprocess.run([str(venv / "bin" / "pyflannel"), "--help"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and helped.stderr.startswith("Usage: pyflannel [OPTION]...")
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", "import pyflannel.daemon, pyflannel.kubeclient"],
                              env=env, capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert sorted(venv.rglob("*")) == before, "start-up compiled bytecode"


# --- the iptables wrapper ----------------------------------------------------------------------------

FAKE_SAVE = """#!/bin/sh
cat "{rules}" 2>/dev/null || exit 1
"""
FAKE_COMMAND = """#!/bin/sh
echo "{name} $*"
"""
KUBELET_HINT = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
KUBELET_CANARY = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"


def rules(n: int) -> str:
    """iptables-save output with ``n`` rules."""
    return "*filter\n:FORWARD ACCEPT [0:0]\n" + "".join("-A FORWARD -s 10.%d.0.0/16 -j ACCEPT\n" % i
                                                         for i in range(n)) + "COMMIT\n"


def alternatives(root: Path, *args: str) -> str:
    """update-alternatives on the fake root's database."""
    proc = subprocess.run(["update-alternatives", "--altdir", str(root / "etc/alternatives"),
                           "--admindir", str(root / "var/lib/dpkg/alternatives"),
                           "--log", str(root / "var/log/alternatives.log"), *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def fake_root(root: Path, saved: dict[str, str]) -> Path:
    """A root with Debian's iptables alternatives over fake backends, and the wrapper installed.

    ``saved`` maps e.g. ``ip6tables-legacy-save`` to what that command prints; the others fail,
    as iptables-save does where a backend cannot be read.
    """
    sbin = root / "usr/sbin"
    for d in (sbin, root / "etc/alternatives", root / "var/lib/dpkg/alternatives", root / "var/log",
              root / "rules"):
        d.mkdir(parents=True)
    for name, text in saved.items():
        (root / "rules" / name).write_text(text)
    for prog in ("iptables", "ip6tables"):
        for mode, priority in (("legacy", "10"), ("nft", "20")):
            for suffix in ("", "-save", "-restore"):
                name = "%s-%s%s" % (prog, mode, suffix)
                body = FAKE_SAVE.format(rules=root / "rules" / name) if suffix == "-save" else \
                    FAKE_COMMAND.format(name=name)
                (sbin / name).write_text(body)
                (sbin / name).chmod(0o755)
            alternatives(root, "--install", str(sbin / prog), prog, str(sbin / ("%s-%s" % (prog, mode))), priority,
                         "--slave", str(sbin / (prog + "-save")), prog + "-save",
                         str(sbin / ("%s-%s-save" % (prog, mode))),
                         "--slave", str(sbin / (prog + "-restore")), prog + "-restore",
                         str(sbin / ("%s-%s-restore" % (prog, mode))))
    shutil.copy2(WRAPPER, sbin / "iptables-wrapper")
    proc = subprocess.run([str(sbin / "iptables-wrapper"), "install"],
                          env={**os.environ, "IPTABLES_WRAPPER_ROOT": str(root)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sbin


needs_update_alternatives = pytest.mark.skipif(shutil.which("update-alternatives") is None,
                                               reason="needs Debian's update-alternatives")


@needs_update_alternatives
@pytest.mark.parametrize("saved, backend", [
    ({}, "nft"),
    ({"iptables-legacy-save": rules(3), "iptables-nft-save": rules(1)}, "legacy"),
    ({"ip6tables-legacy-save": rules(2), "iptables-nft-save": rules(1)}, "legacy"),
    ({"iptables-legacy-save": rules(1), "iptables-nft-save": rules(1)}, "nft"),
    ({"iptables-legacy-save": rules(9), "iptables-nft-save": KUBELET_HINT}, "nft"),
    ({"iptables-legacy-save": KUBELET_CANARY, "iptables-nft-save": rules(9)}, "legacy"),
    ({"ip6tables-legacy-save": KUBELET_HINT, "ip6tables-nft-save": rules(9)}, "legacy"),
], ids=["empty-host", "more-legacy", "more-legacy-ipv6", "tie", "kubelet-nft", "kubelet-legacy",
        "kubelet-legacy-ipv6"])
def test_iptables_wrapper_follows_the_host(tmp_path: Path, saved: dict[str, str], backend: str) -> None:
    """The first call picks the host's backend, switches all links to it once, and runs the command."""
    sbin = fake_root(tmp_path, saved)
    for name in ("iptables", "iptables-save", "ip6tables-restore"):
        assert (sbin / name).resolve() == sbin / "iptables-wrapper"
    env = {**os.environ, "IPTABLES_WRAPPER_ROOT": str(tmp_path), "PATH": str(sbin) + os.pathsep + os.environ["PATH"]}
    first = subprocess.run(["iptables", "-t", "nat", "-S"], env=env, capture_output=True, text=True, timeout=30)
    assert (first.returncode, first.stdout, first.stderr) == (0, "iptables-%s -t nat -S\n" % backend, "")
    for prog in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            assert (sbin / (prog + suffix)).resolve() == sbin / ("%s-%s%s" % (prog, backend, suffix))
        assert "Value: %s" % (sbin / ("%s-%s" % (prog, backend))) in alternatives(tmp_path, "--query", prog)
    again = subprocess.run(["ip6tables-restore", "--noflush"], env=env, capture_output=True, text=True, timeout=30)
    assert again.stdout == "ip6tables-%s-restore --noflush\n" % backend


@needs_update_alternatives
def test_iptables_wrapper_runs_the_backend_when_it_cannot_switch(tmp_path: Path) -> None:
    """If update-alternatives fails, it warns and runs the host's backend, choosing again next time."""
    sbin = fake_root(tmp_path, {"iptables-legacy-save": rules(2)})
    for prog in ("iptables", "ip6tables"):
        (tmp_path / "var/lib/dpkg/alternatives" / prog).write_text("corrupt\n")
    env = {**os.environ, "IPTABLES_WRAPPER_ROOT": str(tmp_path), "PATH": str(sbin) + os.pathsep + os.environ["PATH"]}
    for _ in range(2):
        proc = subprocess.run(["iptables-save"], env=env, capture_output=True, text=True, timeout=30)
        assert (proc.returncode, proc.stdout) == (0, rules(2))
        assert "could not switch iptables to iptables-legacy" in proc.stderr
        assert (sbin / "iptables-save").resolve() == sbin / "iptables-wrapper"
