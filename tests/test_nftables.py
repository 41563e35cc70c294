"""nftables mode: the chains' text and nft payloads, then real nftables in a fresh network namespace for each
test: flannel v0.28.9's ruleset (spec §4.2) for IPv4, IPv6 and dual-stack, repairs of every kind of damage,
a missing nft, and the clean-up that iptables mode runs."""

from __future__ import annotations

import errno
import logging
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from pyflannel.netlink import NLMSG_ERROR, NetlinkError
from pyflannel.trafficmngr import PodNetwork
from pyflannel.trafficmngr.nfnetlink import NfTables, delete_table
from pyflannel.trafficmngr.nftables import (
    FULLY_RANDOM_PROBE,
    TABLES,
    NFTablesManager,
    forward_chain,
    masq_chain,
    remove_tables,
)
from tests.conftest import needs_netns
from tools.netcluster import in_netns

N = IPv4Network("10.244.0.0/16")
S = IPv4Network("10.244.1.0/24")
N6 = IPv6Network("fd00:10:244::/56")
S6 = IPv6Network("fd00:10:244:1::/64")
V4, V6 = TABLES

# spec §4.2: `nft list ruleset` of a dual-stack node, flannel's tables only (flannel's e2e check_nftables).
SPEC_V4 = """\
table ip flannel-ipv4 {
	comment "rules for flannel-ipv4"
	chain postrtg {
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x00004000 return
		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
	}

	chain forward {
		comment "chain to accept flannel traffic"
		type filter hook forward priority filter; policy accept;
		ip saddr 10.244.0.0/16 accept
		ip daddr 10.244.0.0/16 accept
	}
}
"""
SPEC_V6 = """\
table ip6 flannel-ipv6 {
	comment "rules for flannel-ipv6"
	chain postrtg {
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x00004000 return
		ip6 saddr fd00:10:244:1::/64 ip6 daddr fd00:10:244::/56 return
		ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244:1::/64 return
		ip6 saddr != fd00:10:244:1::/64 ip6 daddr fd00:10:244::/56 return
		ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random
		ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56 masquerade fully-random
	}

	chain forward {
		comment "chain to accept flannel traffic"
		type filter hook forward priority filter; policy accept;
		ip6 saddr fd00:10:244::/56 accept
		ip6 daddr fd00:10:244::/56 accept
	}
}
"""
EMPTY_V4 = 'table ip flannel-ipv4 {\n\tcomment "rules for flannel-ipv4"\n}\n'
EMPTY_V6 = 'table ip6 flannel-ipv6 {\n\tcomment "rules for flannel-ipv6"\n}\n'
STACKS = {"v4": [PodNetwork(N, S)], "v6": [PodNetwork(N6, S6)], "dual": [PodNetwork(N, S), PodNetwork(N6, S6)]}


# -- the chains' text and the payloads ------------------------------------------------------------------


def test_masq_chain_is_flannel_s_rules() -> None:
    chain = masq_chain(V4, N, S, True)
    body = [line.strip() for line in SPEC_V4.splitlines()[5:11]]
    assert list(chain.rules) == [body[0].replace("0x00004000", "0x4000"), *body[1:]]
    assert masq_chain(V6, N6, S6, False).rules[-2:] == (
        "ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade",
        "ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56 masquerade")


def test_chain_commands_write_each_chain_with_its_rules() -> None:
    """A chain and its rules in one ``add chain`` block: nft 1.0.6 then reads only the table's chains from the
    kernel, where ``add rule`` would read every table's (see nfnetlink)."""
    assert forward_chain(V6, N6).command(V6) == (
        'add chain ip6 flannel-ipv6 forward { type filter hook forward priority 0 ; comment "chain to accept '
        'flannel traffic" ; ip6 saddr fd00:10:244::/56 accept ; ip6 daddr fd00:10:244::/56 accept ; }')
    assert masq_chain(V4, N, S, True).command(V4) == (
        'add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority 100 ; comment "chain to manage '
        'traffic masquerading by flannel" ; meta mark 0x4000 return ; ip saddr 10.244.1.0/24 ip daddr '
        "10.244.0.0/16 return ; ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return ; ip saddr != 10.244.1.0/24 "
        "ip daddr 10.244.0.0/16 return ; ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random ; "
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random ; }")
    assert FULLY_RANDOM_PROBE.splitlines()[1].endswith("ip saddr != 127.0.0.1 masquerade fully-random ; }")


def _error(seq: int, code: int) -> bytes:
    """A netlink error message (an acknowledgement when ``code`` is 0) answering sequence ``seq``."""
    return struct.pack("=IHHIIi", 20, NLMSG_ERROR, 0, seq, 0, -code)


