"""iptables mode: the pure rule builders, the restore payloads (checked with fake binaries, no root needed),
and real iptables (nf_tables, and legacy where the backend matters) in a fresh network namespace for each
test: flannel v0.28.9's rules beside kube-proxy's, the upgrade from older layouts, repairs, and the
clean-up that nftables mode runs."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from bench.kubeproxy import binary, kube_proxy_restore, load
from pyflannel.family import IPNetwork
from pyflannel.trafficmngr import PodNetwork
from pyflannel.trafficmngr.iptables import (
    IPTablesManager,
    forward_rules,
    legacy_forward_rules,
    legacy_masq_rules,
    masq_rules,
    remove_chains,
)
from pyflannel.trafficmngr.nfnetlink import NfTables
from tests.conftest import needs_netns
from tools.netcluster import in_netns

N = IPv4Network("10.244.0.0/16")
S = IPv4Network("10.244.1.0/24")
OLD_N = IPv4Network("10.245.0.0/16")
OLD_S = IPv4Network("10.245.3.0/24")
N6 = IPv6Network("fd00:10:244::/56")
S6 = IPv6Network("fd00:10:244:1::/64")

# flannel v0.28.9's rules (spec §4.1; flannel's e2e check_iptables): `iptables -S` of the four chains on a
# node with kube-proxy's jumps, which come first.
KUBE_PROXY_POSTROUTING = ['-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING']
KUBE_PROXY_FORWARD = [
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
    "-j KUBE-PROXY-FIREWALL",
    '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" '
    "-j KUBE-EXTERNAL-SERVICES",
]
SPEC_POSTROUTING = '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
SPEC_FORWARD = '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD'
SPEC_POSTRTG = """\
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
""".splitlines()
SPEC_FWD = """\
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
""".splitlines()
SPEC6_POSTRTG = """\
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:244:1::/64 -d fd00:10:244::/56 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:244::/56 -d fd00:10:244:1::/64 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244:1::/64 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244::/56 -m comment --comment "flanneld masq" -j MASQUERADE \
--random-fully
""".splitlines()
SPEC6_FWD = """\
-A FLANNEL-FWD -s fd00:10:244::/56 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d fd00:10:244::/56 -m comment --comment "flanneld forward" -j ACCEPT
""".splitlines()
SPEC = {4: (SPEC_POSTRTG, SPEC_FWD), 6: (SPEC6_POSTRTG, SPEC6_FWD)}
# What flanneld v0.20.2 (and pyflannel before) left: the jumps inserted first, FLANNEL-POSTRTG of five rules.
V020_POSTRTG = """\
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s {n} -d {n} -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s {n} ! -d {m} -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s {n} -d {s} -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s {n} -d {n} -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
"""


def chains(v: int = 4, kube_proxy: bool = False) -> dict[tuple[str, str], list[str]]:
    """What ``iptables -t <table> -S <chain>`` lists (``-A`` lines) for the four chains on a v0.28.9 node."""
    postrtg, fwd = SPEC[v]
    return {("nat", "POSTROUTING"): [*(KUBE_PROXY_POSTROUTING if kube_proxy else []), SPEC_POSTROUTING],
            ("nat", "FLANNEL-POSTRTG"): postrtg,
            ("filter", "FORWARD"): [*(KUBE_PROXY_FORWARD if kube_proxy else []), SPEC_FORWARD],
            ("filter", "FLANNEL-FWD"): fwd}


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def pods(network: IPNetwork = N, subnet: IPNetwork = S, prev_network: IPNetwork | None = None,
         prev_subnet: IPNetwork | None = None) -> list[PodNetwork]:
    return [PodNetwork(network, subnet, prev_network, prev_subnet)]


# -- pure rule builders ------------------------------------------------------------------------------


def test_masq_rules_with_random_fully() -> None:
    rules = masq_rules(N, S, True)
    assert [r.text for r in rules] == [SPEC_POSTROUTING, *SPEC_POSTRTG]
    assert {(r.table, r.chain) for r in rules[1:]} == {("nat", "FLANNEL-POSTRTG")}
    assert rules[0].args == ("-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG")


def test_masq_rules_without_random_fully() -> None:
    assert [r.text for r in masq_rules(N, S, False)] == [
        SPEC_POSTROUTING, *(line.replace(" --random-fully", "") for line in SPEC_POSTRTG)]


def test_ipv6_rules_are_the_ipv4_rules_with_ff00() -> None:
    assert [r.text for r in masq_rules(N6, S6, True)] == [SPEC_POSTROUTING, *SPEC6_POSTRTG]
    assert [r.text for r in forward_rules(N6)] == [SPEC_FORWARD, *SPEC6_FWD]
    assert ("-A POSTROUTING -s fd00:10:244::/56 ! -d ff00::/8 -j MASQUERADE"
            in {r.text for r in legacy_masq_rules(N6, S6)})


def test_forward_rules() -> None:
    assert [r.text for r in forward_rules(N)] == [SPEC_FORWARD, *SPEC_FWD]
    assert {r.table for r in forward_rules(N)} == {"filter"}


def test_legacy_rules_cover_v015_to_v019() -> None:
    masq = {r.text for r in legacy_masq_rules(N, S)}
    assert len(masq) == 13  # 4 RETURN variants; 8 MASQUERADE variants; the v0.16.2 typo
    assert "-A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN" in masq
    assert "-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.0.0/16 -j MASQUERADE --random-fully" in masq
    assert ('-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN'
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


FAKE_IPTABLES = """
if [ "$1" = --version ]; then echo "iptables v$VERSION (nf_tables)"; exit 0; fi
echo "$@" >> "$0.args"
while [ $# -gt 0 ]; do case "$1" in -S|-L) chain=$2 ;; esac; shift; done
if [ -e "$0.status" ]; then echo "iptables: Resource temporarily unavailable." >&2; exit "$(cat "$0.status")"; fi
if [ -e "$0.killed" ]; then kill -9 $$; fi
if [ -e "$0.$chain" ]; then cat "$0.$chain"; exit 0; fi
case "$chain" in
POSTROUTING|FORWARD) echo "-P $chain ACCEPT" ;;
*) echo "iptables: No chain/target/match by that name." >&2; exit 1 ;;
esac
"""


def fake_manager(tmp_path: Path, version: str = "1.8.9", forward: bool = True, missing: str = "",
                 network: IPNetwork = N, subnet: IPNetwork = S, random_fully_disabled: bool = False) -> IPTablesManager:
    """A manager with fake binaries. ``iptables -S <chain>`` and ``-L <chain>`` append their arguments to
    iptables.args and print the file iptables.<chain>; without one, a built-in chain's policy, or for
    another chain exit status 1 as for a chain that does not exist. While iptables.status exists it
    exits with the status in it, while iptables.killed exists it is killed. iptables-restore appends
    its arguments to iptables-restore.args and its input to iptables-restore.in, or fails while
    iptables-restore.fail exists. The binary named ``missing`` does not exist."""
    scripts = {"iptables": "VERSION=%s\n%s" % (version, FAKE_IPTABLES),
               "iptables-restore": 'if [ -e "$0.fail" ]; then echo "iptables-restore: line 3 failed" >&2; exit 1; fi; '
                                   'echo "$@" >> "$0.args"; cat >> "$0.in"'}

    def command(name: str) -> tuple[str, ...]:
        name = name.replace("ip6tables", "iptables")  # one set of fakes for either family
        if name == missing:
            return (str(tmp_path / "bin" / name),)
        return ("sh", "-c", scripts[name], str(tmp_path / name))  # $0 of the script; the real arguments follow

    return IPTablesManager(pods(network, subnet), True, forward, random_fully_disabled, 5, command=command)


def test_old_iptables_gets_no_random_fully_and_no_wait(tmp_path: Path) -> None:
    m = fake_manager(tmp_path, version="1.6.1")
    assert m.ensure() is True
    assert (tmp_path / "iptables.args").read_text().splitlines() == [
        "--wait -t nat -L FLANNEL-POSTRTG -n -v", "--wait -t nat -S POSTROUTING", "--wait -t nat -S FLANNEL-POSTRTG",
        "--wait -t filter -L FLANNEL-FWD -n -v", "--wait -t filter -S FORWARD", "--wait -t filter -S FLANNEL-FWD"]
    assert (tmp_path / "iptables-restore.args").read_text() == "--noflush\n--noflush\n"
    assert (tmp_path / "iptables-restore.in").read_text() == "\n".join([
        "*nat", ":FLANNEL-POSTRTG - [0:0]", SPEC_POSTROUTING,
        *(line.replace(" --random-fully", "") for line in SPEC_POSTRTG), "COMMIT",
        "*filter", ":FLANNEL-FWD - [0:0]", SPEC_FORWARD, *SPEC_FWD, "COMMIT", ""])


def test_ip_masq_fully_random_disable_drops_random_fully(tmp_path: Path) -> None:
    assert fake_manager(tmp_path, forward=False, random_fully_disabled=True).ensure() is True
    assert "--random-fully" not in (tmp_path / "iptables-restore.in").read_text()
    assert (tmp_path / "iptables-restore.args").read_text() == "--noflush --wait\n"


def test_iptables_before_1_4_20_lists_without_wait(tmp_path: Path) -> None:
    assert fake_manager(tmp_path, version="1.4.19", forward=False).ensure() is True
    assert (tmp_path / "iptables.args").read_text() == (
        "-t nat -L FLANNEL-POSTRTG -n -v\n-t nat -S POSTROUTING\n-t nat -S FLANNEL-POSTRTG\n")


def test_payload_deletes_every_jump_copy_and_old_rule_present(tmp_path: Path) -> None:
    (tmp_path / "iptables.POSTROUTING").write_text("\n".join([
        "-P POSTROUTING ACCEPT", SPEC_POSTROUTING, "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
        "-A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN", SPEC_POSTROUTING, ""]))
    (tmp_path / "iptables.FLANNEL-POSTRTG").write_text("\n".join(["-N FLANNEL-POSTRTG", *SPEC_POSTRTG, ""]))
    m = fake_manager(tmp_path, forward=False)
    assert m.ensure() is True
    assert (tmp_path / "iptables-restore.args").read_text() == "--noflush --wait\n"
    assert (tmp_path / "iptables-restore.in").read_text().splitlines() == [
        "*nat", ":FLANNEL-POSTRTG - [0:0]",
        '-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        '-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        "-D POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN",
        SPEC_POSTROUTING, *SPEC_POSTRTG, "COMMIT"]


@pytest.mark.parametrize(("forward", "repaired"), [
    (["-P FORWARD DROP", SPEC_FORWARD, *KUBE_PROXY_FORWARD], True),  # v0.20.2's place: before kube-proxy's
    (["-P FORWARD DROP", "-A FORWARD -j DOCKER-USER", *KUBE_PROXY_FORWARD, SPEC_FORWARD], False),
    (["-P FORWARD DROP", *KUBE_PROXY_FORWARD, SPEC_FORWARD, "-A FORWARD -o docker0 -j DOCKER"], False),
], ids=["before-kube-proxy", "other-agent-first", "other-agent-after"])
def test_the_jump_belongs_after_kube_proxy_s(tmp_path: Path, forward: list[str], repaired: bool) -> None:
    (tmp_path / "iptables.FORWARD").write_text("\n".join([*forward, ""]))
    (tmp_path / "iptables.FLANNEL-FWD").write_text("\n".join(["-N FLANNEL-FWD", *SPEC_FWD, ""]))
    (tmp_path / "iptables.POSTROUTING").write_text("\n".join(["-P POSTROUTING ACCEPT", SPEC_POSTROUTING, ""]))
    (tmp_path / "iptables.FLANNEL-POSTRTG").write_text("\n".join(["-N FLANNEL-POSTRTG", *SPEC_POSTRTG, ""]))
    assert fake_manager(tmp_path).ensure() is repaired
    if repaired:
        assert (tmp_path / "iptables-restore.in").read_text().splitlines() == [
            "*filter", ":FLANNEL-FWD - [0:0]", "-D FORWARD " + SPEC_FORWARD[len("-A FORWARD "):], SPEC_FORWARD,
            *SPEC_FWD, "COMMIT"]


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


def test_rules_in_place_are_only_listed(tmp_path: Path) -> None:
    (tmp_path / "iptables.POSTROUTING").write_text("-P POSTROUTING ACCEPT\n%s\n" % SPEC_POSTROUTING)
    (tmp_path / "iptables.FLANNEL-POSTRTG").write_text("\n".join(["-N FLANNEL-POSTRTG", *SPEC_POSTRTG, ""]))
    (tmp_path / "iptables.FORWARD").write_text("-P FORWARD ACCEPT\n%s\n" % SPEC_FORWARD)
    (tmp_path / "iptables.FLANNEL-FWD").write_text("\n".join(["-N FLANNEL-FWD", *SPEC_FWD, ""]))
    m = fake_manager(tmp_path)
    assert m.ensure() is False and m.ready and m.resyncs == 1
    assert not (tmp_path / "iptables-restore.args").exists()
    assert len((tmp_path / "iptables.args").read_text().splitlines()) == 6
    (tmp_path / "iptables.args").unlink()
    assert m.ensure() is False  # what the two views showed was right: only they are listed again
    assert (tmp_path / "iptables.args").read_text() == (
        "--wait -t nat -L FLANNEL-POSTRTG -n -v\n--wait -t filter -L FLANNEL-FWD -n -v\n")
    (tmp_path / "iptables.args").unlink()
    (tmp_path / "iptables.FLANNEL-POSTRTG").write_text("\n".join(["-N FLANNEL-POSTRTG", *SPEC_POSTRTG[1:], ""]))
    assert m.ensure() is True and m.repairs == 1
    assert (tmp_path / "iptables.args").read_text().splitlines() == [
        "--wait -t nat -L FLANNEL-POSTRTG -n -v", "--wait -t nat -S POSTROUTING", "--wait -t nat -S FLANNEL-POSTRTG",
        "--wait -t filter -L FLANNEL-FWD -n -v"]
    assert (tmp_path / "iptables-restore.in").read_text().startswith("*nat\n")


@pytest.mark.parametrize("failure", ["status", "killed"])
def test_a_failed_listing_is_an_error_and_never_a_repair(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        failure: str) -> None:
    """A listing that fails for another reason than a missing chain (the xtables lock, a child killed by
    the OOM killer) must not look like missing rules."""
    m = fake_manager(tmp_path)
    assert m.ensure() is True and m.ready
    (tmp_path / "iptables.status").write_text("4") if failure == "status" else (tmp_path / "iptables.killed").touch()
    restores = (tmp_path / "iptables-restore.args").read_text()
    caplog.clear()
    assert m.ensure() is False and m.repairs == 0 and m.resyncs == 1
    assert (tmp_path / "iptables-restore.args").read_text() == restores
    status = 4 if failure == "status" else -9
    stderr = "iptables: Resource temporarily unavailable." if failure == "status" else ""
    assert messages(caplog) == ["Failed to ensure iptables rules: unable to run iptables (, %s): exit status %d"
                                % (stderr, status)]


@pytest.mark.parametrize(("network", "subnet", "missing", "line"), [
    (N, S, "iptables", "Failed to setup IPTables. iptables binary was not found: "),
    (N, S, "iptables-restore", "Failed to setup IPTables. iptables-restore binary was not found: "),
    (N6, S6, "iptables", "Failed to setup IP6Tables. iptables binary was not found: "),
    (N6, S6, "iptables-restore", "Failed to setup iptables-restore: "),
], ids=["iptables", "iptables-restore", "ip6tables", "ip6tables-restore"])
def test_missing_binary_gives_up(tmp_path: Path, caplog: pytest.LogCaptureFixture, network: IPNetwork,
                                 subnet: IPNetwork, missing: str, line: str) -> None:
    m = fake_manager(tmp_path, missing=missing, network=network, subnet=subnet)
    assert m.ensure() is False and not m.ready and m.gave_up
    assert messages(caplog)[-1] == line + "[Errno 2] No such file or directory: '%s'" % (tmp_path / "bin" / missing)
    caplog.clear()
    m._cleaned = True  # the clean-up of nftables mode's tables is not this test's: it would reach the host's
    runner = threading.Thread(target=m.run, args=(threading.Event(),))
    runner.start()
    runner.join(2)
    assert not runner.is_alive() and messages(caplog) == []


@pytest.mark.parametrize(("networks", "lines"), [
    (pods(N, S, N, S), ["Setting up masking rules", "Changing default FORWARD chain policy to ACCEPT"]),
    (pods(N, S, N, OLD_S), [
        "Current network or subnet (10.244.0.0/16, 10.244.1.0/24) is not equal to previous one "
        "(10.244.0.0/16, 10.245.3.0/24), trying to recycle old iptables rules",
        "Setting up masking rules", "Changing default FORWARD chain policy to ACCEPT"]),
    ([PodNetwork(N, S, OLD_N, OLD_S), PodNetwork(N6, S6)], [
        "Current network or subnet (10.244.0.0/16, 10.244.1.0/24) is not equal to previous one "
        "(10.245.0.0/16, 10.245.3.0/24), trying to recycle old iptables rules",
        "Setting up masking rules",
        "Current network or subnet (fd00:10:244::/56, fd00:10:244:1::/64) is not equal to previous one "
        "(::/0, ::/0), trying to recycle old iptables rules",
        "Setting up masking rules for IPv6",
        "Changing default FORWARD chain policy to ACCEPT",
        "IPv6: Changing default FORWARD chain policy to ACCEPT"]),
], ids=["same", "subnet-changed", "dual-stack"])
def test_start_up_lines_in_v0_28_9_wording(caplog: pytest.LogCaptureFixture, networks: list[PodNetwork],
                                           lines: list[str]) -> None:
    """v0.28.9 recycles when the network or the subnet changed, with one wording for both families."""
    caplog.set_level(logging.INFO, logger="pyflannel")
    IPTablesManager(networks, True, True, False, 5)
    assert messages(caplog) == lines


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


def in_ns(ns: str, *cmd: str | bytes, stdin: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], input=stdin, check=True, capture_output=True,
                          text=True).stdout


def manager(ns: str, networks: list[PodNetwork] | None = None, ip_masq: bool = True, forward: bool = True,
            resync: float = 5, on_repair: Any = None, backend: str = "nft") -> IPTablesManager:
    """A manager whose binaries and netfilter socket are the namespace's."""
    return IPTablesManager(networks or pods(), ip_masq, forward, False, resync, on_repair,
                           command=lambda name: ("ip", "netns", "exec", ns, binary(backend, name)),
                           netlink=lambda: in_netns(ns, NfTables))


