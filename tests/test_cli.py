"""The command line as an admin meets it: bad flags, bad net-conf, --version, --help."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyflannel import __version__, log

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


@pytest.fixture
def logging_state() -> Iterator[None]:
    """log.setup changes the process's logging; put it back afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("pyflannel")
    handlers, root_level, our_level = root.handlers[:], root.level, ours.level
    disabled = logging.root.manager.disable
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    ours.setLevel(our_level)
    logging.disable(disabled)


def emitted(verbosity: int, vmodule: str = "", fmt: str = "klog") -> list[str]:
    """The lines written for V(0) .. V(31) after log.setup."""
    log.setup(verbosity, fmt, vmodule)
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    for n in range(32):
        logging.getLogger("pyflannel.test").log(log.V(n), "n=%d", n)
    logging.getLogger("pyflannel.test").warning("a warning")
    return stream.getvalue().splitlines()


def levels(lines: list[str]) -> set[int]:
    return {int(line.rsplit("n=", 1)[1]) for line in lines if "n=" in line}


@pytest.mark.parametrize("verbosity", range(-1, 31))
def test_verbosity_shows_exactly_the_levels_up_to_it(logging_state: None, verbosity: int) -> None:
    lines = emitted(verbosity)
    assert levels(lines) == set(range(max(verbosity, 0) + 1))  # INFO (V(0)) always
    assert all(line[0] == "I" for line in lines[:-1]) and lines[-1].startswith("W")


def test_v_levels_are_distinct_and_below_info() -> None:
    values = [log.V(n) for n in range(200)]
    assert values[0] == logging.INFO and logging.NOTSET not in values
    assert values == sorted(set(values), reverse=True)


def test_vmodule_raises_the_verbosity_of_matching_files(logging_state: None) -> None:
    assert levels(emitted(1, "test_c*=5")) == set(range(6))
    assert levels(emitted(1, "other=9,test_cli=3")) == set(range(4))
    assert levels(emitted(0, "test_*=2,test_cli=7")) == set(range(3))  # the first match counts
    assert levels(emitted(0, "*/tests/test_cli=25")) == set(range(26))
    assert levels(emitted(4, "test_cli=2")) == set(range(5))  # -v still applies
    assert levels(emitted(0, "kube=9")) == {0}


def test_json_lines_carry_the_verbosity(logging_state: None) -> None:
    docs = [json.loads(line) for line in emitted(25, fmt="json")]
    assert [d["v"] for d in docs[:-1]] == list(range(26))
    assert {d["level"] for d in docs[:-1]} == {"info"} and docs[-1]["level"] == "warning"


def test_v20_shows_info_lines_and_vmodule_is_honoured(tmp_path: Path) -> None:
    res = pyflannel("--kube-subnet-mgr", "-v=20", "-vmodule=nothing=3",
                    "--net-config-path=%s" % (tmp_path / "none.json"))
    assert res.returncode == 1
    assert res.stderr.startswith("I") and "CLI flags config: {" in res.stderr


def test_unsupported_net_conf_keys_are_fatal_and_named(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    for keys, named, says in (
            ({"Networks": ["10.1.0.0/16"]}, "Networks: ", "differs from Network 10.244.0.0/16"),
            ({"EnableIPv6": True, "IPv6Network": "fd00::/56", "IPv6Networks": ["fd00:1::/56"]}, "IPv6Networks: ",
             "differs from IPv6Network fd00::/56")):
        conf.write_text(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}, **keys}))
        res = pyflannel("--kube-subnet-mgr", "--net-config-path=%s" % conf)
        assert res.returncode == 1
        last = res.stderr.strip().splitlines()[-1]
        assert "Failed to create SubnetManager: " + named in last and says in last


def test_unsupported_flags_are_refused_by_name() -> None:
    res = pyflannel("--kube-subnet-mgr", "-log_backtrace_at=main.go:12")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        'pyflannel: invalid value "main.go:12" for flag -log_backtrace_at: pyflannel does not support '
        "-log_backtrace_at; leave it empty (see --help)"]
