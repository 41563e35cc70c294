"""iptables mode: flannel v0.28.9's masquerade and forward rules, kept in place by listing our chains and
iptables-restore.

flannel (``pkg/trafficmngr/iptables``) keeps the chain FLANNEL-POSTRTG in nat, jumped to from a rule
appended to POSTROUTING (with ``--ip-masq``), and the chain FLANNEL-FWD in filter, jumped to from a rule
appended to FORWARD (with ``--iptables-forward-rules``): appended, so that they come after kube-proxy's
jumps. Every rule carries the comment ``flanneld masq`` or ``flanneld forward``; the IPv6 rules are the
same with ip6tables and ``ff00::/8``. pyflannel installs the same rules. It checks a table by listing
only the chains it writes to (see ``_FamilyRules.check``), and repairs a table in one
``iptables-restore --noflush`` transaction. That transaction also turns older layouts into v0.28.9's:
v0.20.2's (a five-rule FLANNEL-POSTRTG, jumps inserted first, before kube-proxy's) and the rules that
flanneld v0.15 to v0.19 left directly in POSTROUTING and FORWARD.

Listing chains, not saving tables, keeps the check's cost independent of other agents' rules:
iptables-nft fetches only the chain it lists from the kernel (beside kube-proxy's 50,000 nat rules,
``iptables-save -t nat`` takes 66 MB and 0.5 s of CPU, ``iptables -t nat -S FLANNEL-POSTRTG`` 2.4 MB and
1.6 ms, mostly exec). iptables-legacy has no such choice: the kernel hands it the whole table for any read.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from ipaddress import ip_network

from ..family import FAMILIES, Family, IPNetwork, family_of
from ..log import V
from . import Command, CommandError, PodNetwork, SetupError, TrafficManager, run

log = logging.getLogger(__name__)

MASQ_CHAIN = "FLANNEL-POSTRTG"
FORWARD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"
KUBE_PROXY_MARK = "0x4000/0x4000"
# The chains kube-proxy jumps to from POSTROUTING and FORWARD; flannel's jumps belong after theirs.
KUBE_PROXY_CHAINS = frozenset(("KUBE-POSTROUTING", "KUBE-PROXY-FIREWALL", "KUBE-FORWARD", "KUBE-SERVICES",
                               "KUBE-EXTERNAL-SERVICES"))
RANDOM_FULLY_VERSION = (1, 6, 2)  # go-iptables: --random-fully and iptables-restore --wait from this version
WAIT_VERSION = (1, 4, 20)  # go-iptables: iptables --wait from this version

_Body = tuple[tuple[str, ...], tuple[str, ...]]  # (match, target) of a rule, without its comment


@dataclass(frozen=True)
class Wording:
    """flannel v0.28.9's log lines that differ between the IPv4 and the IPv6 rules."""

    masking: str
    forwarding: str
    missing_iptables: str  # the log line's format when iptables, or iptables-restore, cannot be run
    missing_restore: str


WORDING = {
    4: Wording("Setting up masking rules", "Changing default FORWARD chain policy to ACCEPT",
               "Failed to setup IPTables. iptables binary was not found: %s",
               "Failed to setup IPTables. iptables-restore binary was not found: %s"),
    6: Wording("Setting up masking rules for IPv6", "IPv6: Changing default FORWARD chain policy to ACCEPT",
               "Failed to setup IP6Tables. iptables binary was not found: %s", "Failed to setup iptables-restore: %s"),
}
RECYCLING = ("Current network or subnet (%s, %s) is not equal to previous one (%s, %s), "
             "trying to recycle old iptables rules")


@dataclass(frozen=True)
class Rule:
    """One rule: its table, its chain, and its arguments as given after ``iptables -A <chain>``."""

    table: str
    chain: str
    args: tuple[str, ...]

    @property
    def spec(self) -> str:
        """The arguments as iptables-save prints them: values with a space in double quotes."""
        return " ".join('"%s"' % a if " " in a else a for a in self.args)

    @property
    def text(self) -> str:
        """The rule's line in iptables-save output. iptables-restore accepts the same line."""
        return "-A %s %s" % (self.chain, self.spec)


