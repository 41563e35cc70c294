"""nftables mode (``"EnableNFTables": true``): flannel v0.28.9's tables, chains and rules, kept in place.

flannel (``pkg/trafficmngr/nftables``) always creates both tables, ``ip flannel-ipv4`` and ``ip6
flannel-ipv6``; in the table of each family of the pod network it adds the chain ``postrtg`` (nat,
postrouting, priority srcnat) with six masquerade rules when ``--ip-masq`` is on, and the chain
``forward`` (filter, forward, priority filter) with two accept rules when ``--iptables-forward-rules``
is on. Tables and chains carry flannel's comments. ``fully-random`` is left out when an ``nft --check``
of a throw-away rule that uses it fails, or with ``--ip-masq-fully-random-disable``.

pyflannel writes the same objects, so ``nft list ruleset`` shows flannel's text, but checks them every
``--iptables-resync`` seconds and puts back what someone flushed, deleted or changed (flannel writes
them once). A check reads only flannel's tables, over netlink (see ``nfnetlink``), and compares them with
what it read right after its last write. A repair rewrites a table's chains in one ``nft -f -``
transaction (``flush table``, then each chain with its rules in its block); a missing table is created
over netlink first, and one whose chains are not flannel's (a chain of another definition, one too
many, or out of order) is deleted and created again.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..family import IPV4, IPV6, Family, IPNetwork
from ..log import V
from ..netlink import NetlinkError, Packed, parse_attrs
from . import CommandError, PodNetwork, SetupError, TrafficManager, run
from .nfnetlink import (
    NFTA_CHAIN_HANDLE,
    NFTA_CHAIN_HOOK,
    NFTA_CHAIN_POLICY,
    NFTA_CHAIN_TYPE,
    NFTA_CHAIN_USERDATA,
    NFTA_HOOK_HOOKNUM,
    NFTA_HOOK_PRIORITY,
    NFTA_RULE_CHAIN,
    NFTA_TABLE_USE,
    NfTables,
    attrs,
    comment,
    delete_table,
    new_table,
)

log = logging.getLogger(__name__)

KUBE_PROXY_MARK = "0x4000"
MASQ_COMMENT = "chain to manage traffic masquerading by flannel"
FORWARD_COMMENT = "chain to accept flannel traffic"
NF_ACCEPT = 1
NF_INET_FORWARD, NF_INET_POST_ROUTING = 2, 4
# flannel's probe for fully-random: a masquerade rule in a chain that is checked, never committed.
FULLY_RANDOM_PROBE = ("add table ip flannel-ipv4\n"
                      "add chain ip flannel-ipv4 masqueradeTest { type nat hook postrouting priority 100 ; "
                      "ip saddr != 127.0.0.1 masquerade fully-random ; }\n")


@dataclass(frozen=True)
class FlannelTable:
    """One of flannel's two tables: its IP family (whose ``af`` is the table's netlink family), nft's name
    of that family (also the keyword of its address matches), and the table's name."""

    ip: Family
    family: str  # "ip" or "ip6"
    name: str

    @property
    def comment(self) -> str:
        return "rules for " + self.name


TABLES = (FlannelTable(IPV4, "ip", "flannel-ipv4"), FlannelTable(IPV6, "ip6", "flannel-ipv6"))


@dataclass(frozen=True)
class Chain:
    """A base chain of flannel's, with its rules as nft writes them after ``add rule <family> <table> <chain>``."""

    name: str
    type: str
    hook: str
    hooknum: int
    priority: int
    comment: str
    rules: tuple[str, ...]

    def command(self, table: FlannelTable) -> str:
        """The ``add chain`` command that creates the chain with its rules (they are added to an existing one)."""
        body = ["type %s hook %s priority %d" % (self.type, self.hook, self.priority), 'comment "%s"' % self.comment,
                *self.rules]
        return "add chain %s %s %s { %s ; }" % (table.family, table.name, self.name, " ; ".join(body))

    def matches(self, chain: bytes) -> bool:
        """True if ``chain`` (a chain's netlink message body) has this chain's type, hook, priority, policy
        accept and comment, so that writing this chain's rules into it gives flannel's chain."""
        a = attrs(chain)
        hook = parse_attrs(a.get(NFTA_CHAIN_HOOK, b""), 0, len(a.get(NFTA_CHAIN_HOOK, b"")))
        return (a.get(NFTA_CHAIN_TYPE) == self.type.encode() + b"\0"
                and hook.get(NFTA_HOOK_HOOKNUM) == struct.pack(">I", self.hooknum)
                and hook.get(NFTA_HOOK_PRIORITY) == struct.pack(">i", self.priority)
                and a.get(NFTA_CHAIN_POLICY) == struct.pack(">I", NF_ACCEPT)
                and comment(a.get(NFTA_CHAIN_USERDATA, b"")) == self.comment)


