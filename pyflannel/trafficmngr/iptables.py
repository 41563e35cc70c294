"""flanneld v0.20.2's masquerade and forward rules, kept in place by listing our chains and iptables-restore.

flanneld (``network/iptables.go``) keeps the chain FLANNEL-POSTRTG in nat, jumped to from the first rule
of POSTROUTING (with ``--ip-masq``), and the chain FLANNEL-FWD in filter, jumped to from the first rule
of FORWARD (with ``--iptables-forward-rules``). Every rule carries the comment ``flanneld masq`` or
``flanneld forward``; the IPv6 rules are the same with ip6tables (``Family`` holds what differs).
pyflannel installs the same rules. It checks a table by listing only the chains it writes to (see
``IPTablesManager._check``), and it repairs a table in one ``iptables-restore --noflush`` transaction.
That transaction also removes the rules that flanneld v0.15 to v0.19 left directly in POSTROUTING and
FORWARD.

Listing chains, not saving tables, keeps the check's cost independent of other agents' rules:
iptables-nft fetches only the chain it lists from the kernel (beside kube-proxy's 50,000 nat rules,
``iptables-save -t nat`` takes 66 MB and 0.5 s of CPU, ``iptables -t nat -S FLANNEL-POSTRTG`` 2.4 MB and
1.6 ms, mostly exec). iptables-legacy has no such choice: the kernel hands it the whole table for any read.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network

from .. import metrics
from ..log import V

log = logging.getLogger(__name__)

MASQ_CHAIN = "FLANNEL-POSTRTG"
FORWARD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"
KUBE_PROXY_MARK = "0x4000/0x4000"
RANDOM_FULLY_VERSION = (1, 6, 2)  # go-iptables: --random-fully and iptables-restore --wait from this version
WAIT_VERSION = (1, 4, 20)  # go-iptables: iptables --wait from this version
COMMAND_TIMEOUT = 60.0  # seconds; iptables-restore --wait may wait for the xtables lock

Network = IPv4Network | IPv6Network
_Body = tuple[tuple[str, ...], tuple[str, ...]]  # (match, target) of a rule, without its comment


@dataclass(frozen=True)
class Family:
    """What differs between the IPv4 and the IPv6 rules, and flanneld's wording of each family's log lines.

    flanneld's IPv6 rules are its IPv4 rules with ip6tables and ``ff00::/8`` for the multicast range.
    """

    iptables: str
    iptables_restore: str
    multicast: str
    any: str  # flanneld's previous network and subnet when subnet.env has none
    recycling: str  # the log line's format, given (network, subnet, previous network, previous subnet)
    masking: str
    forwarding: str
    missing_iptables: str  # the log line's format when iptables, or iptables-restore, cannot be run
    missing_restore: str


FAMILIES = {
    4: Family("iptables", "iptables-restore", "224.0.0.0/4", "0.0.0.0/0",
              "Current network or subnet (%s, %s) is not equal to previous one (%s, %s), "
              "trying to recycle old iptables rules",
              "Setting up masking rules", "Changing default FORWARD chain policy to ACCEPT",
              "Failed to setup IPTables. iptables binary was not found: %s",
              "Failed to setup IPTables. iptables-restore binary was not found: %s"),
    6: Family("ip6tables", "ip6tables-restore", "ff00::/8", "::/0",
              "Current ipv6 network or subnet (%s, %s) is not equal to previous one (%s, %s), "
              "trying to recycle old ip6tables rules",
              "Setting up masking ip6 rules", "IPv6: Changing default FORWARD chain policy to ACCEPT",
              "Failed to setup IP6Tables. iptables binary was not found: %s", "Failed to setup iptables-restore: %s"),
}


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


def _masq_bodies(network: Network, subnet: Network, random_fully: bool) -> list[_Body]:
    n, s = str(network), str(subnet)
    multicast = FAMILIES[network.version].multicast
    masquerade = ("-j", "MASQUERADE", "--random-fully") if random_fully else ("-j", "MASQUERADE")
    return [
        (("-s", n, "-d", n), ("-j", "RETURN")),  # traffic inside the overlay keeps its source
        (("-s", n, "!", "-d", multicast), masquerade),  # pods to the outside, but not multicast
        (("!", "-s", n, "-d", s), ("-j", "RETURN")),  # the outside to this node's pods
        (("!", "-s", n, "-d", n), masquerade),  # the host to other nodes' pods
    ]


def _forward_bodies(network: Network) -> list[_Body]:
    return [(("-s", str(network)), ("-j", "ACCEPT")), (("-d", str(network)), ("-j", "ACCEPT"))]


def masq_rules(network: Network, subnet: Network, random_fully: bool) -> list[Rule]:
    """flanneld v0.20.2's masquerade rules: the POSTROUTING jump first, then FLANNEL-POSTRTG's rules in order."""
    return [
        _rule("nat", "POSTROUTING", ((), ("-j", MASQ_CHAIN)), MASQ_COMMENT),
        _rule("nat", MASQ_CHAIN, (("-m", "mark", "--mark", KUBE_PROXY_MARK), ("-j", "RETURN")), MASQ_COMMENT),
        *(_rule("nat", MASQ_CHAIN, body, MASQ_COMMENT) for body in _masq_bodies(network, subnet, random_fully)),
    ]


def forward_rules(network: Network) -> list[Rule]:
    """flanneld v0.20.2's forward rules: the FORWARD jump first, then FLANNEL-FWD's rules in order."""
    return [
        _rule("filter", "FORWARD", ((), ("-j", FORWARD_CHAIN)), FORWARD_COMMENT),
        *(_rule("filter", FORWARD_CHAIN, body, FORWARD_COMMENT) for body in _forward_bodies(network)),
    ]


def legacy_masq_rules(network: Network, subnet: Network) -> list[Rule]:
    """Every masquerade rule that flanneld v0.15.x to v0.19 may have left in nat POSTROUTING (for IPv6 too,
    although only the IPv4 set had the typo: a rule that is not there is not deleted)."""
    rules = [
        _rule("nat", "POSTROUTING", body, comment)
        for random_fully in (False, True)
        for comment in (None, MASQ_COMMENT)
        for body in _masq_bodies(network, subnet, random_fully)
    ]
    # v0.16.2 and v0.16.3 spelled this one rule's comment "flannel masq".
    rules.append(_rule("nat", "POSTROUTING", _masq_bodies(network, subnet, True)[1], "flannel masq"))
    return rules


def legacy_forward_rules(network: Network) -> list[Rule]:
    """Every forward rule that flanneld v0.15.x to v0.19 may have left in filter FORWARD."""
    return [_rule("filter", "FORWARD", body, comment)
            for comment in (None, FORWARD_COMMENT) for body in _forward_bodies(network)]


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
        listing empty if it does not exist), into the desired state; None when they are in it already."""
        parent_prefix, own_prefix = "-A %s " % self.parent, "-A %s " % self.chain
        parent = [line for line in parent_listing.splitlines() if line.startswith(parent_prefix)]
        own = [line for line in own_listing.splitlines() if line.startswith(own_prefix)]
        jumps = parent.count(self._jump.text)
        stale = [line for line in parent if line in self._legacy]
        if jumps == 1 and not stale and own == self._own:
            return None
        for line in stale:
            log.info("Deleting iptables rule: %s", line[len(parent_prefix):])
        # In --noflush mode, declaring a chain creates it or flushes it.
        lines = ["*" + self.name, ":%s - [0:0]" % self.chain]
        lines += ["-D %s %s" % (self.parent, self._jump.spec)] * jumps
        lines += ["-D" + line[2:] for line in stale]
        lines.append("-I %s 1 %s" % (self.parent, self._jump.spec))
        lines += self._own
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"