def _rule(table: str, chain: str, body: _Body, comment: str | None) -> Rule:
    match, target = body
    note = ("-m", "comment", "--comment", comment) if comment else ()
    return Rule(table, chain, (*match, *note, *target))


def _masquerade(random_fully: bool) -> tuple[str, ...]:
    return ("-j", "MASQUERADE", "--random-fully") if random_fully else ("-j", "MASQUERADE")


def _masq_bodies(network: IPNetwork, subnet: IPNetwork, random_fully: bool) -> list[_Body]:
    """FLANNEL-POSTRTG's rules after the mark rule, as flannel v0.21.0 and later write them."""
    n, s = str(network), str(subnet)
    masquerade = _masquerade(random_fully)
    return [
        (("-s", s, "-d", n), ("-j", "RETURN")),  # this node's pods to other pods keep their source
        (("-s", n, "-d", s), ("-j", "RETURN")),  # other pods to this node's pods
        (("!", "-s", n, "-d", s), ("-j", "RETURN")),  # the outside to this node's pods
        (("-s", n, "!", "-d", family_of(network).multicast), masquerade),  # pods to the outside, not multicast
        (("!", "-s", n, "-d", n), masquerade),  # the host, and traffic passing through, to other nodes' pods
    ]


def _old_masq_bodies(network: IPNetwork, subnet: IPNetwork, random_fully: bool) -> list[_Body]:
    """The masquerade rules of flanneld v0.15 to v0.20 (after the mark rule, which v0.15 lacked)."""
    n, s = str(network), str(subnet)
    masquerade = _masquerade(random_fully)
    return [
        (("-s", n, "-d", n), ("-j", "RETURN")),
        (("-s", n, "!", "-d", family_of(network).multicast), masquerade),
        (("!", "-s", n, "-d", s), ("-j", "RETURN")),
        (("!", "-s", n, "-d", n), masquerade),
    ]


def _forward_bodies(network: IPNetwork) -> list[_Body]:
    return [(("-s", str(network)), ("-j", "ACCEPT")), (("-d", str(network)), ("-j", "ACCEPT"))]


def masq_rules(network: IPNetwork, subnet: IPNetwork, random_fully: bool) -> list[Rule]:
    """flannel v0.28.9's masquerade rules: the POSTROUTING jump first, then FLANNEL-POSTRTG's rules in order."""
    return [
        _rule("nat", "POSTROUTING", ((), ("-j", MASQ_CHAIN)), MASQ_COMMENT),
        _rule("nat", MASQ_CHAIN, (("-m", "mark", "--mark", KUBE_PROXY_MARK), ("-j", "RETURN")), MASQ_COMMENT),
        *(_rule("nat", MASQ_CHAIN, body, MASQ_COMMENT) for body in _masq_bodies(network, subnet, random_fully)),
    ]


def forward_rules(network: IPNetwork) -> list[Rule]:
    """flannel v0.28.9's forward rules: the FORWARD jump first, then FLANNEL-FWD's rules in order."""
    return [
        _rule("filter", "FORWARD", ((), ("-j", FORWARD_CHAIN)), FORWARD_COMMENT),
        *(_rule("filter", FORWARD_CHAIN, body, FORWARD_COMMENT) for body in _forward_bodies(network)),
    ]


def legacy_masq_rules(network: IPNetwork, subnet: IPNetwork) -> list[Rule]:
    """Every masquerade rule that flanneld v0.15.x to v0.19 may have left in nat POSTROUTING (for IPv6 too,
    although only the IPv4 set had the typo: a rule that is not there is not deleted)."""
    rules = [
        _rule("nat", "POSTROUTING", body, comment)
        for random_fully in (False, True)
        for comment in (None, MASQ_COMMENT)
        for body in _old_masq_bodies(network, subnet, random_fully)
    ]
    # v0.16.2 and v0.16.3 spelled this one rule's comment "flannel masq".
    rules.append(_rule("nat", "POSTROUTING", _old_masq_bodies(network, subnet, True)[1], "flannel masq"))
    return rules