def masq_chain(table: FlannelTable, network: IPNetwork, subnet: IPNetwork, fully_random: bool) -> Chain:
    """flannel v0.28.9's ``postrtg`` chain: the kube-proxy mark's exemption, three returns, two masquerades."""
    m, n, s = table.family, network, subnet
    masquerade = "masquerade fully-random" if fully_random else "masquerade"
    return Chain("postrtg", "nat", "postrouting", NF_INET_POST_ROUTING, 100, MASQ_COMMENT, (
        "meta mark %s return" % KUBE_PROXY_MARK,
        "%s saddr %s %s daddr %s return" % (m, s, m, n),  # this node's pods to other pods keep their source
        "%s saddr %s %s daddr %s return" % (m, n, m, s),  # other pods to this node's pods
        "%s saddr != %s %s daddr %s return" % (m, s, m, n),  # anything else to pods (flannel's nft text)
        "%s saddr %s %s daddr != %s %s" % (m, n, m, table.ip.multicast, masquerade),  # pods to the outside
        "%s saddr != %s %s daddr %s %s" % (m, n, m, n, masquerade),  # never reached: the rule above returns
    ))


def forward_chain(table: FlannelTable, network: IPNetwork) -> Chain:
    """flannel v0.28.9's ``forward`` chain: accept what comes from or goes to the pod network."""
    m = table.family
    return Chain("forward", "filter", "forward", NF_INET_FORWARD, 0, FORWARD_COMMENT,
                 ("%s saddr %s accept" % (m, network), "%s daddr %s accept" % (m, network)))


@dataclass
class _Table:
    """One of flannel's tables: the chains it should hold, and what was read right after it was last written."""

    spec: FlannelTable
    chains: list[Chain]
    seen: _State | None = None


_State = tuple[bytes | None, tuple[bytes | None, ...], tuple[bytes, ...]]  # table, its chains, its rules


class NFTablesManager(TrafficManager):
    """Keeps flannel v0.28.9's nftables tables in place, for every family of the pod network."""

    mode = "nftables"

    def _set_up(self) -> None:
        """The pod network by family, and flannel's set-up lines; the tables are planned at the first check."""
        self.fully_random: bool | None = False if self.random_fully_disabled else None  # None: not probed yet
        self._pods: dict[int, PodNetwork] = {pod.network.version: pod for pod in self.networks}
        self._tables: list[_Table] | None = None
        self._nf: NfTables | None = None
        for spec in TABLES:
            if self.ip_masq and spec.ip.version in self._pods:
                log.info("nftables: setting up masking rules (ipv%d)", spec.ip.version)
        for spec in TABLES:
            if self.forward_rules and spec.ip.version in self._pods:
                log.info("Changing default FORWARD chain policy to ACCEPT%s", " (ipv6)" if spec.ip.version == 6 else "")

    def _plan(self) -> list[_Table]:
        """Both tables and the chains each should hold (probes nft for fully-random the first time)."""
        if self._tables is None:
            if self.ip_masq and self.fully_random is None:
                try:
                    run(self.command("nft"), "--check", "-f", "-", stdin=FULLY_RANDOM_PROBE)
                    self.fully_random = True
                except CommandError as exc:
                    log.warning("nftables: random fully unsupported")
                    log.log(V(2), "nft --check of a fully-random masquerade: %s", exc)
                    self.fully_random = False
            tables = []
            for spec in TABLES:
                pod = self._pods.get(spec.ip.version)
                chains = []
                if pod is not None and self.ip_masq:
                    chains.append(masq_chain(spec, pod.network, pod.subnet, bool(self.fully_random)))
                if pod is not None and self.forward_rules:
                    chains.append(forward_chain(spec, pod.network))
                tables.append(_Table(spec, chains))
            self._tables = tables
        return self._tables

    def ensure(self) -> bool:
        """Check both tables and rewrite those that differ; True if something was written.

        A missing nft binary stops the checks; other errors are retried at the next call.
        """
        try:
            tables = self._plan()
            if self._nf is None:
                self._nf = self.netlink()
            stale = []
            for table in tables:
                state = self._read(self._nf, table)
                if state != table.seen:
                    stale.append((table, state))
            if stale:
                self._write(self._nf, stale)
        except SetupError as exc:
            log.error('no nftables support: %s (nftables mode needs the nft binary; "EnableNFTables": false '
                      "selects iptables mode)", exc)
            self.gave_up = True
            return False
        except (CommandError, NetlinkError) as exc:
            if self.ready:
                log.error("Failed to ensure nftables rules: %s", exc)
            elif self.ip_masq:
                log.error("Failed to setup masq rules, nftables: couldn't setup masq rules: %s", exc)
            else:
                log.error("nftables: couldn't setup forward rules: %s", exc)
            self._close()
            return False
        except BaseException:
            self._close()
            raise
        self._checked(bool(stale))
        return bool(stale)

    @staticmethod
    def _read(nf: NfTables, table: _Table) -> _State:
        """The table, each of its desired chains (None where missing), and all its rules."""
        spec = table.spec
        found = nf.table(spec.ip.af, spec.name)
        if found is None:
            return None, (), ()
        return (found, tuple(nf.chain(spec.ip.af, spec.name, c.name) for c in table.chains),
                tuple(nf.rules(spec.ip.af, spec.name)))

    def _write(self, nf: NfTables, stale: list[tuple[_Table, _State]]) -> None:
        """Rewrite each stale table: its structure over netlink if needed, then its chains in one nft transaction."""
        if self.ready:
            log.warning("Some nftables rules are missing; deleting and recreating rules")
        structure: list[Packed] = []
        commands: list[str] = []
        for table, (found, chains, _) in stale:
            spec = table.spec
            if found is None:
                structure.append(new_table(spec.ip.af, spec.name, spec.comment))
            elif not _reusable(table, found, chains):
                log.info("nftables: table %s %s holds chains that are not flannel's; creating it again",
                         spec.family, spec.name)
                structure += [delete_table(spec.ip.af, spec.name), new_table(spec.ip.af, spec.name, spec.comment)]
            if table.chains:
                commands.append("flush table %s %s" % (spec.family, spec.name))
                commands += [chain.command(spec) for chain in table.chains]
        if structure:
            nf.commit(structure)
        if commands:
            payload = "\n".join(commands) + "\n"
            log.log(V(6), "trying to run nft -f - < %s", payload)
            run(self.command("nft"), "-f", "-", stdin=payload)
        for table, _ in stale:
            state = self._read(nf, table)
            _verify(table, state)
            table.seen = state

    def _close(self) -> None:
        if self._nf is not None:
            self._nf.close()
            self._nf = None

    def clean_up(self) -> bool:
        """Remove flannel's iptables chains of both families, left by iptables mode."""
        from .iptables import remove_chains
        return remove_chains(self.command)


