"""The traffic manager: flannel's masquerade and forward rules, in iptables mode or in nftables mode.

net-conf.json's ``EnableNFTables`` picks the mode, as in flannel v0.25 and later. Each mode is a
:class:`TrafficManager` of its own (``iptables.IPTablesManager``, ``nftables.NFTablesManager``) that
writes the rules of flannel v0.28.9, checks them every ``--iptables-resync`` seconds and puts them back
when someone removed or changed them, and removes what the other mode left on the node.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .. import metrics
from ..family import IPNetwork

if TYPE_CHECKING:
    from .nfnetlink import NfTables

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 60.0  # seconds; iptables-restore --wait may wait for the xtables lock

Command = Callable[[str], Sequence[str]]
"""The argument-list prefix that runs a binary given by name (``iptables``, ``nft``, ...)."""


def local(name: str) -> Sequence[str]:
    """The binary from the PATH (the daemon's :data:`Command`)."""
    return (name,)


def netfilter() -> NfTables:
    """A netfilter netlink socket in the process's network namespace (the daemon's, for nftables)."""
    from .nfnetlink import NfTables
    return NfTables()


@dataclass(frozen=True)
class PodNetwork:
    """One family's addresses for the rules: the Network, this node's subnet, and the network and
    subnet of the previous run (from subnet.env; None when it had none)."""

    network: IPNetwork
    subnet: IPNetwork
    prev_network: IPNetwork | None = None
    prev_subnet: IPNetwork | None = None


class SetupError(Exception):
    """A binary is not there (or may not be run): checks stop, as flanneld's goroutine returns."""

    def __init__(self, cmd: Sequence[str], err: object) -> None:
        super().__init__(err)
        self.cmd = tuple(cmd)


class CommandError(Exception):
    """A binary ran and failed (``status`` is its exit status, negative for a signal, None if it timed out)."""

    def __init__(self, message: str, status: int | None = None, stdout: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.stdout = stdout


def run(cmd: Sequence[str], *args: str, stdin: str | None = None) -> str:
    """Run ``cmd args`` (an argument list, never a shell) and return its stdout.

    Output is decoded as UTF-8 with undecodable bytes kept as surrogates: other agents' rules are
    listed byte for byte, and one Latin-1 comment among them must not stop the check. A binary that
    is missing or may not be run raises SetupError; any other OSError (no memory or process left to
    fork, a corrupt binary) is left to the worker's supervisor, which restarts the check.
    """
    argv = [*cmd, *args]
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, encoding="utf-8", errors="surrogateescape",
                              timeout=COMMAND_TIMEOUT)
    except (FileNotFoundError, PermissionError) as exc:
        raise SetupError(cmd, exc) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError("%s timed out after %.0fs" % (" ".join(argv), COMMAND_TIMEOUT)) from exc
    if proc.returncode != 0:
        raise CommandError("unable to run %s (%s, %s): exit status %d" % (
            cmd[-1].rsplit("/", 1)[-1], proc.stdout.strip(), proc.stderr.strip(), proc.returncode),
            proc.returncode, proc.stdout)
    return proc.stdout


class TrafficManager(ABC):
    """Keeps one mode's rules in place: :meth:`ensure` now and every ``resync_seconds`` in :meth:`run`.

    ``ready`` turns true once every rule was in place (for /readyz) and stays so; ``resyncs`` counts the
    checks that worked and ``repairs`` those after the first that had to rewrite rules. The other mode's
    leftovers are removed before the first check, and again before each later one until that worked.
    Call ensure() and run() from one thread at a time.
    """

    mode: ClassVar[str]  # "iptables" or "nftables", as flannel's "Starting flannel in %s mode..."

    def __init__(self, networks: Sequence[PodNetwork], ip_masq: bool, forward_rules: bool,
                 random_fully_disabled: bool, resync_seconds: float, on_repair: Callable[[], None] | None = None,
                 command: Command = local, netlink: Callable[[], NfTables] = netfilter) -> None:
        """``networks`` holds one PodNetwork per family of the pod network. ``command`` gives the argument-list
        prefix of a binary by name, to run it elsewhere (e.g. ``ip netns exec ns1 iptables-legacy``), and
        ``netlink`` opens the netfilter netlink socket, both in the node's network namespace."""
        self.networks = networks
        self.ip_masq = ip_masq
        self.forward_rules = forward_rules
        self.random_fully_disabled = random_fully_disabled
        self.resync_seconds = resync_seconds
        self.command = command
        self.netlink = netlink
        self.on_repair = on_repair
        self.ready = False
        self.resyncs = 0
        self.repairs = 0
        self.gave_up = False  # a binary is missing: the checks stop
        self._cleaned = False
        self._set_up()

    @abstractmethod
    def _set_up(self) -> None:
        """Build this mode's state from the fields above and log flannel's set-up lines (from __init__)."""

    @abstractmethod
    def ensure(self) -> bool:
        """Check the rules and rewrite what differs; True if something was written. Errors are logged."""

    @abstractmethod
    def clean_up(self) -> bool:
        """Remove the other mode's flannel rules; True when none is left (errors are logged)."""

    def run(self, stop: threading.Event) -> None:
        """Clean up and ensure() now unless that already worked, then every resync_seconds until ``stop``."""
        self._clean_up_once()
        if not self.ready:
            self.ensure()
        while not self.gave_up and not stop.wait(self.resync_seconds):
            self._clean_up_once()
            self.ensure()

    def _clean_up_once(self) -> None:
        if not self._cleaned:
            self._cleaned = self.clean_up()

    def _checked(self, wrote: bool) -> None:
        """Count a check that worked; ``wrote``: it had to write rules."""
        self.resyncs += 1
        metrics.IPTABLES_RESYNCS.inc()
        if not self.ready:
            self.ready = True
        elif wrote:
            self.repairs += 1
            metrics.IPTABLES_REPAIRS.inc()
            if self.on_repair is not None:
                self.on_repair()


def new(nftables: bool, networks: Sequence[PodNetwork], ip_masq: bool, forward_rules: bool,
        random_fully_disabled: bool, resync_seconds: float) -> TrafficManager:
    """The traffic manager of the mode net-conf.json asks for, with flannel v0.28.9's start-up lines."""
    log.info("Cleaning-up unused traffic manager rules")
    if nftables:
        log.info("Cleaning-up iptables rules...")
        log.info("Starting flannel in nftables mode...")
        from .nftables import NFTablesManager
        return NFTablesManager(networks, ip_masq, forward_rules, random_fully_disabled, resync_seconds)
    log.info("Cleaning-up nftables rules...")
    log.info("Starting flannel in iptables mode...")
    from .iptables import IPTablesManager
    return IPTablesManager(networks, ip_masq, forward_rules, random_fully_disabled, resync_seconds)