def legacy_forward_rules(network: IPNetwork) -> list[Rule]:
    """Every forward rule that flanneld v0.15.x to v0.19 may have left in filter FORWARD."""
    return [_rule("filter", "FORWARD", body, comment)
            for comment in (None, FORWARD_COMMENT) for body in _forward_bodies(network)]


def _target(line: str) -> str:
    """The chain or target a rule's ``-j`` names ('' if none)."""
    _, jump, rest = line.rpartition(" -j ")
    return rest.split(" ", 1)[0] if jump else ""


class _Table:
    """The desired state of one table: the jump into our chain, our chain's rules, and old rules to remove."""

    def __init__(self, rules: list[Rule], legacy: list[Rule]) -> None:
        jump, *own = rules
        self.name = jump.table
        self.parent = jump.chain
        self.chain = own[0].chain
        self._jump = jump
        self._own = [rule.text for rule in own]
        self._legacy = {rule.text for rule in legacy}
        self.seen: str | None = None  # our chain's view when both chains were last found right

    def repair(self, parent_listing: str, own_listing: str) -> str | None:
        """The iptables-restore input that turns the two chains, as ``iptables -S`` lists them (our chain's
        listing empty if it does not exist), into the desired state; None when they are in it already.

        The jump may sit anywhere after kube-proxy's jumps: other agents insert their rules first, and
        flannel's check does not look at its position either. One that comes before a jump of
        kube-proxy's (v0.20.2's layout) is moved to the end.
        """
        parent_prefix, own_prefix = "-A %s " % self.parent, "-A %s " % self.chain
        parent = [line for line in parent_listing.splitlines() if line.startswith(parent_prefix)]
        own = [line for line in own_listing.splitlines() if line.startswith(own_prefix)]
        jumps = [i for i, line in enumerate(parent) if line == self._jump.text]
        stale = [line for line in parent if line in self._legacy]
        early = len(jumps) == 1 and any(_target(line) in KUBE_PROXY_CHAINS for line in parent[jumps[0] + 1:])
        if len(jumps) == 1 and not early and not stale and own == self._own:
            return None
        for line in stale:
            log.info("Deleting iptables rule: %s", line[len(parent_prefix):])
        # In --noflush mode, declaring a chain creates it or flushes it.
        lines = ["*" + self.name, ":%s - [0:0]" % self.chain]
        lines += ["-D %s %s" % (self.parent, self._jump.spec)] * len(jumps)
        lines += ["-D" + line[2:] for line in stale]
        lines.append(self._jump.text)
        lines += self._own
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"


class _Binaries:
    """One family's iptables and iptables-restore, and the flags their version allows."""

    def __init__(self, family: Family, command: Command) -> None:
        self.iptables = tuple(command(family.iptables))
        self.restore = tuple(command(family.iptables + "-restore"))
        self.modern = False  # >= 1.6.2: --random-fully, iptables-restore --wait
        self.wait: tuple[str, ...] = ()  # --wait from 1.4.20 on
        self.known = False

    def learn_version(self) -> None:
        """Run ``iptables --version`` once; raises SetupError if it gives no version."""
        if self.known:
            return
        out = run(self.iptables, "--version")
        found = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
        if found is None:
            raise SetupError(self.iptables, "no iptables version found in string: %s" % out.strip())
        version = tuple(int(x) for x in found.groups())
        self.modern = version >= RANDOM_FULLY_VERSION
        self.wait = ("--wait",) if version >= WAIT_VERSION else ()
        self.known = True

    def list(self, table: str, *args: str) -> str:
        """The output of ``iptables -t table args`` listing one chain, or "" if there is no such chain.

        iptables exits 1 with nothing on stdout when the chain does not exist (iptables-nft 1.8.9 then
        calls the chain "incompatible", others say "No chain/target/match by that name").
        """
        try:
            return run(self.iptables, *self.wait, "-t", table, *args)
        except CommandError as exc:
            if exc.status == 1 and not exc.stdout.strip():
                return ""
            raise

    def apply(self, payload: str) -> None:
        """Run iptables-restore --noflush with ``payload``; raises CommandError in flanneld's words."""
        log.log(V(6), "trying to run iptables-restore < %s", payload)
        try:
            run(self.restore, "--noflush", *(("--wait",) if self.modern else ()), stdin=payload)
        except CommandError as exc:
            raise CommandError("failed to apply partial iptables-restore %s" % exc, exc.status) from exc


