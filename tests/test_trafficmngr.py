"""The traffic manager's log lines, table-driven: flannel v0.28.9's wording of the lines admins grep for
(spec §8), at start-up in both modes and when nftables mode fails."""

from __future__ import annotations

import logging
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from pyflannel.trafficmngr import PodNetwork, new
from pyflannel.trafficmngr.nfnetlink import NfTables
from pyflannel.trafficmngr.nftables import NFTablesManager
from tests.conftest import needs_netns
from tools.netcluster import in_netns

I, W, E = logging.INFO, logging.WARNING, logging.ERROR
V4 = PodNetwork(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"),
                IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"))
V6 = PodNetwork(IPv6Network("fd00:10:244::/56"), IPv6Network("fd00:10:244:1::/64"))
MOVED = PodNetwork(V4.network, V4.subnet, V4.network, IPv4Network("10.244.7.0/24"))
IPTABLES = [(I, "Cleaning-up unused traffic manager rules"), (I, "Cleaning-up nftables rules..."),
            (I, "Starting flannel in iptables mode...")]
NFTABLES = [(I, "Cleaning-up unused traffic manager rules"), (I, "Cleaning-up iptables rules..."),
            (I, "Starting flannel in nftables mode...")]
RECYCLE_V6 = ("Current network or subnet (fd00:10:244::/56, fd00:10:244:1::/64) is not equal to previous one "
              "(::/0, ::/0), trying to recycle old iptables rules")


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records]


@pytest.mark.parametrize(("nftables", "networks", "ip_masq", "forward", "lines"), [
    (False, [V4], True, True, [*IPTABLES, (I, "Setting up masking rules"),
                               (I, "Changing default FORWARD chain policy to ACCEPT")]),
    (False, [MOVED], True, False, [*IPTABLES, (I, "Current network or subnet (10.244.0.0/16, 10.244.1.0/24) is not "
                                               "equal to previous one (10.244.0.0/16, 10.244.7.0/24), trying to "
                                               "recycle old iptables rules"), (I, "Setting up masking rules")]),
    (False, [V4, V6], True, True, [*IPTABLES, (I, "Setting up masking rules"), (I, RECYCLE_V6),
                                   (I, "Setting up masking rules for IPv6"),
                                   (I, "Changing default FORWARD chain policy to ACCEPT"),
                                   (I, "IPv6: Changing default FORWARD chain policy to ACCEPT")]),
    (False, [V6], False, False, IPTABLES),
    (True, [V4, V6], True, True, [*NFTABLES, (I, "nftables: setting up masking rules (ipv4)"),
                                  (I, "nftables: setting up masking rules (ipv6)"),
                                  (I, "Changing default FORWARD chain policy to ACCEPT"),
                                  (I, "Changing default FORWARD chain policy to ACCEPT (ipv6)")]),
    (True, [V6], True, False, [*NFTABLES, (I, "nftables: setting up masking rules (ipv6)")]),
    (True, [V4], False, True, [*NFTABLES, (I, "Changing default FORWARD chain policy to ACCEPT")]),
], ids=["iptables", "iptables-recycle", "iptables-dual", "iptables-nothing", "nftables-dual", "nftables-v6-masq",
        "nftables-forward"])
def test_start_up_lines(caplog: pytest.LogCaptureFixture, nftables: bool, networks: list[PodNetwork], ip_masq: bool,
                        forward: bool, lines: list[tuple[int, str]]) -> None:
    caplog.set_level(logging.INFO, logger="pyflannel")
    manager = new(nftables, networks, ip_masq, forward, False, 5)
    assert manager.mode == ("nftables" if nftables else "iptables")
    assert records(caplog) == lines


@pytest.fixture
def ns() -> Iterator[str]:
    name = "pftest-tm-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


FAILING_NFT = ('#!/bin/sh\nif [ -e "$0.fails" ] && [ "$1" = -f ]; then echo "Error: boom" >&2; exit 1; fi\n'
               'exec nft "$@"\n')
NFT_ERROR = "unable to run nft (, Error: boom): exit status 1"


@needs_netns
@pytest.mark.netns
@pytest.mark.parametrize(("ip_masq", "ready", "line"), [
    (True, False, (E, "Failed to setup masq rules, nftables: couldn't setup masq rules: " + NFT_ERROR)),
    (False, False, (E, "nftables: couldn't setup forward rules: " + NFT_ERROR)),
    (True, True, (E, "Failed to ensure nftables rules: " + NFT_ERROR)),
], ids=["masq-at-start", "forward-at-start", "later"])
def test_nftables_failure_lines(ns: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, ip_masq: bool,
                                ready: bool, line: tuple[int, str]) -> None:
    fake = tmp_path / "nft"
    fake.write_text(FAILING_NFT)
    fake.chmod(0o755)
    m = NFTablesManager([V4], ip_masq, True, False, 5, command=lambda name: ("ip", "netns", "exec", ns, str(fake)),
                        netlink=lambda: in_netns(ns, NfTables))
    if ready:
        assert m.ensure() is True
        subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "ruleset"], check=True)
    (tmp_path / "nft.fails").touch()
    caplog.clear()
    assert m.ensure() is False and m.ready is ready
    assert records(caplog)[-1] == line
