"""Faults in a node's life, injected from outside running pyflannel processes: subnet.env deleted or
changed, and a worker that fails with an unexpected error (an iptables binary the kernel cannot execute)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_netns
from tools.netcluster import Cluster, Node

pytestmark = [needs_netns, pytest.mark.netns]

KLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")
BINARIES = ("iptables", "iptables-save", "iptables-restore")


def wrap_iptables(folder: Path, broken: bool = False) -> None:
    """iptables binaries that run the real ones, or (``broken``) files the kernel refuses to execute.
    Each is replaced in one rename, so that a running exec never sees it half written. ``folder`` is
    the daemon's whole PATH (with ``ip``, which starts it): a broken binary found first would
    otherwise be passed over for the real one further on."""
    if not folder.exists():
        folder.mkdir()
        ip = shutil.which("ip")
        assert ip is not None
        (folder / "ip").symlink_to(ip)
    for name in BINARIES:
        real = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert real is not None
        new = folder / (name + ".new")
        new.write_bytes(b"\x7fELF not a program\n" if broken else b'#!/bin/sh\nexec %s "$@"\n' % real.encode())
        new.chmod(0o755)
        os.replace(new, folder / name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("faults")) as c:
        n1, n2 = c.add_node("k8s01"), c.add_node("k8s02")
        wrap_iptables(n1.dir / "bin")
        start(c, n1)
        c.start(n2)
        c.wait_ready(n1)
        c.wait_ready(n2)
        yield c


def start(cluster: Cluster, node: Node) -> None:
    """k8s01 runs with the wrapped iptables binaries as its PATH."""
    cluster.start(node, env={"PATH": str(node.dir / "bin")})


def healthz(node: Node) -> int:
    res = Cluster.ns_run(node.netns, "python3", "-c",
                         "import urllib.request,urllib.error\n"
                         "try: print(urllib.request.urlopen('http://127.0.0.1:8471/healthz', timeout=5).status)\n"
                         "except urllib.error.HTTPError as e: print(e.code)", check=False)
    return int(res.stdout.strip() or 0)


def masq_rules(node: Node) -> list[str]:
    saved = Cluster.ns_run(node.netns, "iptables-save", "-t", "nat").stdout
    return [line for line in saved.splitlines() if line.startswith("-A FLANNEL-POSTRTG")]


def routes(node: Node) -> str:
    return Cluster.ns_run(node.netns, "ip", "route", "show", "dev", "flannel.1").stdout


def test_deleted_subnet_env_is_written_again(cluster: Cluster) -> None:
    n1 = cluster.nodes["k8s01"]
    before = n1.subnet_file.read_text()
    n1.subnet_file.unlink()
    started = time.monotonic()
    cluster.wait_for("subnet.env to come back", lambda: n1.subnet_file.exists(), 15, 0.2)
    took = time.monotonic() - started
    print("deleted subnet.env back in %.1fs" % took)
    assert n1.subnet_file.read_text() == before
    n1.subnet_file.write_text(before.replace("FLANNEL_MTU=1450", "FLANNEL_MTU=9000"))
    started = time.monotonic()
    cluster.wait_for("subnet.env to be put right", lambda: n1.subnet_file.read_text() == before, 15, 0.2)
    print("changed subnet.env put right in %.1fs" % (time.monotonic() - started))
    log = n1.log()
    assert log.count("Wrote subnet file to %s again: it was missing" % n1.subnet_file) == 1
    assert log.count("Wrote subnet file to %s again: its contents had changed" % n1.subnet_file) == 1


def test_a_failing_worker_is_restarted_and_recovers(cluster: Cluster) -> None:
    """The iptables worker fails on a binary the kernel cannot execute; it is restarted, and once the
    binary is put right the rules flushed meanwhile are back. The log stays klog, /healthz stays 200."""
    n1 = cluster.nodes["k8s01"]
    rules = masq_rules(n1)
    assert rules
    offset = len(n1.log())
    wrap_iptables(n1.dir / "bin", broken=True)
    try:
        Cluster.ns_run(n1.netns, "iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
        cluster.wait_for("the iptables worker to fail twice",
                         lambda: n1.log()[offset:].count("] The iptables check failed: OSError") >= 2, 30)
        assert healthz(n1) == 200  # the node watch and the main loop still work
    finally:
        wrap_iptables(n1.dir / "bin")
    started = time.monotonic()
    cluster.wait_for("the rules to come back", lambda: masq_rules(n1) == rules, 60, 0.2)
    print("iptables worker restarted and rules back %.1fs after the binary was fixed" % (time.monotonic() - started))
    assert n1.proc is not None and n1.proc.poll() is None
    lines = n1.log()[offset:].splitlines()
    assert lines and all(KLOG.match(line) for line in lines), "\n".join(lines)
    # A check running while the wrappers were swapped may have had its shell read the broken file
    # (exit 127, an ordinary failed check); the first failure of the worker itself follows.
    failed = [line for line in lines if "] The iptables check failed" in line]
    assert re.search(r"\] The iptables check failed: OSError: \[Errno 8\] Exec format error: 'iptables' "
                     r"\(at __init__\.py:\d+ in run\); restarting it in 1s$", failed[0]), lines


def test_a_worker_that_keeps_failing_ends_the_process_and_the_datapath_stays(cluster: Cluster) -> None:
    n1 = cluster.nodes["k8s01"]
    before = routes(n1)
    assert "10.244.2.0/24" in before
    offset = len(n1.log())
    wrap_iptables(n1.dir / "bin", broken=True)
    started = time.monotonic()
    try:
        proc = n1.proc
        assert proc is not None
        cluster.wait_for("pyflannel to exit", lambda: proc.poll() is not None, 120, 0.2)
        print("a worker failing for good ended the process after %.1fs" % (time.monotonic() - started))
        assert proc.returncode == 1
        lines = n1.log()[offset:].splitlines()
        assert all(KLOG.match(line) for line in lines), "\n".join(lines)
        assert any(line.endswith("; it failed 6 times in a row: exiting, for the kubelet to restart pyflannel "
                                 "(the datapath stays in place)") for line in lines), "\n".join(lines)
        assert routes(n1) == before
        assert n1.subnet_file.exists()
    finally:
        wrap_iptables(n1.dir / "bin")
    n1.proc = None
    start(cluster, n1)  # as the kubelet would
    cluster.wait_ready(n1)
    assert routes(n1) == before
