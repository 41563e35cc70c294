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


def read_previous(path: str) -> tuple[IPv4Network | None, IPv4Network | None]:
    """FLANNEL_NETWORK and FLANNEL_SUBNET (masked) from an existing file; None where missing or unreadable."""
    values: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep:
                    values[key] = value
    except OSError:
        return None, None

    def cidr(key: str) -> IPv4Network | None:
        try:
            return IPv4Network(values[key], strict=False)
        except (KeyError, ValueError):
            return None

    return cidr("FLANNEL_NETWORK"), cidr("FLANNEL_SUBNET")
