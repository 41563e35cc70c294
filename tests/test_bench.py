"""The footprint bench runs and prints its tables (on a small N; benchmarks are not tests, so no timings)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import needs_netns
from tools.netcluster import REPO

pytestmark = [needs_netns, pytest.mark.netns]


def test_footprint_bench_runs_and_prints_its_tables() -> None:
    cmd = [sys.executable, "-m", "bench.footprint", "--nodes", "1,5", "--runs", "1", "--limits", "off",
           "--settle", "0.5", "--churn", "--churn-nodes", "20", "--churn-seconds", "2",
           "--idle", "--idle-nodes", "5", "--idle-seconds", "1"]
    res = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for heading in ("- command: `python -m bench.footprint --nodes 1,5", "- machine: nproc", "daemon command line:",
                    "## Start-up (median of 1)", "## Churn: 20 nodes", "## Idle: 5 nodes",
                    "## Reference: flanneld v0.20.2"):
        assert heading in out, out
    startup = out.split("## Start-up")[1].split("##")[0]
    rows = [line for line in startup.splitlines() if line.startswith("| 1 ") or line.startswith("| 5 ")]
    assert len(rows) == 2 and all("| off " in row for row in rows), out
    churn = out.split("## Churn")[1].split("##")[0]
    assert "| off " in churn, out


def test_footprint_bench_waits_for_both_families_in_dual_stack() -> None:
    cmd = [sys.executable, "-m", "bench.footprint", "--nodes", "5", "--runs", "1", "--limits", "off",
           "--settle", "0.5", "--stack", "dual", "--churn", "--churn-nodes", "5", "--churn-seconds", "1"]
    res = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "- stack: dual (flannel.1, flannel-v6.1)" in out, out
    start = [line for line in out.splitlines() if line.startswith("- start 1/1 N=5")]
    assert len(start) == 1 and start[0].endswith(", ok") and "all peers —" not in start[0], out
    churn = [line.split("|") for line in out.split("## Churn")[1].split("##")[0].splitlines()
             if line.startswith("| off ")]
    assert len(churn) == 1, out
    # no change missed, in either family, and no stale entry left
    assert churn[0][3].strip() == "0 ✓" and churn[0][10].strip() == "0", out


def test_kubeproxy_bench_runs_and_prints_its_table() -> None:
    cmd = [sys.executable, "-m", "bench.kubeproxy", "--services", "0,30", "--backends", "nft,legacy", "--designs",
           "new,old", "--limits", "off", "--nodes", "2", "--idle-seconds", "1", "--settle", "0.5"]
    res = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for heading in ("- command: `python -m bench.kubeproxy --services 0,30", "- machine: nproc",
                    "## Idle beside kube-proxy's rules: 2 nodes"):
        assert heading in out, out
    rows = [line for line in out.split("## Idle beside")[1].splitlines() if line.startswith(("| nft ", "| legacy "))]
    assert len(rows) == 8, out
    assert all("| off " in row and "| yes " in row for row in rows), out  # flannel's rules were in place


def test_nftables_bench_runs_and_prints_its_tables() -> None:
    cmd = [sys.executable, "-m", "bench.nftables", "--services", "0,30", "--limits", "off", "--nodes", "2",
           "--idle-seconds", "1", "--settle", "0.5"]
    res = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for heading in ("- command: `python -m bench.nftables --services 0,30", "- machine: nproc",
                    "## Idle beside kube-proxy's nftables rules: 2 nodes", "## What nft itself costs"):
        assert heading in out, out
    rows = [line for line in out.split("## Idle beside")[1].split("##")[0].splitlines()
            if line.startswith(("| 0 ", "| 30 "))]
    assert len(rows) == 2 and all("| yes " in row for row in rows), out
    costs = [line for line in out.split("## What nft")[1].splitlines() if line.startswith(("| 0 ", "| 30 "))]
    assert len(costs) == 2, out


def test_probes_bench_runs_and_prints_its_table() -> None:
    cmd = [sys.executable, "-m", "bench.probes", "--nodes", "4", "--runs", "1", "--window", "3", "--settle", "2",
           "--interval", "1", "--limits", "off"]
    res = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for heading in ("- command: `python -m bench.probes --nodes 4", "- machine: nproc", "## With and without the "
                    "probes (median of 1)"):
        assert heading in out, out
    run = [line for line in out.splitlines() if line.startswith("- run 1/1 N=4: ")]
    assert len(run) == 1 and run[0].endswith(", ok") and "load answered 0/" not in run[0], out
    rows = [line for line in out.splitlines() if line.startswith("| 4 ")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("| ok      |"), out