class _FamilyRules:
    """One family's tables: what they should hold, and whether they did once (``ready``)."""

    def __init__(self, pod: PodNetwork, ip_masq: bool, forward: bool, random_fully_disabled: bool,
                 command: Command) -> None:
        self.pod = pod
        self.ip_masq = ip_masq
        self.forward = forward
        self.random_fully_disabled = random_fully_disabled
        family = family_of(pod.network)
        self.wording = WORDING[family.version]
        self.binaries = _Binaries(family, command)
        self.tables: list[_Table] | None = None  # set once `iptables --version` has run
        self.ready = False
        self.gave_up = False

    def plan(self) -> list[_Table]:
        """The desired state of each table in use (reads the iptables version the first time)."""
        if self.tables is None:
            self.binaries.learn_version()
            pod, tables = self.pod, []
            if self.ip_masq:
                generations = {(pod.network, pod.subnet)}
                if pod.prev_network is not None and pod.prev_subnet is not None:
                    generations.add((pod.prev_network, pod.prev_subnet))
                random_fully = self.binaries.modern and not self.random_fully_disabled
                tables.append(_Table(masq_rules(pod.network, pod.subnet, random_fully),
                                     [r for n, s in generations for r in legacy_masq_rules(n, s)]))
            if self.forward:
                networks = {pod.network} | ({pod.prev_network} if pod.prev_network is not None else set())
                legacy = [r for n in networks for r in legacy_forward_rules(n)]
                tables.append(_Table(forward_rules(pod.network), legacy))
            self.tables = tables
        return self.tables

    def check(self, table: _Table) -> str | None:
        """The iptables-restore input that repairs ``table``, or None when it needs none.

        A check lists our chain with the number of rules that jump to it (``iptables -L <chain> -n -v``,
        counters aside). While that view is what it was when both chains were last found right, none of
        our rules changed: a rule of our chain would show, the jump's removal or a second copy would
        change the count. Only otherwise are both chains listed (``iptables -S``) and compared with the
        desired rules, including the search for old flanneld rules and the jump's place in the parent
        chain. The view is read first, so a change made during the comparison shows at the next check.
        """
        lines = self.binaries.list(table.name, "-L", table.chain, "-n", "-v").splitlines()
        view = "\n".join(lines[:2] + [line.split(None, 2)[-1] for line in lines[2:] if line.strip()])
        if view == table.seen:
            return None
        payload = table.repair(self.binaries.list(table.name, "-S", table.parent),
                               self.binaries.list(table.name, "-S", table.chain))
        table.seen = view if payload is None else None
        return payload