class _SetupError(Exception):
    """A binary could not be run at all, or ``iptables --version`` gave no version."""

    def __init__(self, cmd: Sequence[str], err: object) -> None:
        super().__init__(err)
        self.cmd = tuple(cmd)


class _CommandError(Exception):
    """A binary ran and failed (``status`` is its exit status, negative for a signal, None if it timed out)."""

    def __init__(self, message: str, status: int | None = None, stdout: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.stdout = stdout


class IPTablesManager:
    """Keeps flanneld v0.20.2's masquerade and/or forward rules in place, as flanneld's iptables goroutines do.

    The network's family picks the rules, the log lines and, by default, the binaries (iptables or
    ip6tables); one manager keeps one family's rules. Each binary can be given as an argument-list
    prefix, to run it elsewhere, e.g. ``("ip", "netns", "exec", "ns1", "iptables")``. The position of a
    jump rule is not checked (flanneld checks only that it exists). This means other agents that insert
    rules at the top of POSTROUTING or FORWARD do not make the rules flap.
    Call ensure() and run() from one thread at a time.
    """

    def __init__(self, network: Network, subnet: Network, prev_network: Network | None,
                 prev_subnet: Network | None, ip_masq: bool, forward_rules: bool, resync_seconds: float,
                 on_repair: Callable[[], None] | None = None, iptables: Sequence[str] | None = None,
                 iptables_restore: Sequence[str] | None = None) -> None:
        self.network = network
        self.subnet = subnet
        self.prev_network = prev_network
        self.prev_subnet = prev_subnet
        self.ip_masq = ip_masq
        self.forward_rules = forward_rules
        self.resync_seconds = resync_seconds
        self.on_repair = on_repair
        self.ready = False
        self.resyncs = 0
        self.repairs = 0
        self.family = FAMILIES[network.version]
        self._iptables = tuple(iptables or (self.family.iptables,))
        self._iptables_restore = tuple(iptables_restore or (self.family.iptables_restore,))
        self._tables: list[_Table] | None = None  # set once `iptables --version` has run
        self._wait: tuple[str, ...] = ()  # also known from the version
        self._restore_flags: tuple[str, ...] = ()
        self._gave_up = False  # a binary is missing: flanneld's goroutine returns in that case
        if ip_masq:
            prev_n = prev_network or ip_network(self.family.any)
            prev_s = prev_subnet or ip_network(self.family.any)
            if prev_n != network and prev_s != subnet:
                # Our chain is rewritten whole, so the old rule set inside it goes away by itself.
                log.info(self.family.recycling, network, subnet, prev_n, prev_s)
            log.info(self.family.masking)
        if forward_rules:
            # flanneld's wording; like flanneld, pyflannel adds ACCEPT rules and leaves the policy alone.
            log.info(self.family.forwarding)

    def ensure(self) -> bool:
        """Check the rules and rewrite every table that differs; True if iptables-restore ran.

        Errors are logged, not raised. They are retried on the next call, except a missing binary:
        after that, the manager gives up, as flanneld does.
        """
        if self._gave_up:
            return False
        try:
            if self._tables is None:
                self._tables = self._plan()
            payloads = [p for p in map(self._check, self._tables) if p is not None]
            if payloads and self.ready:
                log.warning("Some iptables rules are missing; deleting and recreating rules")
            for payload in payloads:
                log.log(V(6), "trying to run iptables-restore < %s", payload)
                self._run(self._iptables_restore, *self._restore_flags, stdin=payload)
        except _SetupError as exc:
            missing = self.family.missing_restore if exc.cmd == self._iptables_restore else self.family.missing_iptables
            log.error(missing, exc)
            self._gave_up = True
            return False
        except _CommandError as exc:
            log.error("Failed to ensure iptables rules: %s" if self.ready else "Failed to bootstrap IPTables: %s", exc)
            return False
        self.resyncs += 1
        metrics.IPTABLES_RESYNCS.inc()
        if not self.ready:
            self.ready = True
            log.info("bootstrap done")
        elif payloads:
            self.repairs += 1
            metrics.IPTABLES_REPAIRS.inc()
            if self.on_repair is not None:
                self.on_repair()
        return bool(payloads)

    def run(self, stop: threading.Event) -> None:
        """ensure() now unless it already succeeded, then every resync_seconds until ``stop`` is set."""
        if not self.ready:
            self.ensure()
        while not self._gave_up and not stop.wait(self.resync_seconds):
            self.ensure()

    def _plan(self) -> list[_Table]:
        """Read the iptables version, then build the desired state of each table in use."""
        out = self._run(self._iptables, "--version")
        found = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
        if found is None:
            raise _SetupError(self._iptables, "no iptables version found in string: %s" % out.strip())
        version = tuple(int(x) for x in found.groups())
        modern = version >= RANDOM_FULLY_VERSION
        self._wait = ("--wait",) if version >= WAIT_VERSION else ()
        self._restore_flags = ("--noflush", "--wait") if modern else ("--noflush",)
        tables = []
        if self.ip_masq:
            generations = {(self.network, self.subnet)}
            if self.prev_network is not None and self.prev_subnet is not None:
                generations.add((self.prev_network, self.prev_subnet))
            tables.append(_Table(masq_rules(self.network, self.subnet, modern),
                                 [r for n, s in generations for r in legacy_masq_rules(n, s)]))
        if self.forward_rules:
            networks = {self.network}
            if self.prev_network is not None:
                networks.add(self.prev_network)
            tables.append(_Table(forward_rules(self.network), [r for n in networks for r in legacy_forward_rules(n)]))
        return tables

    def _check(self, table: _Table) -> str | None:
        """The iptables-restore input that repairs ``table``, or None when it needs none.

        A check lists our chain with the number of rules that jump to it (``iptables -L <chain> -n -v``,
        counters aside). While that view is what it was when both chains were last found right, none of
        our rules changed: a rule of our chain would show, the jump's removal or a second copy would
        change the count. Only otherwise are both chains listed (``iptables -S``) and compared with the
        desired rules, including the search for old flanneld rules in the parent chain. The view is read
        first, so a change made during the comparison shows at the next check.
        """
        lines = self._list(table.name, "-L", table.chain, "-n", "-v").splitlines()
        view = "\n".join(lines[:2] + [line.split(None, 2)[-1] for line in lines[2:]])  # rules begin with counters
        if view == table.seen:
            return None
        payload = table.repair(self._list(table.name, "-S", table.parent), self._list(table.name, "-S", table.chain))
        table.seen = view if payload is None else None
        return payload

    def _list(self, table: str, *args: str) -> str:
        """The output of ``iptables -t table args`` listing one chain, or "" if there is no such chain.

        iptables exits 1 with nothing on stdout when the chain does not exist (iptables-nft 1.8.9 then
        calls the chain "incompatible", others say "No chain/target/match by that name").
        """
        try:
            return self._run(self._iptables, *self._wait, "-t", table, *args)
        except _CommandError as exc:
            if exc.status == 1 and not exc.stdout.strip():
                return ""
            raise

    @staticmethod
    def _run(cmd: Sequence[str], *args: str, stdin: str | None = None) -> str:
        """Run ``cmd args`` and return its stdout."""
        argv = [*cmd, *args]
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        except OSError as exc:
            raise _SetupError(cmd, exc) from exc
        except subprocess.TimeoutExpired as exc:
            raise _CommandError("%s timed out after %.0fs" % (" ".join(argv), COMMAND_TIMEOUT)) from exc
        if proc.returncode != 0:
            name = os.path.basename(cmd[-1])
            err = "unable to run %s (%s, %s): exit status %d" % (
                name, proc.stdout.strip(), proc.stderr.strip(), proc.returncode)
            raise _CommandError("failed to apply partial iptables-restore " + err if stdin is not None else err,
                                proc.returncode, proc.stdout)
        return proc.stdout