def _reusable(table: _Table, found: bytes, chains: tuple[bytes | None, ...]) -> bool:
    """True if the table holds nothing but flannel's chains, as a prefix of them in order: its chains can then
    be rewritten in one transaction, and the missing ones added after them in their order."""
    present = [(c, body) for c, body in zip(table.chains, chains) if body is not None]
    handles = [attrs(body).get(NFTA_CHAIN_HANDLE, b"") for _, body in present]
    return (attrs(found).get(NFTA_TABLE_USE) == struct.pack(">I", len(present))
            and [c for c, _ in present] == table.chains[:len(present)]
            and handles == sorted(handles)
            and all(c.matches(body) for c, body in present))


def _verify(table: _Table, state: _State) -> None:
    """Raise CommandError unless ``state``, read right after a write, holds every chain and rule written."""
    found, chains, rules = state
    counts: dict[bytes, int] = {}
    for rule in rules:
        name = attrs(rule).get(NFTA_RULE_CHAIN, b"")
        counts[name] = counts.get(name, 0) + 1
    want = {c.name.encode() + b"\0": len(c.rules) for c in table.chains}
    if found is None or None in chains or counts != want:
        raise CommandError("table %s %s does not hold the chains and rules just written"
                           % (table.spec.family, table.spec.name))


def remove_tables(netlink: Callable[[], NfTables]) -> bool:
    """Remove flannel's nftables tables (left by nftables mode). True when none is left, or when nftables
    cannot be read at all; write errors are logged and the clean-up is tried again."""
    try:
        nf = netlink()
    except OSError as exc:
        log.log(V(2), "No netfilter netlink, so no nftables rules to clean up: %s", exc)
        return True
    try:
        try:
            found = [spec for spec in TABLES if nf.table(spec.ip.af, spec.name) is not None]
        except OSError as exc:
            log.log(V(2), "nftables cannot be read, so there are no nftables rules to clean up: %s", exc)
            return True
        if found:
            nf.commit([delete_table(spec.ip.af, spec.name) for spec in found])
            for spec in found:
                log.info("Deleted nftables table %s %s", spec.family, spec.name)
    except OSError as exc:
        log.error("Failed to clean up nftables rules: %s", exc)
        return False
    finally:
        nf.close()
    return True
