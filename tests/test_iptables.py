"""The masquerade and forward rules: the pure rule builders, the restore payloads (checked with fake
binaries, no root needed), and real iptables-nft in a fresh network namespace for each test."""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from pyflannel.trafficmngr.iptables import (
    IPTablesManager,
    forward_rules,
    legacy_forward_rules,
    legacy_masq_rules,
    masq_rules,
)
from tests.conftest import needs_netns

N = IPv4Network("10.244.0.0/16")
S = IPv4Network("10.244.0.0/24")
OLD_N = IPv4Network("10.245.0.0/16")
OLD_S = IPv4Network("10.245.3.0/24")

# Spec §10: `iptables-save` on node A (flannel parts only, iptables >= 1.6.2).
SPEC_SAVE = """\
*nat
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
*filter
:FLANNEL-FWD - [0:0]
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
"""


def section(saved: str, table: str) -> list[str]:
    """The lines of ``table`` in an iptables-save text, between its ``*table`` and ``COMMIT``."""
    lines = saved.splitlines()
    start = lines.index("*" + table) + 1
    return lines[start:lines.index("COMMIT", start)]


SPEC_NAT, SPEC_FILTER = section(SPEC_SAVE, "nat"), section(SPEC_SAVE, "filter")


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# -- pure rule builders ------------------------------------------------------------------------------


def test_masq_rules_with_random_fully() -> None:
    assert [r.text for r in masq_rules(N, S, True)] == SPEC_NAT[1:]
    assert {(r.table, r.chain) for r in masq_rules(N, S, True)[1:]} == {("nat", "FLANNEL-POSTRTG")}
    assert masq_rules(N, S, True)[0].args == ("-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG")


def test_masq_rules_without_random_fully() -> None:
    assert [r.text for r in masq_rules(N, S, False)] == [
        '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
        '-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN',
        '-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE',
        '-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/24 -m comment --comment "flanneld masq" -j RETURN',
        '-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE',
    ]


def test_forward_rules() -> None:
    assert [r.text for r in forward_rules(N)] == SPEC_FILTER[1:]
    assert {r.table for r in forward_rules(N)} == {"filter"}


