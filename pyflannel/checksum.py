"""The VXLAN checksum-offload bug: the kernel counters that show it, and the device's tx checksum offload.

With tx checksum offload on ``flannel.<VNI>`` some kernels and NIC drivers (vmxnet3, and NAT of the
VXLAN packets with ``--random-fully``) send packets whose checksum is wrong: the receiving kernel
drops them and counts them in ``Udp: InCsumErrors``. Pings and small UDP get through, TCP stalls
(connections that take 63 s are its best-known sign). flannel documents the workaround
``ethtool -K flannel.1 tx-checksum-ip-generic off``; this module does the same with the ethtool
ioctl (no ethtool binary), and reads the counters from ``/proc/net/snmp`` and ``/proc/net/snmp6`` of
the node's network namespace.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x16  # struct ethtool_value: get (data 1 if any tx checksum feature is on) ...
ETHTOOL_STXCSUM = 0x17  # ... and set every tx checksum feature, as `ethtool -K <dev> tx on|off`
_IFREQ = struct.Struct("16sP")  # ifr_name, ifr_data: a pointer to the ethtool command
_IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux
CONFIRM = 2  # intervals in a row with new checksum errors before they are taken for the bug


def _ethtool_value(device: str, cmd: int, data: int = 0) -> int:
    """Run an ethtool command that takes a ``struct ethtool_value``; its data after the call."""
    value = array.array("I", [cmd, data])
    ifreq = _IFREQ.pack(device.encode(), value.buffer_info()[0]).ljust(_IFREQ_SIZE, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    return value[1]


def tx_checksum(device: str) -> bool:
    """Whether tx checksum offload is on for ``device``; raises OSError (ENODEV when it is gone)."""
    return bool(_ethtool_value(device, ETHTOOL_GTXCSUM))


def set_tx_checksum(device: str, on: bool) -> None:
    """Turn ``device``'s tx checksum offload on or off (for a VXLAN device: ``tx-checksum-ip-generic``,
    its only one; the segmentation offloads that need it follow, as with ethtool). Raises OSError."""
    _ethtool_value(device, ETHTOOL_STXCSUM, int(on))


def udp_checksum_errors(proc: str = "/proc") -> int:
    """The UDP datagrams this network namespace dropped for a bad checksum: ``Udp: InCsumErrors`` plus
    ``Udp6InCsumErrors`` (0 for a file or counter that is missing)."""
    total = 0
    try:
        with open(os.path.join(proc, "net/snmp")) as f:
            names: list[str] = []
            for line in f:
                if not line.startswith("Udp: "):
                    continue
                fields = line.split()[1:]
                if not names:
                    names = fields
                elif "InCsumErrors" in names and len(fields) == len(names):
                    total += int(fields[names.index("InCsumErrors")])
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(proc, "net/snmp6")) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == "Udp6InCsumErrors":
                    total += int(value)
    except (OSError, ValueError):
        pass
    return total


def device_packets(devices: list[str], proc: str = "/proc") -> int:
    """The packets ``devices`` received and sent, from ``/proc/net/dev`` (those missing count 0)."""
    total = 0
    try:
        with open(os.path.join(proc, "net/dev")) as f:
            for line in f:
                name, sep, rest = line.partition(":")
                if sep and name.strip() in devices:
                    fields = rest.split()
                    total += int(fields[1]) + int(fields[9])
    except (OSError, ValueError, IndexError):
        pass
    return total


class ErrorWatch:
    """Whether the checksum error counter rises with VXLAN traffic.

    Fed once an interval with the counter and the VXLAN devices' packet count, it says the bug is
    seen once the counter rose in CONFIRM intervals in a row, each while the devices carried traffic
    (a stray bad datagram, or errors while the overlay is idle, say nothing)."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None
        self.rising = 0  # intervals in a row in which the errors rose with traffic
        self.new_errors = 0  # errors counted in those intervals

    def update(self, errors: int, packets: int) -> bool:
        """Take this interval's readings; True while the errors rise with traffic."""
        last, self._last = self._last, (errors, packets)
        if last is None:
            return False
        if errors > last[0] and packets > last[1]:
            self.rising += 1
            self.new_errors += errors - last[0]
        else:
            self.reset()
        return self.rising >= CONFIRM

    def reset(self) -> None:
        """Start over (after the offload was turned off): the bug must be seen anew."""
        self.rising = 0
        self.new_errors = 0
