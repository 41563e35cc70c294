"""Datapath probes: whether the overlay really carries traffic to the other nodes.

Every node answers a small TCP and UDP echo (port ``--datapath-probe-port``) on its *probe address*
in its pod subnet (:func:`probe_address`): in IPv4 the subnet's network address (``10.244.1.0``),
which ``flannel.<VNI>`` has with vxlan and host-gw puts on ``lo``; in IPv6 the subnet's middle
address (``fd00:10:244:1:8000::``), put on ``lo``. Every
``--datapath-probe-interval`` it probes a sample of SAMPLE other nodes per family, rotating through
every node whose kernel entries are programmed, at their probe address and from its own, so that
request and answer take the path pod traffic takes both ways: ``flannel.<VNI>`` and the VXLAN
packets between the nodes (or DirectRouting's route), or host-gw's routes over the L2 network.

A probe of a peer is a TCP connection that echoes a token (its handshake time is the round-trip
time measured: the peer's kernel answers it, so a busy peer does not skew it), a small UDP datagram,
and one as large as the device's MTU with DF set. What got through tells apart an unreachable peer,
the VXLAN checksum-offload bug (UDP passes, TCP fails; see ``checksum``), a path that loses
full-size packets (MTU), and a peer with no responder (its kernel resets the connection: the path
works). A problem is declared after CONFIRM rounds in a row (a failing peer is probed again in the
next round), with one log line; the per-peer state kept is that of failing peers and the last
RECENT results, so memory does not grow with the cluster. ``/probes`` on the health server serves it
as JSON to local clients, for ``pyflannel check``.

The responder is reachable from pods, so it is bounded: it answers only datagrams and connections
that carry the probe's magic, from addresses inside the Network, never with more bytes than it got,
at most UDP_RATE datagrams and TCP_RATE connections a second (beyond that the kernel's queues drop
the rest, which costs nothing), and holds at most MAX_CONNECTIONS connections of TCP_MAX bytes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import random
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from ipaddress import ip_address
from typing import Any, Protocol

from . import checksum, metrics
from .backend.vxlan import DEFAULT_PORT, VXLANNetwork
from .family import Family, IPNetwork

log = logging.getLogger(__name__)

SAMPLE = 8  # peers probed per family and round
TIMEOUT = 3.0  # seconds a probe may take
FIRST_ROUND = 1.0  # seconds after start before the first round (plus as much again at random)
CONFIRM = 2  # rounds in a row a peer fails before its problem is declared
RECENT = 64  # results kept per family for ``pyflannel check``
MAGIC = b"pyflprb1"
PROBE = len(MAGIC) + 8  # the magic and a token: the size of the TCP and the small UDP probe
MAX_DATAGRAM = 9216  # a jumbo frame's payload; larger datagrams are dropped unanswered
TCP_MAX = 64  # bytes read from a connection
UDP_RATE, UDP_BURST = 50.0, 100.0  # datagrams answered a second, and in a burst
TCP_RATE, TCP_BURST = 20.0, 40.0  # connections accepted a second, and in a burst
MAX_CONNECTIONS = 16
BATCH = 16  # datagrams or connections taken from one socket per wake-up
IDLE_WAKE = 1.0  # seconds between looks at the stop event when nothing else is due
PROBE_RCVBUF = 1 << 14  # bytes the responder's UDP socket queues (the kernel doubles it, and drops beyond): a
# flood's backlog is read within a second at UDP_RATE, so probes behind it are answered in time
IP_FREEBIND = 15  # Linux; binds before the address exists (a device being re-created)
IP_MTU_DISCOVER, IPV6_MTU_DISCOVER, PMTUDISC_PROBE = 10, 23, 3  # DF set, the path-MTU cache ignored
SIOCGIFMTU = 0x8921
TCP_INFO_SIZE, TCPI_RTT = 104, 68  # struct tcp_info: its size as read, and where tcpi_rtt (microseconds) is
HEADERS = {4: 28, 6: 48}  # IP and UDP header bytes per IP version
LO = "lo"

OK, NO_RESPONDER, UNREACHABLE, TCP, FULL_SIZE, UDP = "ok", "no responder", "unreachable", "tcp", "full-size", "udp"
# Problems said once per family for all the peers that show them: their metric label, their name in the log.
PARTIAL = {TCP: ("tcp", "TCP"), FULL_SIZE: ("full_size", "full-size"), UDP: ("udp", "UDP")}


class Peers(Protocol):
    """A backend's network as the prober sees it (``VXLANNetwork``, ``HostGWNetwork``)."""

    device_ok: bool

    @property
    def applied(self) -> Mapping[str, Any]:
        """Node name -> the entry programmed for it (with ``dst``, its pod subnet, and ``public_ip``)."""