def listing(ns: str, table: str, chain: str, v: int = 4, backend: str = "nft") -> list[str]:
    """``iptables -t table -S chain``'s rules; [] if there is no such chain."""
    res = subprocess.run(["ip", "netns", "exec", ns, binary(backend, "ip6tables" if v == 6 else "iptables"), "-t",
                          table, "-S", chain], capture_output=True, encoding="utf-8", errors="surrogateescape")
    return [line for line in res.stdout.splitlines() if line.startswith("-A ")]


def listings(ns: str, v: int = 4, backend: str = "nft") -> dict[tuple[str, str], list[str]]:
    """The four chains' rules, as :func:`chains` gives them."""
    return {(t, c): listing(ns, t, c, v, backend) for t, c in (("nat", "POSTROUTING"), ("nat", "FLANNEL-POSTRTG"),
                                                               ("filter", "FORWARD"), ("filter", "FLANNEL-FWD"))}


def state(ns: str, table: str, backend: str = "nft") -> list[str]:
    """The table's rules and custom chains as iptables-save prints them, counters zeroed."""
    return [re.sub(r"\[\d+:\d+\]", "[0:0]", line)
            for line in in_ns(ns, binary(backend, "iptables-save"), "-t", table).splitlines()
            if line.startswith(("-A ", ":FLANNEL"))]