def test_legacy_rules_cover_v015_to_v019() -> None:
    masq = {r.text for r in legacy_masq_rules(N, S)}
    assert len(masq) == 13  # 4 RETURN variants; 8 MASQUERADE variants; the v0.16.2 typo
    assert "-A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN" in masq
    assert "-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.0.0/16 -j MASQUERADE --random-fully" in masq
    assert ('-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.0.0/24 -m comment --comment "flanneld masq" -j RETURN'
            in masq)
    assert ('-A POSTROUTING -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flannel masq" '
            '-j MASQUERADE --random-fully' in masq)
    assert [r.text for r in legacy_forward_rules(N)] == [
        "-A FORWARD -s 10.244.0.0/16 -j ACCEPT",
        "-A FORWARD -d 10.244.0.0/16 -j ACCEPT",
        '-A FORWARD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
        '-A FORWARD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    ]


# -- payloads, with fake binaries --------------------------------------------------------------------


def fake_manager(tmp_path: Path, version: str = "1.8.9", forward: bool = True, missing: str = "") -> IPTablesManager:
    """A manager with fake binaries: iptables-save prints the file iptables-save.<table> (nothing if it is
    missing); iptables-restore appends its arguments to iptables-restore.args and its input to
    iptables-restore.in, or fails while iptables-restore.fail exists. The binary named ``missing`` does
    not exist."""

    def binary(name: str, script: str) -> tuple[str, ...]:
        path = tmp_path / name  # $0 of the script; the real arguments are in $@
        return (str(tmp_path / "bin" / name),) if name == missing else ("sh", "-c", script, str(path))

    return IPTablesManager(
        N, S, None, None, True, forward, 5,
        iptables=binary("iptables", 'echo "iptables v%s (nf_tables)"' % version),
        iptables_save=binary("iptables-save", 'cat "$0.$2" 2>/dev/null || true'),
        iptables_restore=binary("iptables-restore", 'if [ -e "$0.fail" ]; then echo "iptables-restore: line 3 '
                                'failed" >&2; exit 1; fi; echo "$@" >> "$0.args"; cat >> "$0.in"'))


def test_old_iptables_gets_no_random_fully_and_no_wait(tmp_path: Path) -> None:
    m = fake_manager(tmp_path, version="1.6.1")
    assert m.ensure() is True
    assert (tmp_path / "iptables-restore.args").read_text() == "--noflush\n--noflush\n"
    assert (tmp_path / "iptables-restore.in").read_text() == """\
*nat
:FLANNEL-POSTRTG - [0:0]
-I POSTROUTING 1 -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE
COMMIT
*filter
:FLANNEL-FWD - [0:0]
-I FORWARD 1 -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
"""


def test_payload_deletes_every_jump_copy_and_old_rule_present(tmp_path: Path) -> None:
    jump = '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
    (tmp_path / "iptables-save.nat").write_text("\n".join([
        "*nat", ":POSTROUTING ACCEPT [0:0]", ":FLANNEL-POSTRTG - [0:0]", jump,
        "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
        "-A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN", jump, *SPEC_NAT[2:], "COMMIT", ""]))
    m = fake_manager(tmp_path, forward=False)
    assert m.ensure() is True
    assert (tmp_path / "iptables-restore.args").read_text() == "--noflush --wait\n"
    assert (tmp_path / "iptables-restore.in").read_text().splitlines() == [
        "*nat", ":FLANNEL-POSTRTG - [0:0]",
        '-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        '-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        "-D POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN",
        '-I POSTROUTING 1 -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        *SPEC_NAT[2:], "COMMIT"]


def test_restore_failure_is_logged_with_its_stderr(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyflannel")
    (tmp_path / "iptables-restore.fail").touch()
    m = fake_manager(tmp_path)
    assert m.ensure() is False and not m.ready
    err = ("failed to apply partial iptables-restore unable to run iptables-restore "
           "(, iptables-restore: line 3 failed): exit status 1")
    assert messages(caplog)[-1] == "Failed to bootstrap IPTables: " + err
    (tmp_path / "iptables-restore.fail").unlink()
    assert m.ensure() is True and m.ready and m.repairs == 0
    (tmp_path / "iptables-restore.fail").touch()
    caplog.clear()
    assert m.ensure() is False and m.ready and m.repairs == 0
    assert messages(caplog) == ["Some iptables rules are missing; deleting and recreating rules",
                                "Failed to ensure iptables rules: " + err]
    assert caplog.records[-1].levelno == logging.ERROR


@pytest.mark.parametrize("binary", ["iptables", "iptables-save", "iptables-restore"])
def test_missing_binary_gives_up(tmp_path: Path, caplog: pytest.LogCaptureFixture, binary: str) -> None:
    m = fake_manager(tmp_path, missing=binary)
    assert m.ensure() is False and not m.ready
    assert messages(caplog)[-1] == (
        "Failed to setup IPTables. %s binary was not found: [Errno 2] No such file or directory: '%s'"
        % (binary, tmp_path / "bin" / binary))
    caplog.clear()
    runner = threading.Thread(target=m.run, args=(threading.Event(),))
    runner.start()
    runner.join(2)
    assert not runner.is_alive() and messages(caplog) == []


# -- real iptables in a network namespace ------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[str]:
    name = "pftest-ipt-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every command run through subprocess.run during the test."""
    seen: list[list[str]] = []
    real = subprocess.run

    def run(argv: list[str], *args: Any, **kwargs: Any) -> Any:
        seen.append(list(argv))
        return real(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    return seen


def in_ns(ns: str, *cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], input=stdin, check=True, capture_output=True,
                          text=True).stdout


def manager(ns: str, network: IPv4Network = N, subnet: IPv4Network = S, prev_network: IPv4Network | None = None,
            prev_subnet: IPv4Network | None = None, ip_masq: bool = True, forward: bool = True,
            resync: float = 5, on_repair: Any = None) -> IPTablesManager:
    wrap = ("ip", "netns", "exec", ns)
    return IPTablesManager(network, subnet, prev_network, prev_subnet, ip_masq, forward, resync, on_repair,
                           iptables=(*wrap, "iptables"), iptables_save=(*wrap, "iptables-save"),
                           iptables_restore=(*wrap, "iptables-restore"))


def state(ns: str, table: str) -> list[str]:
    """The table's rules and custom chains as iptables-save prints them, counters zeroed."""
    return [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in in_ns(ns, "iptables-save", "-t", table).splitlines()
            if line.startswith(("-A ", ":FLANNEL"))]


def saved(ns: str) -> str:
    return "".join("*%s\n%sCOMMIT\n" % (t, "".join(line + "\n" for line in state(ns, t))) for t in ("nat", "filter"))


def restores(commands: list[list[str]]) -> list[list[str]]:
    return [c for c in commands if "iptables-restore" in c]


@needs_netns
@pytest.mark.netns
class TestInNamespace:
    def test_empty_namespace_gets_the_spec_rules(self, ns: str, caplog: pytest.LogCaptureFixture,
                                                 commands: list[list[str]]) -> None:
        caplog.set_level(logging.INFO, logger="pyflannel")
        m = manager(ns)
        assert m.ensure() is True
        assert saved(ns) == SPEC_SAVE
        assert m.ready and (m.resyncs, m.repairs) == (1, 0)
        assert [c[4:] for c in restores(commands)] == [["iptables-restore", "--noflush", "--wait"]] * 2
        assert messages(caplog) == [
            "Current network or subnet (10.244.0.0/16, 10.244.0.0/24) is not equal to previous one "
            "(0.0.0.0/0, 0.0.0.0/0), trying to recycle old iptables rules",
            "Setting up masking rules",
            "Changing default FORWARD chain policy to ACCEPT",
            "bootstrap done",
        ]

    def test_a_resync_or_restart_with_the_rules_in_place_only_reads(
            self, ns: str, caplog: pytest.LogCaptureFixture, commands: list[list[str]]) -> None:
        caplog.set_level(logging.INFO, logger="pyflannel")
        m = manager(ns)
        m.ensure()
        commands.clear()
        caplog.clear()
        assert m.ensure() is False
        restarted = manager(ns, prev_network=N, prev_subnet=S)
        assert restarted.ensure() is False
        assert [c[4:] for c in commands if c[:4] == ["ip", "netns", "exec", ns]] == [
            ["iptables-save", "-t", "nat"], ["iptables-save", "-t", "filter"],
            ["iptables", "--version"], ["iptables-save", "-t", "nat"], ["iptables-save", "-t", "filter"],
        ]
        assert (m.resyncs, m.repairs) == (2, 0) and restarted.ready
        assert messages(caplog) == ["Setting up masking rules", "Changing default FORWARD chain policy to ACCEPT",
                                    "bootstrap done"]
        assert saved(ns) == SPEC_SAVE

    @pytest.mark.parametrize("damage", [
        ("-t", "nat", "-F", "FLANNEL-POSTRTG"),
        ("-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"),
        ("-t", "nat", "-A", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"),
        ("-t", "nat", "-A", "FLANNEL-POSTRTG", "-j", "RETURN"),
        ("-t", "nat", "-D", "FLANNEL-POSTRTG", "3"),
        ("-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"),
        ("-I", "FLANNEL-FWD", "1", "-d", "10.244.0.0/16", "-m", "comment", "--comment", "flanneld forward",
         "-j", "ACCEPT"),
    ], ids=["flush-chain", "no-jump", "two-jumps", "extra-rule", "missing-rule", "no-fwd-jump", "reordered"])
    def test_damage_is_repaired_in_one_restore(self, ns: str, caplog: pytest.LogCaptureFixture,
                                               commands: list[list[str]], damage: tuple[str, ...]) -> None:
        repaired: list[bool] = []
        m = manager(ns, on_repair=lambda: repaired.append(True))
        m.ensure()
        in_ns(ns, "iptables", *damage)
        assert saved(ns) != SPEC_SAVE
        commands.clear()
        assert m.ensure() is True
        assert saved(ns) == SPEC_SAVE
        assert len(restores(commands)) == 1 and repaired == [True] and m.repairs == 1
        assert "Some iptables rules are missing; deleting and recreating rules" in messages(caplog)
        assert m.ensure() is False and m.repairs == 1

    @pytest.mark.parametrize("old_rules", [
        [  # v0.15.x-v0.16.1: no comments, appended with AppendUnique; with and without --random-fully
            "-A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN",
            "-A POSTROUTING -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
            "-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.0.0/24 -j RETURN",
            "-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.0.0/16 -j MASQUERADE --random-fully",
            "-A POSTROUTING -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE",
            "-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.0.0/16 -j MASQUERADE",
            "-A FORWARD -s 10.244.0.0/16 -j ACCEPT",
            "-A FORWARD -d 10.244.0.0/16 -j ACCEPT",
        ],
        [  # v0.16.2-v0.19: comments, the v0.16.2/v0.16.3 typo, and a run without --random-fully
            '-A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN',
            '-A POSTROUTING -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flannel masq" '
            '-j MASQUERADE --random-fully',
            '-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.0.0/24 -m comment --comment "flanneld masq" -j RETURN',
            '-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" '
            '-j MASQUERADE --random-fully',
            '-A POSTROUTING -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE',
            '-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE',
            '-A FORWARD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
            '-A FORWARD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
        ],
    ], ids=["v0.15", "v0.19"])
    def test_old_flanneld_rules_are_replaced(self, ns: str, old_rules: list[str]) -> None:
        docker_nat = "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE"
        docker_fwd = "-A FORWARD -i docker0 -j ACCEPT"
        nat = [docker_nat, *(r for r in old_rules if "POSTROUTING" in r)]
        fwd = [docker_fwd, *(r for r in old_rules if "FORWARD" in r)]
        in_ns(ns, "iptables-restore", "--noflush",
              stdin="*nat\n%s\nCOMMIT\n*filter\n%s\nCOMMIT\n" % ("\n".join(nat), "\n".join(fwd)))
        assert state(ns, "nat") == nat and state(ns, "filter") == fwd
        assert manager(ns).ensure() is True
        assert state(ns, "nat") == [*SPEC_NAT[:2], docker_nat, *SPEC_NAT[2:]]
        assert state(ns, "filter") == [*SPEC_FILTER[:2], docker_fwd, *SPEC_FILTER[2:]]

    def test_a_changed_network_and_subnet_leave_only_the_new_set(self, ns: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="pyflannel")
        manager(ns, network=OLD_N, subnet=OLD_S).ensure()
        in_ns(ns, "iptables-restore", "--noflush", stdin=(
            '*nat\n-A POSTROUTING ! -s 10.245.0.0/16 -d 10.245.3.0/24 -m comment --comment "flanneld masq" -j RETURN\n'
            "COMMIT\n*filter\n-A FORWARD -d 10.245.0.0/16 -j ACCEPT\nCOMMIT\n"))
        assert "10.245.3.0/24" in saved(ns)
        caplog.clear()
        assert manager(ns, prev_network=OLD_N, prev_subnet=OLD_S).ensure() is True
        assert saved(ns) == SPEC_SAVE
        assert messages(caplog)[0] == (
            "Current network or subnet (10.244.0.0/16, 10.244.0.0/24) is not equal to previous one "
            "(10.245.0.0/16, 10.245.3.0/24), trying to recycle old iptables rules")

    def test_masquerade_only_or_forward_only(self, ns: str, commands: list[list[str]]) -> None:
        assert manager(ns, ip_masq=False).ensure() is True
        assert ["iptables-save", "-t", "nat"] not in [c[4:] for c in commands]
        assert state(ns, "nat") == [] and state(ns, "filter") == SPEC_FILTER
        in_ns(ns, "iptables", "-F")
        in_ns(ns, "iptables", "-X")
        assert manager(ns, forward=False).ensure() is True
        assert state(ns, "nat") == SPEC_NAT and state(ns, "filter") == []

    def test_run_repairs_and_stops_promptly(self, ns: str) -> None:
        repaired = threading.Event()
        m = manager(ns, resync=0.2, on_repair=repaired.set)
        stop = threading.Event()
        runner = threading.Thread(target=m.run, args=(stop,))
        runner.start()
        try:
            deadline = time.monotonic() + 5
            while not m.ready and time.monotonic() < deadline:
                time.sleep(0.05)
            assert m.ready and saved(ns) == SPEC_SAVE
            in_ns(ns, "iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
            assert repaired.wait(5)
            assert saved(ns) == SPEC_SAVE and m.repairs == 1 and m.resyncs >= 2
        finally:
            stop.set()
            started = time.monotonic()
            runner.join(5)
        assert not runner.is_alive() and time.monotonic() - started < 1
