"""The command line as an admin meets it: bad flags, bad net-conf, --version, --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pyflannel import __version__

REPO = Path(__file__).resolve().parent.parent


def pyflannel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyflannel", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=30)


def test_version_and_help() -> None:
    res = pyflannel("--version")
    assert (res.returncode, res.stderr.strip()) == (0, __version__)
    res = pyflannel("-h")
    assert res.returncode == 0 and res.stderr.startswith("Usage: pyflannel [OPTION]...")
    assert "-kube-subnet-mgr" in res.stderr


def test_bad_flag_exits_non_zero_with_one_line() -> None:
    res = pyflannel("--kube-subnet-mgr", "--no-such-flag")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["pyflannel: flag provided but not defined: -no-such-flag (see --help)"]
    res = pyflannel("--healthz-port=abc")
    assert res.returncode == 2 and 'invalid value "abc" for flag -healthz-port' in res.stderr


def test_bad_env_value_exits_non_zero() -> None:
    res = pyflannel("--kube-subnet-mgr", env={"FLANNELD_IPTABLES_RESYNC": "soon", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and 'invalid value "soon" for FLANNELD_IPTABLES_RESYNC' in res.stderr


def test_malformed_net_conf_is_fatal_and_names_file_and_field(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text('{"Network": "10.244.0.0/33", "Backend": {"Type": "vxlan"}}')
    res = pyflannel("--kube-subnet-mgr", "--net-config-path=%s" % conf)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert "Failed to create SubnetManager: error parsing subnet config:" in last and "Network" in last
    conf.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan",}')
    res = pyflannel("--kube-subnet-mgr", "--net-config-path=%s" % conf)
    assert res.returncode == 1 and str(conf) in res.stderr.strip().splitlines()[-1]
    res = pyflannel("--kube-subnet-mgr", "--net-config-path=%s" % (tmp_path / "missing.json"))
    assert res.returncode == 1
    assert "failed to read net conf: open %s: no such file or directory" % (tmp_path / "missing.json") in res.stderr


def test_json_log_format(tmp_path: Path) -> None:
    res = pyflannel("--kube-subnet-mgr", "--log-format=json", "--net-config-path=%s" % (tmp_path / "none.json"))
    lines = [json.loads(line) for line in res.stderr.strip().splitlines()]
    assert lines[0]["msg"].startswith("CLI flags config: {") and lines[0]["level"] == "info"
    assert lines[-1]["level"] == "error" and "failed to read net conf" in lines[-1]["msg"]