class IPTablesManager(TrafficManager):
    """Keeps flannel v0.28.9's masquerade and/or forward rules in place, for every family of the pod network.

    ``netlink`` serves the clean-up of nftables mode's tables. Only the place of a jump relative to
    kube-proxy's is checked, so other agents that insert rules at the top of POSTROUTING or FORWARD do
    not make the rules flap.
    """

    mode = "iptables"

    def _set_up(self) -> None:
        """Each family's rules, and flannel's set-up lines."""
        self._families = [_FamilyRules(pod, self.ip_masq, self.forward_rules, self.random_fully_disabled, self.command)
                          for pod in self.networks] if self.ip_masq or self.forward_rules else []
        # flannel v0.28.9's order: each family's masquerade set-up, then each family's forward set-up.
        if self.ip_masq:
            for pod in self.networks:
                prev_n = pod.prev_network or ip_network(family_of(pod.network).any_network)
                prev_s = pod.prev_subnet or ip_network(family_of(pod.network).any_network)
                if prev_n != pod.network or prev_s != pod.subnet:
                    # Our chain is rewritten whole, so the old rule set inside it goes away by itself.
                    log.info(RECYCLING, pod.network, pod.subnet, prev_n, prev_s)
                log.info(WORDING[pod.network.version].masking)
        if self.forward_rules:
            for pod in self.networks:
                # flannel's wording; like flannel, pyflannel adds ACCEPT rules and leaves the policy alone.
                log.info(WORDING[pod.network.version].forwarding)

    def ensure(self) -> bool:
        """Check each family's rules and rewrite every table that differs; True if iptables-restore ran.

        A missing binary stops that family's checks, as flannel's goroutine returns; other errors are
        retried at the next call.
        """
        wrote, ok = False, True
        for fam in self._families:
            if fam.gave_up:
                ok = False
                continue
            try:
                payloads = [p for p in map(fam.check, fam.plan()) if p is not None]
                if payloads and fam.ready:
                    log.warning("Some iptables rules are missing; deleting and recreating rules")
                for payload in payloads:
                    fam.binaries.apply(payload)
            except SetupError as exc:
                wording = fam.wording
                log.error(wording.missing_restore if exc.cmd == fam.binaries.restore else wording.missing_iptables, exc)
                fam.gave_up = True
                ok = False
                continue
            except CommandError as exc:
                log.error("Failed to ensure iptables rules: %s" if fam.ready else "Failed to bootstrap IPTables: %s",
                          exc)
                ok = False
                continue
            if not fam.ready:
                fam.ready = True
                log.info("bootstrap done")
            wrote = wrote or bool(payloads)
        self.gave_up = bool(self._families) and all(fam.gave_up for fam in self._families)
        if ok:
            self._checked(wrote)
        return wrote

    def clean_up(self) -> bool:
        """Remove flannel's nftables tables, left by nftables mode."""
        from .nftables import remove_tables
        return remove_tables(self.netlink)


def remove_chains(command: Command) -> bool:
    """Remove flannel's iptables rules of both families (left by iptables mode): the jumps to FLANNEL-POSTRTG
    and FLANNEL-FWD first, then the chains. True when none is left; errors are logged.

    The parent chain is listed only when our chain exists: no rule can jump to a chain that does not."""
    done = True
    for family in FAMILIES:
        binaries = _Binaries(family, command)
        try:
            binaries.learn_version()
            for table, parent, chain in (("nat", "POSTROUTING", MASQ_CHAIN), ("filter", "FORWARD", FORWARD_CHAIN)):
                if not binaries.list(table, "-S", chain):
                    continue
                jumps = [line for line in binaries.list(table, "-S", parent).splitlines()
                         if line.startswith("-A %s " % parent) and _target(line) == chain]
                lines = ["*" + table, *("-D" + line[2:] for line in jumps), "-F " + chain, "-X " + chain, "COMMIT"]
                binaries.apply("\n".join(lines) + "\n")
                log.info("Deleted %s's chain %s and %d rule(s) jumping to it from %s",
                         binaries.iptables[-1], chain, len(jumps), parent)
        except SetupError as exc:
            log.log(V(2), "No %s, so no iptables rules to clean up: %s", binaries.iptables[-1], exc)
        except CommandError as exc:
            log.error("Failed to clean up iptables rules: %s", exc)
            done = False
    return done