@dataclass(frozen=True)
class Path:
    """One family's datapath as probed: this node's probe address and the device probes leave by."""

    family: Family
    peers: Peers
    address: str  # the probe address: this node's pod subnet's network address
    network: IPNetwork  # the Network: the responder answers only addresses in it
    device: str  # flannel.<VNI>, or host-gw's external interface
    vxlan: bool
    tunnel_port: int  # the VXLAN UDP port (0 for host-gw)
    on_lo: bool  # the probe address is put on lo (else the VXLAN device has it)


def probe_address(subnet: IPNetwork) -> str:
    """The address a node with this pod subnet answers probes on: in IPv4 the network address (the VXLAN
    device's); in IPv6 the middle one, since the network address is the subnet-router anycast address
    of the pods' bridge, which the kernel refuses TCP to, and the CNI plugin gives pods the lowest ones."""
    if subnet.version == 4 or subnet.num_addresses < 2:
        return str(subnet.network_address)
    return str(subnet.network_address + subnet.num_addresses // 2)


def path(family: Family, backend: Any, subnet: IPNetwork) -> Path:
    """The Path of a family's backend (``VXLANNetwork`` or ``HostGWNetwork``) and this node's subnet."""
    vxlan = isinstance(backend, VXLANNetwork)
    device = backend.name if vxlan else backend.ext.name
    port = (backend.cfg.port or DEFAULT_PORT) if vxlan else 0
    return Path(family, backend, probe_address(subnet), backend.network, device, vxlan, port,
                on_lo=not vxlan or family.version == 6)


@dataclass(slots=True)
class Result:
    """One probe of a peer: what got through."""

    name: str
    address: str
    via: str  # the peer's public IP: where its VXLAN packets (or host-gw's route) go
    when: float  # time.time() of the probe
    tcp: str = "timeout"  # "ok", "refused" (reset: no responder), or why it failed
    rtt: float | None = None  # seconds of the TCP handshake (or of the reset)
    udp: bool = False
    full_size: bool | None = False  # None when none was sent (no MTU known, or the send failed)
    size: int = 0  # the full-size datagram's IP packet size
    detail: str = ""

    @property
    def outcome(self) -> str:
        """OK, NO_RESPONDER, UNREACHABLE, TCP, FULL_SIZE or UDP."""
        if self.tcp == "refused":
            return NO_RESPONDER
        if self.tcp == "ok":
            return UDP if not self.udp else FULL_SIZE if self.full_size is False else OK
        return TCP if self.udp else UNREACHABLE

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "via": self.via, "when": round(self.when, 3),
                "outcome": self.outcome, "tcp": self.tcp, "rtt": self.rtt, "udp": self.udp,
                "full_size": self.full_size, "size": self.size, "detail": self.detail}


@dataclass(slots=True)
class Problem:
    """A peer whose last probes failed: how, how many rounds in a row, since when."""

    kind: str
    via: str  # the peer's public IP (the backend's string)
    since: float
    count: int = 0
    detail: str = ""
    size: int = 0  # the full-size probe's packet size

    @property
    def confirmed(self) -> bool:
        return self.count >= CONFIRM


# -- what a problem means and its fix: the daemon's log lines and ``pyflannel check`` ----------------

def problem_text(kind: str, family: str, device: str, vxlan: bool, tunnel_port: int, port: int, size: int,
                 peers: str, offload: bool | None = None) -> tuple[str, str]:
    """The headline and the fix of a problem seen through ``device`` with ``peers`` (names, or one
    peer "name (address, via ip)"). ``offload``: the device's tx checksum offload, where known."""
    if kind == UNREACHABLE:
        head = "%s peer %s is unreachable through %s: no answer to TCP or UDP probes" % (family, peers, device)
        if vxlan:
            return head, ("allow UDP %d (VXLAN) between the nodes' addresses in every firewall and security group, "
                          "and check pyflannel on that node (pyflannel check there)" % tunnel_port)
        return head, ("host-gw needs the network between the nodes to carry pod addresses: turn off the "
                      "source/destination check of the nodes' interfaces (clouds) or route the pod subnets there, "
                      "or use the vxlan backend")
    if kind == TCP:
        head = "%s TCP probes through %s fail while UDP passes, to %s" % (family, device, peers)
        if not vxlan:
            return head, "something between the nodes drops TCP (a firewall or security group): allow TCP between " \
                         "the pod subnets"
        if offload is False:
            return head + " (tx checksum offload is off on %s, so not the offload bug)" % device, \
                "something between the nodes drops TCP inside VXLAN (a firewall that inspects it): allow it"
        return head + ": the VXLAN checksum-offload bug (pings work, TCP stalls)", checksum_fix(device)
    if kind == FULL_SIZE:
        head = "%s full-size packets (%d bytes, DF) through %s are lost while small ones pass, to %s: the network " \
               "between the nodes carries less than %s's MTU" % (family, size, device, peers, device)
        if vxlan:
            return head, ('set "MTU" in net-conf.json\'s Backend to the largest packet the network carries between '
                          "the nodes (%s gets it less the VXLAN headers), restart pyflannel, then recreate the pods"
                          % device)
        return head, "lower %s's MTU to what the network carries, on every node, then restart pyflannel and " \
                     "recreate the pods" % device
    return "%s UDP probes through %s are lost while TCP passes, to %s" % (family, device, peers), \
        "a firewall drops UDP between the nodes' pod addresses (port %d): allow it" % port