@pytest.mark.parametrize("acks", [False, True], ids=["alone", "then-acks"])
def test_a_batch_refused_as_a_whole_fails_at_once(acks: bool) -> None:
    """The kernel answers the batch-begin message (sequence 1) when it refuses the batch as a whole: alone when
    nf_tables is missing, followed by each request's acknowledgement when the commit itself failed."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, kernel:
        kernel.send(_error(1, errno.EOPNOTSUPP) + (_error(2, 0) + _error(3, 0) if acks else b""))
        with pytest.raises(NetlinkError) as raised:
            NfTables(ours).commit([delete_table(socket.AF_INET, "flannel-ipv4"),
                                   delete_table(socket.AF_INET6, "flannel-ipv6")])
        assert raised.value.errno == errno.EOPNOTSUPP
        assert struct.unpack_from("=I", kernel.recv(1 << 16), 8) == (1,)  # the batch-begin message came first


# -- real nftables in a network namespace ------------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[str]:
    name = "pftest-nft-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=stdin, check=True, capture_output=True,
                          text=True).stdout


def table_text(ns: str, spec: object) -> str:
    res = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", spec.family, spec.name],  # type: ignore
                         capture_output=True, text=True)
    return res.stdout


def manager(ns: str, networks: list[PodNetwork] | None = None, ip_masq: bool = True, forward: bool = True,
            random_fully_disabled: bool = False, nft_binary: str = "nft", resync: float = 5) -> NFTablesManager:
    """A manager whose binaries and netfilter socket are the namespace's."""
    def command(name: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", ns, nft_binary if name == "nft" else name)

    return NFTablesManager(networks or STACKS["dual"], ip_masq, forward, random_fully_disabled, resync,
                           command=command, netlink=lambda: in_netns(ns, NfTables))


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


@needs_netns
@pytest.mark.netns
class TestInNamespace:
    @pytest.mark.parametrize(("stack", "ruleset"), [
        ("v4", SPEC_V4 + EMPTY_V6), ("v6", EMPTY_V4 + SPEC_V6), ("dual", SPEC_V4 + SPEC_V6)])
    def test_ruleset_is_flannel_s(self, ns: str, stack: str, ruleset: str) -> None:
        """Both tables always, with flannel's chains in the families of the pod network (spec §4.2)."""
        m = manager(ns, STACKS[stack])
        assert m.ensure() is True and m.ready
        assert nft(ns, "list", "ruleset") == ruleset
        assert m.ensure() is False and m.ensure() is False and (m.resyncs, m.repairs) == (3, 0)

    @pytest.mark.parametrize(("ip_masq", "forward", "disabled", "ruleset"), [
        (False, True, False, SPEC_V4.replace(SPEC_V4[SPEC_V4.index("\tchain postrtg"):SPEC_V4.index("\tchain forward")],
                                             "") + EMPTY_V6),
        (True, False, False, SPEC_V4[:SPEC_V4.index("\n\tchain forward")] + "}\n" + EMPTY_V6),
        (True, True, True, SPEC_V4.replace(" fully-random", "") + EMPTY_V6),
    ], ids=["no-ip-masq", "no-forward-rules", "fully-random-disabled"])
    def test_variations(self, ns: str, ip_masq: bool, forward: bool, disabled: bool, ruleset: str) -> None:
        assert manager(ns, STACKS["v4"], ip_masq, forward, disabled).ensure() is True
        assert nft(ns, "list", "ruleset") == ruleset

    @pytest.mark.parametrize("damage", [
        ["flush chain ip flannel-ipv4 postrtg"],
        ["delete rule ip flannel-ipv4 forward handle 9"],
        ["add rule ip flannel-ipv4 postrtg accept"],
        ["insert rule ip flannel-ipv4 postrtg ip saddr 10.244.1.0/24 return"],
        ["flush table ip flannel-ipv4"],
        ["delete table ip flannel-ipv4", "delete table ip6 flannel-ipv6"],
        ["flush ruleset"],
        ["delete chain ip flannel-ipv4 postrtg"],
        ["add chain ip flannel-ipv4 other"],
        ["chain ip flannel-ipv4 forward { policy drop ; }"],
        ["delete table ip flannel-ipv4", "add table ip flannel-ipv4", "add chain ip flannel-ipv4 postrtg "
         "{ type nat hook postrouting priority 0 ; }"],
    ], ids=["flush-chain", "delete-rule", "extra-rule", "inserted-rule", "flush-table", "delete-tables",
            "flush-ruleset", "delete-chain", "extra-chain", "policy-drop", "other-priority"])
    def test_damage_is_repaired(self, ns: str, caplog: pytest.LogCaptureFixture, damage: list[str]) -> None:
        m = manager(ns)
        m.ensure()
        for command in damage:
            nft(ns, *command.split())
        assert (table_text(ns, V4), table_text(ns, V6)) != (SPEC_V4, SPEC_V6)
        assert m.ensure() is True and m.repairs == 1
        assert (table_text(ns, V4), table_text(ns, V6)) == (SPEC_V4, SPEC_V6)
        assert "Some nftables rules are missing; deleting and recreating rules" in messages(caplog)
        assert m.ensure() is False and m.repairs == 1

    def test_a_restart_rewrites_the_chains_in_one_transaction(self, ns: str) -> None:
        manager(ns).ensure()
        nft(ns, "add", "rule", "ip", "flannel-ipv4", "forward", "accept")
        handles = nft(ns, "-a", "list", "table", "ip", "flannel-ipv4")
        assert manager(ns).ensure() is True
        assert nft(ns, "list", "ruleset") == SPEC_V4 + SPEC_V6
        after = nft(ns, "-a", "list", "table", "ip", "flannel-ipv4")
        assert [line for line in after.splitlines() if "chain" in line] == \
            [line for line in handles.splitlines() if "chain" in line]  # the same chains, refilled: no gap

    def test_beside_kube_proxy_s_table(self, ns: str) -> None:
        """kube-proxy's own table is left alone, by the writes and by the checks."""
        kube_proxy = ('table ip kube-proxy {\n\tcomment "rules for kube-proxy"\n\tchain nat-postrouting {\n'
                      "\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tjump masquerading\n\t}\n\n"
                      "\tchain masquerading {\n\t\tmeta mark & 0x00004000 == 0x00000000 return\n"
                      "\t\tmasquerade fully-random\n\t}\n}\n")
        nft(ns, "-f", "-", stdin=kube_proxy)
        m = manager(ns, STACKS["v4"])
        assert m.ensure() is True and m.ensure() is False
        nft(ns, "flush", "chain", "ip", "kube-proxy", "masquerading")
        assert m.ensure() is False
        assert nft(ns, "list", "table", "ip", "kube-proxy") == kube_proxy.replace(
            "\t\tmeta mark & 0x00004000 == 0x00000000 return\n\t\tmasquerade fully-random\n", "")
        assert table_text(ns, V4) == SPEC_V4

    def test_a_missing_nft_is_a_clear_error_and_never_ready(self, ns: str, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
        missing = str(tmp_path / "nft")  # run as the daemon runs it, without `ip netns exec`
        m = NFTablesManager(STACKS["dual"], True, True, False, 5, command=lambda name: (missing,),
                            netlink=lambda: in_netns(ns, NfTables))
        assert m.ensure() is False and not m.ready and m.gave_up
        assert messages(caplog)[-1] == (
            "no nftables support: [Errno 2] No such file or directory: '%s' (nftables mode needs the nft binary; "
            '"EnableNFTables": false selects iptables mode)' % (tmp_path / "nft"))
        assert nft(ns, "list", "ruleset") == ""

    def test_fully_random_unsupported(self, ns: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """nft --check of flannel's probe fails (an old kernel): masquerade without fully-random, as flannel."""
        fake = tmp_path / "nft"
        fake.write_text('#!/bin/sh\nif [ "$1" = --check ]; then echo "Error: Could not process rule" >&2; exit 1; fi\n'
                        'exec nft "$@"\n')
        fake.chmod(0o755)
        m = manager(ns, STACKS["v4"], nft_binary=str(fake))
        assert m.ensure() is True
        assert table_text(ns, V4) == SPEC_V4.replace(" fully-random", "")
        assert "nftables: random fully unsupported" in messages(caplog)

    def test_iptables_mode_s_clean_up_removes_both_tables(self, ns: str, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="pyflannel")
        manager(ns).ensure()
        nft(ns, "add", "table", "ip", "kube-proxy")
        netlink = lambda: in_netns(ns, NfTables)  # noqa: E731
        assert remove_tables(netlink) is True
        assert nft(ns, "list", "ruleset") == "table ip kube-proxy {\n}\n"
        assert messages(caplog)[-2:] == ["Deleted nftables table ip flannel-ipv4", "Deleted nftables table ip6 "
                                                                                     "flannel-ipv6"]
        caplog.clear()
        assert remove_tables(netlink) is True and messages(caplog) == []