def kube_proxy_jumps(ns: str, v: int = 4) -> None:
    """kube-proxy's jumps from POSTROUTING and FORWARD, in its order, and its (empty) chains."""
    filter_chains = ("KUBE-PROXY-FIREWALL", "KUBE-FORWARD", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES")
    in_ns(ns, "ip6tables-nft-restore" if v == 6 else "iptables-nft-restore", "--noflush", stdin="\n".join([
        "*nat", ":KUBE-POSTROUTING - [0:0]", *KUBE_PROXY_POSTROUTING, "COMMIT",
        "*filter", *(":%s - [0:0]" % c for c in filter_chains), *KUBE_PROXY_FORWARD, "COMMIT", ""]))


def v020_layout(ns: str, v: int = 4) -> None:
    """flanneld v0.20.2's rules (pyflannel's before), the jumps inserted first."""
    n, s, m = (N, S, "224.0.0.0/4") if v == 4 else (N6, S6, "ff00::/8")
    in_ns(ns, "ip6tables-nft-restore" if v == 6 else "iptables-nft-restore", "--noflush", stdin="\n".join([
        "*nat", ":FLANNEL-POSTRTG - [0:0]", "-I POSTROUTING 1" + SPEC_POSTROUTING[len("-A POSTROUTING"):],
        V020_POSTRTG.format(n=n, s=s, m=m).strip(), "COMMIT",
        "*filter", ":FLANNEL-FWD - [0:0]", "-I FORWARD 1" + SPEC_FORWARD[len("-A FORWARD"):], *SPEC[v][1], "COMMIT",
        ""]))


def restores(commands: list[list[str]]) -> list[list[str]]:
    return [c for c in commands if any(a.endswith("-restore") for a in c)]


@needs_netns
@pytest.mark.netns
class TestInNamespace:
    def test_empty_namespace_gets_the_spec_rules(self, ns: str, caplog: pytest.LogCaptureFixture,
                                                 commands: list[list[str]]) -> None:
        caplog.set_level(logging.INFO, logger="pyflannel")
        m = manager(ns)
        assert m.ensure() is True
        assert listings(ns) == chains()
        assert m.ready and (m.resyncs, m.repairs) == (1, 0)
        assert [c[4:] for c in restores(commands)] == [["iptables-nft-restore", "--noflush", "--wait"]] * 2
        assert messages(caplog) == [
            "Current network or subnet (10.244.0.0/16, 10.244.1.0/24) is not equal to previous one "
            "(0.0.0.0/0, 0.0.0.0/0), trying to recycle old iptables rules",
            "Setting up masking rules",
            "Changing default FORWARD chain policy to ACCEPT",
            "bootstrap done",
        ]

    @pytest.mark.parametrize("upgrade", [False, True], ids=["fresh", "from-v0.20.2"])
    def test_beside_kube_proxy_both_families_get_v0_28_9_s_rules(self, ns: str, upgrade: bool) -> None:
        """The golden of spec §4.1 (flannel's e2e check_iptables) for iptables and ip6tables: the jumps
        come after kube-proxy's, on a fresh node and on one upgraded in place from v0.20.2's layout."""
        for v in (4, 6):
            kube_proxy_jumps(ns, v)
            if upgrade:
                v020_layout(ns, v)
        if upgrade:
            assert listing(ns, "filter", "FORWARD")[0] == SPEC_FORWARD
            assert len(listing(ns, "nat", "FLANNEL-POSTRTG", 6)) == 5
        m = manager(ns, [PodNetwork(N, S, N, S), PodNetwork(N6, S6, N6, S6)])
        assert m.ensure() is True
        for v in (4, 6):
            assert listings(ns, v) == chains(v, kube_proxy=True)
        assert m.ensure() is False
        assert manager(ns, [PodNetwork(N, S, N, S), PodNetwork(N6, S6, N6, S6)]).ensure() is False  # a restart

    def test_a_resync_or_restart_with_the_rules_in_place_only_reads(
            self, ns: str, caplog: pytest.LogCaptureFixture, commands: list[list[str]]) -> None:
        caplog.set_level(logging.INFO, logger="pyflannel")
        m = manager(ns)
        m.ensure()
        in_ns(ns, "iptables-nft", "-I", "FORWARD", "1", "-j", "ACCEPT")  # another agent's rule first: no flapping
        commands.clear()
        caplog.clear()
        assert m.ensure() is False
        assert m.ensure() is False
        restarted = manager(ns, pods(N, S, N, S))
        assert restarted.ensure() is False
        views = [["iptables-nft", "--wait", "-t", "nat", "-L", "FLANNEL-POSTRTG", "-n", "-v"],
                 ["iptables-nft", "--wait", "-t", "filter", "-L", "FLANNEL-FWD", "-n", "-v"]]
        full = [views[0], ["iptables-nft", "--wait", "-t", "nat", "-S", "POSTROUTING"],
                ["iptables-nft", "--wait", "-t", "nat", "-S", "FLANNEL-POSTRTG"],
                views[1], ["iptables-nft", "--wait", "-t", "filter", "-S", "FORWARD"],
                ["iptables-nft", "--wait", "-t", "filter", "-S", "FLANNEL-FWD"]]
        assert [c[4:] for c in commands if c[:4] == ["ip", "netns", "exec", ns]] == [
            *full, *views, ["iptables-nft", "--version"], *full]
        assert (m.resyncs, m.repairs) == (3, 0) and restarted.ready
        assert messages(caplog) == ["Setting up masking rules", "Changing default FORWARD chain policy to ACCEPT",
                                    "bootstrap done"]
        assert listing(ns, "filter", "FORWARD") == ["-A FORWARD -j ACCEPT", SPEC_FORWARD]

    @pytest.mark.parametrize("backend", ["nft", "legacy"])
    @pytest.mark.parametrize("damage", [
        ["-t nat -F FLANNEL-POSTRTG"],
        ['-t nat -D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'],
        ['-t nat -D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG', "-t nat -F FLANNEL-POSTRTG",
         "-t nat -X FLANNEL-POSTRTG"],
        ['-t nat -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'],
        ["-t nat -A FLANNEL-POSTRTG -j RETURN"],
        ["-t nat -D FLANNEL-POSTRTG 3"],
        ['-t nat -I FLANNEL-POSTRTG 1 -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" '
         "-j RETURN", "-t nat -D FLANNEL-POSTRTG 3"],
        ['-D FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD'],
        ['-I FLANNEL-FWD 1 -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT'],
    ], ids=["flush-chain", "no-jump", "no-chain", "two-jumps", "extra-rule", "missing-rule", "reordered",
            "no-fwd-jump", "fwd-extra-first"])
    def test_damage_is_repaired_in_one_restore(self, ns: str, caplog: pytest.LogCaptureFixture,
                                               commands: list[list[str]], damage: list[str], backend: str) -> None:
        repaired: list[bool] = []
        m = manager(ns, on_repair=lambda: repaired.append(True), backend=backend)
        m.ensure()
        assert m.ensure() is False  # from now on a check lists only our chains' views, unless they change
        for command in damage:
            in_ns(ns, binary(backend, "iptables"), *shlex.split(command))
        assert listings(ns, backend=backend) != chains()
        commands.clear()
        assert m.ensure() is True
        assert listings(ns, backend=backend) == chains()
        assert len(restores(commands)) == 1 and repaired == [True] and m.repairs == 1
        assert "Some iptables rules are missing; deleting and recreating rules" in messages(caplog)
        assert m.ensure() is False and m.repairs == 1

    @pytest.mark.parametrize("old_rules", [
        [  # v0.15.x-v0.16.1: no comments, appended with AppendUnique; with and without --random-fully
            "-A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN",
            "-A POSTROUTING -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
            "-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.1.0/24 -j RETURN",
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
            '-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN',
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
        in_ns(ns, "iptables-nft-restore", "--noflush",
              stdin="*nat\n%s\nCOMMIT\n*filter\n%s\nCOMMIT\n" % ("\n".join(nat), "\n".join(fwd)))
        assert state(ns, "nat") == nat and state(ns, "filter") == fwd
        assert manager(ns).ensure() is True
        assert listing(ns, "nat", "POSTROUTING") == [docker_nat, SPEC_POSTROUTING]
        assert listing(ns, "filter", "FORWARD") == [docker_fwd, SPEC_FORWARD]

    def test_a_changed_network_and_subnet_leave_only_the_new_set(self, ns: str) -> None:
        manager(ns, pods(OLD_N, OLD_S)).ensure()
        in_ns(ns, "iptables-nft-restore", "--noflush", stdin=(
            '*nat\n-A POSTROUTING ! -s 10.245.0.0/16 -d 10.245.3.0/24 -m comment --comment "flanneld masq" -j RETURN\n'
            "COMMIT\n*filter\n-A FORWARD -d 10.245.0.0/16 -j ACCEPT\nCOMMIT\n"))
        assert "10.245.3.0/24" in "".join(state(ns, "nat"))
        assert manager(ns, pods(N, S, OLD_N, OLD_S)).ensure() is True
        assert listings(ns) == chains()

    def test_masquerade_only_or_forward_only(self, ns: str, commands: list[list[str]]) -> None:
        assert manager(ns, ip_masq=False).ensure() is True
        assert not [c for c in commands if "nat" in c]
        assert state(ns, "nat") == [] and state(ns, "filter") == [":FLANNEL-FWD - [0:0]", SPEC_FORWARD, *SPEC_FWD]
        in_ns(ns, "iptables-nft", "-F")
        in_ns(ns, "iptables-nft", "-X")
        assert manager(ns, forward=False).ensure() is True
        assert state(ns, "nat") == [":FLANNEL-POSTRTG - [0:0]", SPEC_POSTROUTING, *SPEC_POSTRTG]
        assert state(ns, "filter") == []

    def test_counters_that_move_need_no_comparison(self, ns: str, commands: list[list[str]]) -> None:
        m = manager(ns, forward=False)
        m.ensure()
        assert m.ensure() is False
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(ns, "ip", "addr", "add", "10.244.1.1/32", "dev", "lo")
        in_ns(ns, "ping", "-c", "1", "-W", "2", "10.244.1.1")  # -s S -d N: RETURN, the second rule, counts it
        listed = in_ns(ns, "iptables-nft", "-t", "nat", "-L", "FLANNEL-POSTRTG", "-n", "-v", "-x")
        assert " 1 " in listed.splitlines()[3]
        commands.clear()
        assert m.ensure() is False
        assert [c[4:] for c in commands] == [["iptables-nft", "--wait", "-t", "nat", "-L", "FLANNEL-POSTRTG", "-n",
                                              "-v"]]

    def test_a_latin1_comment_of_another_agent_is_listed_and_kept(self, ns: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
        """One byte that is not UTF-8 in another agent's rule must not stop the check (it used to raise
        UnicodeDecodeError in the worker until the daemon exited)."""
        for table, chain in (("filter", "FORWARD"), ("nat", "POSTROUTING")):
            subprocess.run(["ip", "netns", "exec", ns, "iptables-nft", "-t", table, "-A", chain, "-m", "comment",
                            "--comment", b"caf\xe9 rule", "-j", "ACCEPT"], check=True)
        m = manager(ns)
        assert m.ensure() is True and m.ready
        assert m.ensure() is False
        forward = subprocess.run(["ip", "netns", "exec", ns, "iptables-nft", "-S", "FORWARD"], capture_output=True,
                                 check=True).stdout
        assert b'-A FORWARD -m comment --comment "caf\xe9 rule" -j ACCEPT\n' in forward
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert remove_chains(lambda name: ("ip", "netns", "exec", ns, binary("nft", name))) is True
        assert listing(ns, "filter", "FORWARD") == ['-A FORWARD -m comment --comment "caf\udce9 rule" -j ACCEPT']

    def test_run_repairs_and_stops_promptly(self, ns: str) -> None:
        repaired = threading.Event()
        m = manager(ns, resync=1, on_repair=repaired.set)
        stop = threading.Event()
        runner = threading.Thread(target=m.run, args=(stop,))
        runner.start()
        try:
            deadline = time.monotonic() + 5
            while m.resyncs < 2 and time.monotonic() < deadline:  # bootstrap, then a check that found all
                time.sleep(0.05)
            assert m.ready and listings(ns) == chains()
            in_ns(ns, "iptables-nft", "-t", "nat", "-F", "FLANNEL-POSTRTG")
            flushed = time.monotonic()
            assert repaired.wait(5)
            print("flushed FLANNEL-POSTRTG recovered in %.1fs (--iptables-resync 1)" % (time.monotonic() - flushed))
            assert listings(ns) == chains() and m.repairs == 1 and m.resyncs >= 3
        finally:
            stop.set()
            started = time.monotonic()
            runner.join(5)
        assert not runner.is_alive() and time.monotonic() - started < 1

    @pytest.mark.parametrize("backend", ["nft", "legacy"])
    def test_kube_proxy_syncing_meanwhile_breaks_nothing(self, ns: str, backend: str) -> None:
        """kube-proxy's syncs (an iptables-restore --noflush of its chains and an iptables -C of its jump, as
        it runs them) loop while the manager checks: neither side fails, the manager repairs nothing that
        is in place and still finds a rule deleted in between."""
        load(ns, backend, 300, str(N))
        m = manager(ns, backend=backend)
        assert m.ensure() is True
        sync = kube_proxy_restore(300, str(N), jumps=False)
        wrap = ["ip", "netns", "exec", ns, binary(backend, "iptables")]
        stop = threading.Event()
        syncs: list[str] = []  # "" for a sync that worked, else its error

        def kube_proxy() -> None:
            while not stop.is_set():
                check = subprocess.run([*wrap, "-w", "5", "-W", "100000", "-C", "POSTROUTING", "-t", "nat", "-m",
                                        "comment", "--comment", "kubernetes postrouting rules", "-j",
                                        "KUBE-POSTROUTING"], capture_output=True, text=True)
                restore = subprocess.run([*wrap[:-1], binary(backend, "iptables-restore"), "-w", "5", "-W", "100000",
                                          "--noflush", "--counters"], input=sync, capture_output=True, text=True)
                syncs.append(check.stderr + restore.stderr if check.returncode or restore.returncode else "")

        runner = threading.Thread(target=kube_proxy)
        runner.start()
        checks = 0
        try:
            deadline = time.monotonic() + 60
            while (len(syncs) < 20 or checks < 40) and time.monotonic() < deadline:
                if checks == 20:
                    in_ns(ns, binary(backend, "iptables"), "-t", "nat", "-D", "FLANNEL-POSTRTG", "2")
                    assert m.ensure() is True and m.repairs == 1
                else:
                    assert m.ensure() is False
                checks += 1
        finally:
            stop.set()
            runner.join(30)
        print("%s: %d kube-proxy syncs during %d checks" % (backend, len(syncs), checks))
        assert [e for e in syncs if e] == [] and len(syncs) >= 20
        assert m.resyncs == checks + 1 and m.repairs == 1
        assert listings(ns, backend=backend) == chains(kube_proxy=True)

    def test_ipv6_rules_with_ip6tables(self, ns: str, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="pyflannel")
        m = manager(ns, [PodNetwork(N6, S6)])
        assert m.ensure() is True and m.ensure() is False
        assert listings(ns, 6) == chains(6) and state(ns, "nat") == [] and state(ns, "filter") == []
        assert messages(caplog) == [
            "Current network or subnet (fd00:10:244::/56, fd00:10:244:1::/64) is not equal to previous one "
            "(::/0, ::/0), trying to recycle old iptables rules",
            "Setting up masking rules for IPv6",
            "IPv6: Changing default FORWARD chain policy to ACCEPT",
            "bootstrap done",
        ]
        in_ns(ns, "ip6tables-nft", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3")
        assert m.ensure() is True and listings(ns, 6) == chains(6) and m.repairs == 1

    @pytest.mark.parametrize("backend", ["nft", "legacy"])
    def test_nftables_mode_s_clean_up_removes_jumps_then_chains(self, ns: str, backend: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
        """Both families' FLANNEL-* chains and every jump to them go (v0.20.2's and v0.28.9's alike);
        kube-proxy's rules stay."""
        caplog.set_level(logging.INFO, logger="pyflannel")
        load(ns, backend, 10, str(N))
        manager(ns, [PodNetwork(N, S), PodNetwork(N6, S6)], backend=backend).ensure()
        in_ns(ns, binary(backend, "iptables"), "-t", "nat", "-I", "POSTROUTING", "1", "-j", "FLANNEL-POSTRTG")
        kube_proxy = state(ns, "nat", backend)
        caplog.clear()
        command = lambda name: ("ip", "netns", "exec", ns, binary(backend, name))  # noqa: E731
        assert remove_chains(command) is True
        for v in (4, 6):
            assert listings(ns, v, backend) == {
                **{key: [] for key in chains()}, ("nat", "POSTROUTING"): KUBE_PROXY_POSTROUTING if v == 4 else [],
                ("filter", "FORWARD"): KUBE_PROXY_FORWARD if v == 4 else []}
        assert state(ns, "nat", backend) == [line for line in kube_proxy if "FLANNEL" not in line]
        assert messages(caplog) == [
            "Deleted %s's chain FLANNEL-POSTRTG and 2 rule(s) jumping to it from POSTROUTING"
            % binary(backend, "iptables"),
            "Deleted %s's chain FLANNEL-FWD and 1 rule(s) jumping to it from FORWARD" % binary(backend, "iptables"),
            "Deleted %s's chain FLANNEL-POSTRTG and 1 rule(s) jumping to it from POSTROUTING"
            % binary(backend, "ip6tables"),
            "Deleted %s's chain FLANNEL-FWD and 1 rule(s) jumping to it from FORWARD" % binary(backend, "ip6tables")]
        caplog.clear()
        assert remove_chains(command) is True and messages(caplog) == []
