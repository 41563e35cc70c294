"""``/run/flannel/subnet.env``: what the flannel CNI plugin reads on every pod ADD."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

from .family import FAMILIES, Family, IPNetwork

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubnetEnv:
    """The values flanneld writes: each enabled family's Network and this node's subnet of it, the MTU
    and whether pods are masqueraded."""

    networks: dict[Family, tuple[IPNetwork, IPNetwork]]  # family -> (Network, subnet)
    mtu: int
    ipmasq: bool

    def render(self) -> str:
        """The file's text, byte for byte as flanneld writes it: the IPv4 pair, the IPv6 pair, MTU, IPMASQ."""
        lines = []
        for family in FAMILIES:
            if family in self.networks:
                network, subnet = self.networks[family]
                lines.append("%s=%s\n" % (family.env_network, network))
                # the subnet's first address, with its prefix ("10.244.1.1/24", "fd00:10:244:1::1/64")
                lines.append("%s=%s/%d\n" % (family.env_subnet, subnet.network_address + 1, subnet.prefixlen))
        lines.append("FLANNEL_MTU=%d\nFLANNEL_IPMASQ=%s\n" % (self.mtu, "true" if self.ipmasq else "false"))
        return "".join(lines)


def write(path: str, env: SubnetEnv) -> None:
    """Write the file atomically: a temporary file in the same folder, then rename over the target."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(env.render())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def parse(text: str) -> dict[str, str]:
    """subnet.env's keys and values as the flannel CNI plugin reads them: ``KEY=VALUE`` lines, others ignored."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def read(path: str) -> dict[str, str] | None:
    """The parsed file, or None when it does not exist; other errors raise OSError."""
    try:
        with open(path, errors="replace") as f:
            return parse(f.read())
    except FileNotFoundError:
        return None


def read_previous(path: str, family: Family) -> tuple[IPNetwork | None, IPNetwork | None]:
    """``family``'s network and subnet (masked) from an existing file; None where missing or unreadable.

    flanneld takes a missing value as ``0.0.0.0/0`` / ``::/0``; the iptables manager does the same
    with None. A value that does not parse is logged as flanneld does.
    """
    try:
        values = read(path) or {}
    except OSError:
        return None, None

    def cidr(key: str) -> IPNetwork | None:
        if key not in values:
            return None
        try:
            return family.network(values[key].strip())
        except ValueError as exc:
            log.error("Couldn't parse previous %s from subnet file at %s: %s", key, path, exc)
            return None

    return cidr(family.env_network), cidr(family.env_subnet)


class Keeper:
    """This node's subnet.env, written at start and put back whenever it is deleted or changed.

    :meth:`check` costs one ``stat`` while the file is as it was written: it reads the file only
    when the stat differs, and writes only when the contents differ.
    """

    def __init__(self, path: str, env: SubnetEnv) -> None:
        self.path = path
        self.text = env.render()
        self.env = env
        self._stamp: tuple[int, int, int, int] | None = None  # (dev, inode, size, mtime) after our write

    def write(self) -> None:
        """Write the file; raises OSError."""
        write(self.path, self.env)
        self._stamp = self._stat()

    def check(self) -> str:
        """Write the file again if it is missing or its contents differ; why it was written ('' if it was not).

        Raises OSError when it cannot be written."""
        stamp = self._stat()
        if stamp is not None and stamp == self._stamp:
            return ""
        if stamp is None:
            why = "it was missing"
        else:
            try:
                with open(self.path, "rb") as f:
                    same = f.read() == self.text.encode()
            except OSError:
                same = False
            if same:
                self._stamp = stamp
                return ""
            why = "its contents had changed"
        self.write()
        return why

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