def checksum_fix(device: str) -> str:
    """How to turn the checksum offload of ``device`` off."""
    return ("ethtool -K %s tx-checksum-ip-generic off on every node, or --vxlan-checksum-offload=auto (turns it "
            "off when this is seen) or off" % device)


# The fix when the checksum errors are seen with the offload off here: the bug may be another node's.
OFFLOAD_OFF_FIX = "turn the offload off on every node (--vxlan-checksum-offload=off), and check the network between them"


def offload_off(tx: Iterable[bool | None]) -> bool:
    """Whether the VXLAN devices' tx checksum offload (None: unknown) is known to be off: off on some, on on none."""
    states = list(tx)
    return False in states and not any(states)


# -- the responder ------------------------------------------------------------------------------------

class _Bucket:
    """A token bucket: ``rate`` a second, at most ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = time.monotonic()

    def refill(self, now: float) -> bool:
        """Add what accrued since the last call; True if a token is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens >= 1.0

    def wait(self) -> float:
        """Seconds until a token is there."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


def _bound(af: int, kind: int, address: str, port: int) -> socket.socket:
    """A non-blocking socket bound to ``address`` (which need not exist yet: IP_FREEBIND)."""
    sock = socket.socket(af, kind)
    try:
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if af == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, PMTUDISC_PROBE)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, PMTUDISC_PROBE)
        if kind == socket.SOCK_STREAM and port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Responder:
    """The echo of one family's probe address: UDP and TCP on (address, port), served from the
    prober's selector."""

    def __init__(self, sel: selectors.BaseSelector, path: Path, port: int) -> None:
        self.sel = sel
        self.path = path
        self.port = port
        self.af = path.family.af
        self.udp: socket.socket | None = None
        self.tcp: socket.socket | None = None
        self._udp_bucket = _Bucket(UDP_RATE, UDP_BURST)
        self._tcp_bucket = _Bucket(TCP_RATE, TCP_BURST)
        self._paused: dict[socket.socket, float] = {}  # socket -> time.monotonic() to read it again
        self._conns: dict[socket.socket, tuple[float, bytearray]] = {}  # in order of arrival: deadline, data
        self._buf = bytearray(MAX_DATAGRAM + 1)
        self.error = ""  # why it is not serving ('' while it is)

    def open(self) -> None:
        """Bind and listen; raises OSError (the port taken, say)."""
        udp = _bound(self.af, socket.SOCK_DGRAM, self.path.address, self.port)
        try:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PROBE_RCVBUF)
            tcp = _bound(self.af, socket.SOCK_STREAM, self.path.address, self.port)
        except OSError:
            udp.close()
            raise
        tcp.listen(MAX_CONNECTIONS)
        self.udp, self.tcp = udp, tcp
        self.sel.register(udp, selectors.EVENT_READ, self._on_udp)
        self.sel.register(tcp, selectors.EVENT_READ, self._on_accept)
        self.error = ""

    def close(self) -> None:
        for sock in [s for s in (self.udp, self.tcp) if s is not None] + list(self._conns):
            if sock not in self._paused:
                self.sel.unregister(sock)
            sock.close()
        self._conns.clear()
        self._paused.clear()
        self.udp = self.tcp = None

    def next_wake(self) -> float:
        """The time.monotonic() at which :meth:`tick` has something to do (inf if nothing)."""
        times = list(self._paused.values()) + [deadline for deadline, _ in self._conns.values()]
        return min(times, default=float("inf"))

    def tick(self, now: float) -> None:
        """Read paused sockets again once their bucket refilled; drop connections past their deadline."""
        for sock, when in list(self._paused.items()):
            if when <= now:
                del self._paused[sock]
                self.sel.register(sock, selectors.EVENT_READ, self._on_udp if sock is self.udp else self._on_accept)
        for conn in [c for c, (deadline, _) in self._conns.items() if deadline <= now]:
            self._drop(conn)

    def _pause(self, sock: socket.socket, bucket: _Bucket, now: float) -> None:
        """Stop reading ``sock`` until its bucket has a token: meanwhile the kernel queues or drops."""
        self.sel.unregister(sock)
        self._paused[sock] = now + bucket.wait()

    def _from_network(self, addr: Any) -> bool:
        try:
            return ip_address(addr[0].partition("%")[0]) in self.path.network
        except ValueError:
            return False

    def _on_udp(self, mask: int) -> None:
        assert self.udp is not None
        now = time.monotonic()
        for _ in range(BATCH):
            if not self._udp_bucket.refill(now):
                self._pause(self.udp, self._udp_bucket, now)
                return
            try:
                n, addr = self.udp.recvfrom_into(self._buf, 0, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an error queued on the socket (an ICMP message): read on
            self._udp_bucket.tokens -= 1
            if PROBE <= n <= MAX_DATAGRAM and self._buf[:len(MAGIC)] == MAGIC and self._from_network(addr):
                try:
                    self.udp.sendto(memoryview(self._buf)[:n], addr)  # the same bytes: never more than asked
                except OSError:
                    pass

    def _on_accept(self, mask: int) -> None:
        assert self.tcp is not None
        now = time.monotonic()
        for _ in range(BATCH):
            if not self._tcp_bucket.refill(now):
                self._pause(self.tcp, self._tcp_bucket, now)
                return
            try:
                conn, addr = self.tcp.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # the connection was reset before it was accepted, or out of descriptors
            self._tcp_bucket.tokens -= 1
            if not self._from_network(addr):
                conn.close()
                continue
            if len(self._conns) >= MAX_CONNECTIONS:
                self._drop(next(iter(self._conns)))  # the oldest is the likeliest to be stuck
            conn.setblocking(False)
            self._conns[conn] = (now + TIMEOUT, bytearray())
            self.sel.register(conn, selectors.EVENT_READ, partial(self._on_conn, conn))

    def _on_conn(self, conn: socket.socket, mask: int) -> None:
        data = self._conns[conn][1]
        try:
            chunk = conn.recv(TCP_MAX - len(data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        data += chunk
        if chunk and len(data) < PROBE:
            return
        if len(data) >= PROBE and data[:len(MAGIC)] == MAGIC:
            try:
                conn.send(data)  # at most TCP_MAX bytes into an empty send buffer: never blocks
            except OSError:
                pass
        self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        del self._conns[conn]
        self.sel.unregister(conn)
        conn.close()


# -- one family's probes of a round ----------------------------------------------------------------------

class Round:
    """Probes sent to some peers of one family, their answers read from the selector.

    ``targets``: (name, probe address, public IP) of each peer. ``mtu``: the device's MTU, the size
    of the full-size datagram's packet (0: none is sent)."""

    def __init__(self, sel: selectors.BaseSelector, path: Path, port: int, targets: list[tuple[str, str, str]],
                 mtu: int, timeout: float = TIMEOUT) -> None:
        self.sel = sel
        self.port = port
        self.deadline = time.monotonic() + timeout
        self.results = [Result(name, address, via, time.time(), full_size=False if mtu else None, size=mtu)
                        for name, address, via in targets]
        self._tokens: dict[bytes, tuple[Result, bool, int]] = {}  # token -> its result, full size?, length
        self._tcp: dict[socket.socket, tuple[Result, float, bytes, bytearray]] = {}  # started, sent, echoed
        self._udp = _bound(path.family.af, socket.SOCK_DGRAM, path.address, 0)
        sel.register(self._udp, selectors.EVENT_READ, self._on_udp)
        af = path.family.af
        for r in self.results:
            self._send(r, False, PROBE)
            if mtu:
                self._send(r, True, mtu - HEADERS[path.family.version])
            try:
                sock = _bound(af, socket.SOCK_STREAM, path.address, 0)
            except OSError as exc:
                r.tcp = os.strerror(exc.errno or 0).lower()
                continue
            token = MAGIC + random.randbytes(8)
            self._tcp[sock] = (r, time.monotonic(), token, bytearray())
            code = sock.connect_ex((r.address, port))
            if code in (0, errno.EINPROGRESS):
                sel.register(sock, selectors.EVENT_WRITE, partial(self._on_tcp, sock))
            else:
                self._tcp_done(sock, os.strerror(code).lower())

    @property
    def done(self) -> bool:
        """Every answer is in, or the time is up."""
        return (not self._tokens and not self._tcp) or time.monotonic() >= self.deadline

    def _send(self, r: Result, full: bool, length: int) -> None:
        token = random.randbytes(8)
        data = (MAGIC + token).ljust(length, b"\0")
        try:
            self._udp.sendto(data, (r.address, self.port))
        except OSError as exc:
            why = os.strerror(exc.errno or 0).lower()
            if full:
                r.full_size = None
                r.detail = "the full-size datagram could not be sent: %s" % why
            else:
                r.detail = "the UDP probe could not be sent: %s" % why
            return
        self._tokens[token] = (r, full, length)

    def _on_udp(self, mask: int) -> None:
        for _ in range(BATCH):
            try:
                data, addr = self._udp.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            found = self._tokens.get(data[len(MAGIC):PROBE]) if data[:len(MAGIC)] == MAGIC else None
            if found is None or found[0].address != addr[0] or len(data) != found[2]:
                continue
            del self._tokens[data[len(MAGIC):PROBE]]
            r, full, _ = found
            if full:
                r.full_size = True
            else:
                r.udp = True

    def _on_tcp(self, sock: socket.socket, mask: int) -> None:
        r, started, token, echoed = self._tcp[sock]
        if r.rtt is None:  # the connection completed, or failed
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                if code == errno.ECONNREFUSED:  # a reset came back through the overlay
                    r.rtt = time.monotonic() - started
                self._tcp_done(sock, "refused" if code == errno.ECONNREFUSED else os.strerror(code).lower())
                return
            r.rtt = _handshake_rtt(sock) or time.monotonic() - started
            try:
                sock.send(token)
            except OSError as exc:
                self._tcp_done(sock, os.strerror(exc.errno or 0).lower())
                return
            self.sel.modify(sock, selectors.EVENT_READ, partial(self._on_tcp, sock))
            return
        try:
            chunk = sock.recv(PROBE - len(echoed))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._tcp_done(sock, os.strerror(exc.errno or 0).lower())
            return
        echoed += chunk
        if not chunk:
            self._tcp_done(sock, "closed without an echo")
        elif len(echoed) == PROBE:
            self._tcp_done(sock, "ok" if echoed == token else "a wrong echo")

    def _tcp_done(self, sock: socket.socket, outcome: str) -> None:
        r = self._tcp.pop(sock)[0]
        r.tcp = outcome
        try:
            self.sel.unregister(sock)
        except KeyError:
            pass
        sock.close()

    def finish(self) -> list[Result]:
        """Close the sockets; the results (what has not answered failed)."""
        for sock in list(self._tcp):
            r = self._tcp[sock][0]
            self._tcp_done(sock, "connected, but no echo" if r.rtt is not None else "timeout")
        self.sel.unregister(self._udp)
        self._udp.close()
        self._tokens.clear()
        return self.results


def _handshake_rtt(sock: socket.socket) -> float | None:
    """The round-trip time the kernel measured on a connection's handshake (``tcpi_rtt``; with TCP
    timestamps a retransmitted SYN does not count), or None."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    except OSError:
        return None
    micros = int.from_bytes(info[TCPI_RTT:TCPI_RTT + 4], sys.byteorder) if len(info) >= TCPI_RTT + 4 else 0
    return micros / 1e6 if micros else None


def device_mtu(device: str) -> int:
    """The MTU of ``device`` (SIOCGIFMTU); raises OSError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        answer = fcntl.ioctl(sock.fileno(), SIOCGIFMTU, struct.pack("16si12x", device.encode(), 0))
    return int(struct.unpack("16si12x", answer)[1])


def is_local(address: str, af: int) -> bool:
    """Whether ``address`` is one of this network namespace's."""
    try:
        with socket.socket(af, socket.SOCK_DGRAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


# -- the prober: the daemon's worker ---------------------------------------------------------------------

@dataclass
class _FamilyState:
    """What one family's probes found."""

    queue: list[str] = field(default_factory=list)  # the peers of this cycle not probed yet, popped from the end
    cycle: int = 0  # peers in the current cycle
    problems: dict[str, Problem] = field(default_factory=dict)  # peers whose last probe failed
    recent: deque[Result] = field(default_factory=lambda: deque(maxlen=RECENT))
    announced: set[str] = field(default_factory=set)  # the PARTIAL problems said in the log, until they go
    last_round: float = 0.0
    mtu: int = 0
    skipped: str = ""  # why the last round probed nothing ('' if it did)


class Prober:
    """The datapath probes of every family (port 0: none), the responder, and the checksum-offload keeper.

    ``offload`` is ``--vxlan-checksum-offload``: "off" turns the VXLAN devices' tx checksum offload
    off now and whenever a device comes back with it on; "auto" does so once the bug is seen; "on"
    leaves it."""

    def __init__(self, paths: list[Path], port: int, interval: float, offload: str, sample: int = SAMPLE,
                 timeout: float = TIMEOUT, proc: str = "/proc") -> None:
        self.paths = paths
        self.port = port
        self.interval = interval
        self.offload = offload
        self.sample = sample
        self.timeout = timeout
        self.proc = proc
        self._lock = threading.Lock()  # the state, between the worker and /probes
        self._states = {p.family: _FamilyState() for p in paths}
        self._devices = [p.device for p in paths if p.vxlan]
        self._tx: dict[str, bool | None] = {d: None for d in self._devices}  # tx checksum offload, as last read
        self._keep_off = offload == "off"
        self._turned_off: set[str] = set()  # devices whose offload this process turned off
        self._errors = checksum.ErrorWatch()
        self._bug = ""  # the checksum-offload bug's evidence, as last logged ('' while not seen)
        self._auto = ""  # the evidence on which "auto" turned the offload off, and when
        self._lo: set[str] = set()  # probe addresses put on lo
        self._nl: Any = None
        self.responders: dict[Family, Responder] = {}
        self._keep_offload()
        for p in paths:
            if port and p.on_lo:
                self._ready(p)  # the probe address is there by the time the node is ready

    # -- the worker ------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Answer probes and probe a sample of peers every interval until ``stop`` is set."""
        sel = selectors.DefaultSelector()
        rounds: list[tuple[Path, Round]] = []
        try:
            if self.port:
                self.responders = {p.family: Responder(sel, p, self.port) for p in self.paths}
                self._serve()
            next_round = time.monotonic() + FIRST_ROUND * (1 + random.random())
            while not stop.is_set():
                now = time.monotonic()
                if rounds and all(r.done for _, r in rounds):
                    self._finish([(p, r.finish()) for p, r in rounds])
                    rounds = []
                if not rounds and now >= next_round:
                    next_round = now + self.interval * random.uniform(0.9, 1.1)  # nodes drift apart
                    rounds = self._begin(sel)
                    if not rounds:
                        self._finish([])
                wake = min([next_round, now + IDLE_WAKE] + [r.deadline for _, r in rounds] +
                           [x.next_wake() for x in self.responders.values()])
                for key, mask in sel.select(max(0.0, wake - time.monotonic())):
                    key.data(mask)
                now = time.monotonic()
                for responder in self.responders.values():
                    responder.tick(now)
        finally:
            for _, r in rounds:
                r.finish()
            for responder in self.responders.values():
                responder.close()
            sel.close()
            if self._nl is not None:
                self._nl.close()
                self._nl = None

    def _serve(self) -> None:
        """Open the responders that are not serving; say why once when one cannot."""
        for responder in self.responders.values():
            if responder.udp is not None:
                continue
            try:
                responder.open()
            except OSError as exc:
                why = os.strerror(exc.errno or 0).lower() if exc.errno else str(exc)
                if why != responder.error:
                    log.error("Failed to answer datapath probes on %s port %d: %s; the other nodes see this one as "
                              "unreachable until it can (another program holds the port: give every node another "
                              "--datapath-probe-port)", responder.path.address, self.port, why)
                responder.error = why

    def _begin(self, sel: selectors.BaseSelector) -> list[tuple[Path, Round]]:
        """Start a round: every family's sample, where the datapath is up."""
        if not self.port:
            return []
        self._serve()
        with self._lock:
            return self._sample_all(sel)

    def _sample_all(self, sel: selectors.BaseSelector) -> list[tuple[Path, Round]]:
        rounds = []
        for p in self.paths:
            state = self._states[p.family]
            state.skipped = self._ready(p)
            if state.skipped:
                continue
            try:
                state.mtu = device_mtu(p.device)
            except OSError:
                state.mtu = 0
            targets = self._sample(p, state)
            if not targets:
                continue
            try:
                rounds.append((p, Round(sel, p, self.port, targets, state.mtu, self.timeout)))
            except OSError as exc:
                state.skipped = "cannot send from %s: %s" % (p.address, exc)
        return rounds

    def _ready(self, p: Path) -> str:
        """Why ``p`` cannot be probed now ('' if it can); puts host-gw's probe address on lo."""
        if not p.peers.device_ok:
            return "%s is down or missing" % p.device
        if is_local(p.address, p.family.af):
            return ""
        if not p.on_lo:
            return "%s lacks its address %s" % (p.device, p.address)
        return self._add_to_lo(p)

    def _add_to_lo(self, p: Path) -> str:
        """Give lo the probe address; '' when done."""
        from ._pyroute2 import ifaddrmsg
        from .netlink import CREATE, RTM_NEWADDR, Netlink, request

        bits = p.family.bits
        try:
            if self._nl is None:
                self._nl = Netlink()
            self._nl.call(request(ifaddrmsg, RTM_NEWADDR, CREATE, fields={
                "family": p.family.af, "prefixlen": bits, "index": socket.if_nametoindex(LO)},
                attrs=[("IFA_LOCAL", p.address), ("IFA_ADDRESS", p.address)]))
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return ""
            why = "cannot add %s/%d to lo: %s" % (p.address, bits, os.strerror(exc.errno or 0).lower())
            if why != self._states[p.family].skipped:
                log.error("Failed to set up the datapath probes: %s; this node answers no probe, and does not probe, "
                          "in %s", why, p.family)
            return why
        log.info("Added the datapath probe address %s/%d to lo%s (the other nodes probe it through their route to "
                 "this node's pods)", p.address, bits, " again" if p.address in self._lo else "")
        self._lo.add(p.address)
        return ""

    def _sample(self, p: Path, state: _FamilyState) -> list[tuple[str, str, str]]:
        """This round's peers: failing ones first (up to half), then the next of the rotation."""
        applied = p.peers.applied
        names: list[str] = []
        for name in list(state.problems):
            if name not in applied:
                del state.problems[name]  # its node went
            elif len(names) < max(1, self.sample // 2):
                names.append(name)
                state.problems[name] = state.problems.pop(name)  # to the end: the others come first next time
        refilled = False
        while len(names) < self.sample:
            if not state.queue:
                if refilled:
                    break
                state.queue = list(applied)
                random.shuffle(state.queue)  # every node in another order: no peer gets every node's probes at once
                state.cycle = len(state.queue)
                refilled = True
                if not state.queue:
                    break
            name = state.queue.pop()
            if name in applied and name not in names:
                names.append(name)
        return [(name, _address(p, name), applied[name].public_ip) for name in names]

    # -- after a round -------------------------------------------------------------------------------------

    def _finish(self, done: list[tuple[Path, list[Result]]]) -> None:
        """Record a round's results, count them, and say what changed."""
        now = time.time()
        with self._lock:
            for p, results in done:
                state = self._states[p.family]
                for r in results:
                    self._record(p, state, r)
            for p in self.paths:
                state = self._states[p.family]
                state.last_round = now
                self._announce(p, state)
                confirmed = [x.kind for x in state.problems.values() if x.confirmed]
                metrics.PROBE_PEERS_UNREACHABLE.labels(p.family.name).set(confirmed.count(UNREACHABLE))
                for kind, (label, _) in PARTIAL.items():
                    metrics.PROBE_PEERS_DEGRADED.labels(p.family.name, label).set(confirmed.count(kind))
            self._judge_checksum()
            self._keep_offload()

    def _record(self, p: Path, state: _FamilyState, r: Result) -> None:
        family = p.family.name
        kind = r.outcome
        state.recent.append(r)
        if r.rtt is not None:
            metrics.PROBE_RTT.labels(family).observe(r.rtt)
        metrics.PROBES.labels(family, "tcp").inc()
        if kind != NO_RESPONDER:  # a peer without a responder answers no datagram: that is no failure
            if r.tcp != "ok":
                metrics.PROBE_FAILURES.labels(family, "tcp").inc()
            for protocol, ok in (("udp", r.udp), ("udp_full_size", r.full_size)):
                if ok is not None:  # sent
                    metrics.PROBES.labels(family, protocol).inc()
                    if not ok:
                        metrics.PROBE_FAILURES.labels(family, protocol).inc()
        old = state.problems.get(r.name)
        if old is not None and old.confirmed and old.kind == UNREACHABLE and kind != UNREACHABLE:
            log.info("%s peer %s (%s) is reachable again through %s (round trip %s)", family, r.name, r.address,
                     p.device, "%.2f ms" % (r.rtt * 1000) if r.rtt is not None else "not measured")
        if kind in (OK, NO_RESPONDER):
            state.problems.pop(r.name, None)
            return
        if old is None or old.kind != kind:
            old = state.problems[r.name] = Problem(kind, r.via, r.when, size=r.size)
        old.count += 1
        # interned: at 5,000 failing peers one string for all
        old.detail = sys.intern("TCP %s, UDP %s, full size %s%s" % (
            r.tcp, "ok" if r.udp else "lost", {True: "ok", False: "lost", None: "not sent"}[r.full_size],
            "; " + r.detail if r.detail else ""))
        if old.count == CONFIRM and kind == UNREACHABLE:
            head, fix = problem_text(kind, family, p.device, p.vxlan, p.tunnel_port, self.port, r.size,
                                     "%s (%s, via %s)" % (r.name, r.address, r.via))
            log.warning("%s (%d rounds in a row); pods here cannot reach its pods; fix: %s", head, CONFIRM, fix)

    def _announce(self, p: Path, state: _FamilyState) -> None:
        """One line when some peers start to show a PARTIAL problem, one when none does any more.
        (TCP through a VXLAN device is the checksum-offload bug's: :meth:`_judge_checksum` says it.)"""
        for kind, (_, said) in PARTIAL.items():
            if kind == TCP and p.vxlan:
                continue
            found = {n: x for n, x in state.problems.items() if x.kind == kind and x.confirmed}
            if found and kind not in state.announced:
                size = max(x.size for x in found.values())
                head, fix = problem_text(kind, p.family.name, p.device, p.vxlan, p.tunnel_port, self.port, size,
                                         _names(list(found)))
                log.warning("%s; fix: %s", head, fix)
                state.announced.add(kind)
            elif not found and kind in state.announced:
                log.info("%s %s probes through %s pass again", p.family.name, said, p.device)
                state.announced.discard(kind)

    def _judge_checksum(self) -> None:
        """Look for the checksum-offload bug: TCP probes through a VXLAN device fail while UDP passes,
        or the kernel's UDP checksum errors rise with VXLAN traffic. Say it once, with the fix; with
        "auto", turn the offload off (the bug must then be seen anew to be said again)."""
        if not self._devices:
            return
        evidence = []
        for p in self.paths:
            names = [n for n, x in self._states[p.family].problems.items() if x.kind == TCP and x.confirmed]
            if p.vxlan and names:
                evidence.append("%s TCP probes through %s fail while UDP passes, to %s" % (
                    p.family.name, p.device, _names(names)))
        if self._errors.update(checksum.udp_checksum_errors(self.proc), checksum.device_packets(self._devices,
                                                                                                  self.proc)):
            evidence.append("the kernel counted %d UDP checksum errors (Udp InCsumErrors) in the last %d rounds while "
                            "%s carried traffic" % (self._errors.new_errors, self._errors.rising,
                                                    " and ".join(self._devices)))
        found = "; ".join(evidence)
        metrics.CHECKSUM_BUG.set(int(bool(found)))
        if found and not self._bug:
            devices = " and ".join(self._devices)
            offloading = any(self._tx.values())
            if self.offload == "auto" and offloading:
                self._keep_off = True
                self._keep_offload(quiet=True)
                self._auto = "%s (%s)" % (found, time.strftime("%Y-%m-%d %H:%M:%S"))
                log.warning("%s: the VXLAN checksum-offload bug; turned off tx checksum offload on %s (as ethtool -K "
                            "%s tx-checksum-ip-generic off; --vxlan-checksum-offload=auto)", found, devices,
                            self._devices[0])
                self._errors.reset()
                for state in self._states.values():
                    for x in state.problems.values():
                        if x.kind == TCP:
                            x.count = 0  # to be confirmed again with the offload off
                metrics.CHECKSUM_BUG.set(0)
                return
            if offload_off(self._tx.values()):
                log.warning("%s, with tx checksum offload off on %s: if every node has it off, something between "
                            "the nodes drops or corrupts VXLAN packets; fix: %s", found, devices, OFFLOAD_OFF_FIX)
            else:
                log.warning("%s: the VXLAN checksum-offload bug (pings work, TCP stalls); fix: %s", found,
                            checksum_fix(self._devices[0]))
        elif not found and self._bug:
            log.info("The VXLAN checksum errors are no longer seen")
        self._bug = found

    def _keep_offload(self, quiet: bool = False) -> None:
        """Read each VXLAN device's tx checksum offload, and turn it off where it should be (saying so
        unless ``quiet``)."""
        for device in self._devices:
            try:
                on = checksum.tx_checksum(device)
                if on and self._keep_off:
                    checksum.set_tx_checksum(device, False)
                    if not quiet:
                        log.info("Turned off tx checksum offload on %s (as ethtool -K %s tx-checksum-ip-generic off, "
                                 "--vxlan-checksum-offload=%s)%s", device, device, self.offload,
                                 " again: the device was re-created" if device in self._turned_off else "")
                    self._turned_off.add(device)
                    on = checksum.tx_checksum(device)
            except OSError:
                on = None  # the device is gone for now: the backend restores it
            self._tx[device] = on
            if on is not None:
                metrics.TX_CHECKSUM_OFFLOAD.labels(device).set(int(on))

    # -- /probes -------------------------------------------------------------------------------------------

    def report(self) -> bytes:
        """The state as JSON, for ``pyflannel check``."""
        with self._lock:
            families = []
            for p in self.paths:
                state = self._states[p.family]
                responder = self.responders.get(p.family)
                families.append({
                    "family": p.family.name, "device": p.device, "address": p.address, "vxlan": p.vxlan,
                    "tunnel_port": p.tunnel_port, "mtu": state.mtu, "peers": len(p.peers.applied),
                    "responder": responder.error if responder is not None else "",
                    "last_round": round(state.last_round, 3), "skipped": state.skipped,
                    "cycle": state.cycle, "cycle_left": len(state.queue),
                    "problems": [{"name": n, "address": _address(p, n), "via": x.via, "problem": x.kind,
                                  "rounds": x.count, "confirmed": x.confirmed, "since": round(x.since, 3),
                                  "size": x.size, "detail": x.detail} for n, x in state.problems.items()],
                    "recent": [r.as_dict() for r in state.recent],
                })
            return json.dumps({
                "now": round(time.time(), 3), "port": self.port, "interval": self.interval, "sample": self.sample,
                "timeout": self.timeout, "confirm": CONFIRM,
                "checksum_offload": {"mode": self.offload, "devices": dict(self._tx), "bug": self._bug,
                                     "turned_off_on": self._auto},
                "families": families,
            }).encode()


def _address(p: Path, name: str) -> str:
    """A peer's probe address, from its programmed entry ('' once it is gone)."""
    entry = p.peers.applied.get(name)
    return probe_address(p.family.network(entry.dst)) if entry is not None else ""


def _names(names: list[str], most: int = 3) -> str:
    """'a, b, c and 4 more' ."""
    shown = ", ".join(names[:most])
    return shown + (" and %d more" % (len(names) - most) if len(names) > most else "")

