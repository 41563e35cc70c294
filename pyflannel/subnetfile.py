"""``/run/flannel/subnet.env``: what the flannel CNI plugin reads on every pod ADD."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network


@dataclass(frozen=True)
class SubnetEnv:
    """The values flanneld writes, in its order."""

    network: IPv4Network
    subnet: IPv4Network
    mtu: int
    ipmasq: bool

    def render(self) -> str:
        """The file's text, byte for byte as flanneld writes it."""
        first = IPv4Interface((int(self.subnet.network_address) + 1, self.subnet.prefixlen))
        return ("FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=%s\nFLANNEL_MTU=%d\nFLANNEL_IPMASQ=%s\n"
                % (self.network, first, self.mtu, "true" if self.ipmasq else "false"))


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


def read_previous(path: str) -> tuple[IPv4Network | None, IPv4Network | None]:
    """FLANNEL_NETWORK and FLANNEL_SUBNET (masked) from an existing file; None where missing or unreadable."""
    try:
        values = read(path) or {}
    except OSError:
        return None, None

    def cidr(key: str) -> IPv4Network | None:
        try:
            return IPv4Network(values[key].strip(), strict=False)
        except (KeyError, ValueError):
            return None

    return cidr("FLANNEL_NETWORK"), cidr("FLANNEL_SUBNET")


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
