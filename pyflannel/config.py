"""net-conf.json: flannel's network configuration (flanneld v0.20.2 ``subnet/config.go``).

Keys are matched case-insensitively and unknown keys are ignored, as Go's ``encoding/json`` does.
A JSON ``null`` is treated as if the key were absent. :func:`parse` accepts everything flanneld
accepts; :func:`load`, which the daemon uses, then refuses what pyflannel does not implement
(:func:`check_supported`), naming the key.

``Networks`` and ``IPv6Networks`` are leftovers: flannel v0.20 took their first entry as the
network, v0.21 to v0.24 filled them from ClusterCIDR objects, and v0.25 removed them (v0.28.9
ignores them). pyflannel accepts one with a warning when it names the family's network and nothing
else, and refuses it, naming the key, when it would change the network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from .family import IPV4, IPV6, Family, IPNetwork

log = logging.getLogger(__name__)

__all__ = ["OVERHEAD", "SUPPORTED_BACKENDS", "Config", "ConfigError", "VXLANConfig", "check_supported",
           "default_subnet_len", "load", "network_list_warnings", "parse"]

SUPPORTED_BACKENDS = ("vxlan", "host-gw")
OVERHEAD = 50  # VXLAN over IPv4: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
MIN_MTU, MAX_MTU = 68 + OVERHEAD, 65535  # the device's MTU must be at least IPv4's minimum, 68


class ConfigError(ValueError):
    """net-conf.json could not be read, parsed or validated; the message is one line."""

    def __init__(self, message: str) -> None:
        # Values are quoted as given (flanneld's texts); a newline in one must not split the log line.
        super().__init__("".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                                 for c in message))


@dataclass(frozen=True)
class VXLANConfig:
    """The VXLAN backend's keys from ``Backend`` (``MTU`` is flannel v0.21.3's; 0 = the interface's)."""

    vni: int = 1
    port: int = 0  # 0 = the kernel's default, 8472
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False
    mtu: int = 0

    def device_mtu(self, iface_mtu: int) -> int:
        """The MTU of ``flannel.<VNI>`` and of the pods (``FLANNEL_MTU``): ``MTU`` less the VXLAN overhead.

        Without ``MTU`` the external interface's ``iface_mtu`` counts, and never more than it: the
        kernel caps the device there, and pods above the device's MTU would lose their large packets.
        """
        return min(self.mtu or iface_mtu, iface_mtu) - OVERHEAD


@dataclass(frozen=True)
class Config:
    """A parsed and validated net-conf.json.

    Outside kube mode ``subnet_len``/``subnet_min``/``subnet_max`` (and the IPv6 ones, when the
    stack is enabled) hold the derived values; in kube mode they are as given (0 / None if absent).
    ``networks`` holds the enabled families and their Network, IPv4 first: what the daemon runs.
    """

    network: IPv4Network | None
    ipv6_network: IPv6Network | None
    enable_ipv4: bool
    enable_ipv6: bool
    subnet_len: int
    subnet_min: IPv4Address | None
    subnet_max: IPv4Address | None
    ipv6_subnet_len: int
    ipv6_subnet_min: IPv6Address | None
    ipv6_subnet_max: IPv6Address | None
    backend_type: str  # lower-cased Backend.Type; "udp" when Backend is absent
    backend: dict[str, Any] = field(hash=False)  # the raw Backend object
    vxlan: VXLANConfig | None  # set when backend_type is "vxlan"
    networks: dict[Family, IPNetwork] = field(default_factory=dict, hash=False)
    network_list: tuple[IPv4Network, ...] = ()  # the leftover multi-network keys (see check_supported)
    ipv6_network_list: tuple[IPv6Network, ...] = ()
    enable_nftables: bool = False  # flannel v0.25's key: the traffic manager's nftables mode


class _FieldError(Exception):
    """A value has the wrong type or format; the message is the reason."""


def _what(value: Any) -> str:
    """A JSON value's type, with the value itself for scalars: ``string "x"``, ``number 1.5``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool " + json.dumps(value)
    if isinstance(value, (int, float)):
        return "number " + json.dumps(value)
    if isinstance(value, str):
        return "string " + json.dumps(value)
    return "array" if isinstance(value, list) else "object"


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _FieldError("expected true or false, got %s" % _what(value))
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError("expected an integer, got %s" % _what(value))
    return value


def _uint(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _FieldError("expected a non-negative integer, got %s" % _what(value))
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _FieldError("expected a string, got %s" % _what(value))
    return value


def _cidr(version: int) -> Callable[[Any], IPv4Network | IPv6Network]:
    """A decoder of a CIDR string of IP ``version`` (Go's ``net.ParseCIDR``: host bits masked)."""

    def decode(value: Any) -> IPv4Network | IPv6Network:
        text = _string(value)
        _, slash, bits = text.partition("/")
        try:
            if not slash or not (bits.isascii() and bits.isdigit()):
                raise ValueError(text)
            net = ip_network(text, strict=False)
        except ValueError:
            raise _FieldError("invalid CIDR address: %s" % text) from None
        if net.version != version:
            raise _FieldError("not an IPv%d network: %s" % (version, text))
        return net

    return decode


def _cidr_list(version: int) -> Callable[[Any], tuple[IPv4Network | IPv6Network, ...]]:
    """A decoder of a JSON array of CIDR strings of IP ``version``."""
    one = _cidr(version)

    def decode(value: Any) -> tuple[IPv4Network | IPv6Network, ...]:
        if not isinstance(value, list):
            raise _FieldError("expected an array, got %s" % _what(value))
        return tuple(one(item) for item in value)

    return decode


def _address(version: int) -> Callable[[Any], IPv4Address | IPv6Address]:
    """A decoder of an IP address of IP ``version`` (flannel's ``ParseIP4``/``ParseIP6``)."""

    def decode(value: Any) -> IPv4Address | IPv6Address:
        try:
            addr = ip_address(_string(value))
        except ValueError:
            addr = None
        if addr is None or addr.version != version:
            raise _FieldError("Invalid IP address format")
        return addr

    return decode


# JSON key -> (Config / VXLANConfig field, decoder). Keys are looked up lower-cased.
_TOP_LEVEL: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    key.lower(): (key, attr, decode) for key, attr, decode in (
        ("Network", "network", _cidr(4)),
        ("IPv6Network", "ipv6_network", _cidr(6)),
        ("EnableIPv4", "enable_ipv4", _bool),
        ("EnableIPv6", "enable_ipv6", _bool),
        ("SubnetLen", "subnet_len", _uint),
        ("SubnetMin", "subnet_min", _address(4)),
        ("SubnetMax", "subnet_max", _address(4)),
        ("IPv6SubnetLen", "ipv6_subnet_len", _uint),
        ("IPv6SubnetMin", "ipv6_subnet_min", _address(6)),
        ("IPv6SubnetMax", "ipv6_subnet_max", _address(6)),
        ("Networks", "network_list", _cidr_list(4)),
        ("IPv6Networks", "ipv6_network_list", _cidr_list(6)),
        ("EnableNFTables", "enable_nftables", _bool),
    )
}
_VXLAN_KEYS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    key.lower(): (key, attr, decode) for key, attr, decode in (
        ("VNI", "vni", _int),
        ("Port", "port", _int),
        ("GBP", "gbp", _bool),
        ("Learning", "learning", _bool),
        ("DirectRouting", "direct_routing", _bool),
        ("MTU", "mtu", _int),
    )
}


def _decode(obj: dict[str, Any], keys: dict[str, tuple[str, str, Callable[[Any], Any]]]) -> dict[str, Any]:
    """Go's ``json.Unmarshal`` into a struct: case-insensitive keys, the last one wins.

    Raises ``_FieldError("<Key>: <reason>")``.
    """
    out: dict[str, Any] = {}
    for key, value in obj.items():
        # casefold() also folds U+017F and U+212A to s and k, as Go's key matching does.
        spec = keys.get(key.casefold())
        if spec is None or value is None:
            continue
        name, attr, decode = spec
        try:
            out[attr] = decode(value)
        except _FieldError as exc:
            raise _FieldError("%s: %s" % (name, exc)) from None
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError("%s is not valid JSON" % name)


@dataclass(frozen=True)
class _Family:
    """What differs between CheckNetworkConfig's IPv4 and IPv6 halves."""

    network_key: str
    min_key: str
    max_key: str
    max_subnet_len: int
    default_subnet_len: int
    too_small: str


_V4 = _Family("Network", "SubnetMin", "SubnetMax", 30, 24,
              "network is too small. Minimum useful network prefix is /28")
_V6 = _Family("IPv6Network", "IPv6SubnetMin", "IPv6SubnetMax", 126, 64,
              "IPv6Network is too small. Minimum useful network prefix is /124")


def default_subnet_len(network: IPv4Network | IPv6Network) -> int:
    """CheckNetworkConfig's subnet length when SubnetLen is not given: 24 (IPv6: 64), or the
    network's prefix + 2 in small networks; raises ConfigError when the network is too small."""
    fam = _V4 if network.version == 4 else _V6
    if network.prefixlen > fam.max_subnet_len - 2:
        raise ConfigError(fam.too_small)
    return max(fam.default_subnet_len, network.prefixlen + 2)


def _derive(fam: _Family, net: IPv4Network | IPv6Network, subnet_len: int,
            lo: IPv4Address | IPv6Address | None,
            hi: IPv4Address | IPv6Address | None) -> tuple[int, Any, Any]:
    """CheckNetworkConfig for one family: the subnet length, SubnetMin and SubnetMax to use."""
    if subnet_len > 0:
        if subnet_len > fam.max_subnet_len:
            raise _FieldError("SubnetLen must be less than /%d" % (fam.max_subnet_len + 1))
        if subnet_len < net.prefixlen + 2:
            raise _FieldError("network must be able to accommodate at least four subnets")
    else:
        try:
            subnet_len = default_subnet_len(net)
        except ConfigError as exc:
            raise _FieldError(str(exc)) from None
    size = 1 << (net.max_prefixlen - subnet_len)
    first = net.network_address
    if lo is None or int(lo) == 0:
        lo = first + size  # the first subnet is skipped
    elif lo not in net:
        raise _FieldError("%s is not in the range of the %s" % (fam.min_key, fam.network_key))
    if hi is None or int(hi) == 0:
        hi = first + (net.num_addresses - size)
    elif hi not in net:
        raise _FieldError("%s is not in the range of the %s" % (fam.max_key, fam.network_key))
    for key, addr in ((fam.min_key, lo), (fam.max_key, hi)):
        if int(addr) % size:
            raise _FieldError("%s is not on a SubnetLen boundary: %s" % (key, addr))
    return subnet_len, lo, hi


def _is_empty(net: IPv4Network | IPv6Network | None) -> bool:
    """flannel's ``IP4Net.Empty``: absent, or ``0.0.0.0/0`` / ``::/0``."""
    return net is None or (int(net.network_address) == 0 and net.prefixlen == 0)


_LEFTOVER_HINT = " (%s is not read since flannel v0.21: name the network in %s)"


def _build(doc: Any, kube: bool) -> Config:
    """Decode and validate a parsed JSON document; raises ``_FieldError``."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise _FieldError("expected a JSON object, got %s" % _what(doc))
    values: dict[str, Any] = {
        "network": None, "ipv6_network": None, "enable_ipv4": True, "enable_ipv6": False,
        "subnet_len": 0, "subnet_min": None, "subnet_max": None,
        "ipv6_subnet_len": 0, "ipv6_subnet_min": None, "ipv6_subnet_max": None,
    }
    values.update(_decode(doc, _TOP_LEVEL))

    backend: Any = None
    for key, value in doc.items():
        if key.casefold() == "backend" and value is not None:
            backend = value
    if backend is None:
        backend, backend_type = {}, "udp"
    elif not isinstance(backend, dict):
        raise _FieldError("error decoding Backend property of config: expected a JSON object, got %s"
                          % _what(backend))
    else:
        try:
            backend_type = _decode(backend, {"type": ("Type", "type", _string)}).get("type", "").lower()
        except _FieldError as exc:
            raise _FieldError("error decoding Backend property of config: %s" % exc) from None
    vxlan = None
    if backend_type == "vxlan":
        try:
            vxlan = VXLANConfig(**_decode(backend, _VXLAN_KEYS))
        except _FieldError as exc:
            raise _FieldError("error decoding VXLAN backend config: %s" % exc) from None

    if values["enable_ipv4"]:
        if _is_empty(values["network"]):
            hint = _LEFTOVER_HINT % ("Networks", "Network") if values.get("network_list") else ""
            raise _FieldError("please define a correct Network parameter in the flannel config" + hint)
        if not kube:
            values["subnet_len"], values["subnet_min"], values["subnet_max"] = _derive(
                _V4, values["network"], values["subnet_len"], values["subnet_min"], values["subnet_max"])
    if values["enable_ipv6"]:
        if _is_empty(values["ipv6_network"]):
            hint = _LEFTOVER_HINT % ("IPv6Networks", "IPv6Network") if values.get("ipv6_network_list") else ""
            raise _FieldError("please define a correct IPv6Network parameter in the flannel config" + hint)
        if not kube:
            values["ipv6_subnet_len"], values["ipv6_subnet_min"], values["ipv6_subnet_max"] = _derive(
                _V6, values["ipv6_network"], values["ipv6_subnet_len"], values["ipv6_subnet_min"],
                values["ipv6_subnet_max"])
    if not values["enable_ipv4"] and not values["enable_ipv6"]:
        raise _FieldError("none defined stack")
    if backend_type not in SUPPORTED_BACKENDS:
        raise _FieldError("unknown backend type: %s" % backend_type)
    if vxlan is not None:
        if not 0 <= vxlan.vni <= 0xFFFFFF:
            raise _FieldError("Backend.VNI: %d is out of range 0..16777215" % vxlan.vni)
        if not 0 <= vxlan.port <= 0xFFFF:
            raise _FieldError("Backend.Port: %d is out of range 0..65535" % vxlan.port)
        if vxlan.mtu and not MIN_MTU <= vxlan.mtu <= MAX_MTU:
            raise _FieldError("Backend.MTU: %d is out of range %d..%d (or 0 for the interface's MTU)"
                              % (vxlan.mtu, MIN_MTU, MAX_MTU))
    networks = {fam: values[attr] for fam, attr, key in ((IPV4, "network", "enable_ipv4"),
                                                         (IPV6, "ipv6_network", "enable_ipv6")) if values[key]}
    return Config(backend_type=backend_type, backend=backend, vxlan=vxlan, networks=networks, **values)


def _parse(text: str, kube: bool, source: str | None) -> Config:
    where = source + ": " if source else ""
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError("error parsing subnet config: %s%s" % (where, exc)) from None
    except RecursionError:
        raise ConfigError("error parsing subnet config: %sarrays or objects nested too deeply" % where) from None
    try:
        return _build(doc, kube)
    except _FieldError as exc:
        raise ConfigError("error parsing subnet config: %s" % exc) from None


def parse(text: str, kube: bool = False) -> Config:
    """Parse and validate net-conf.json text; raises :class:`ConfigError`.

    ``kube=False`` validates and derives like flanneld's CheckNetworkConfig (etcd mode).
    ``kube=True`` checks only what the Kubernetes subnet manager uses: the networks of the enabled
    stacks, that a stack is enabled, the backend type and the VXLAN VNI/Port ranges.
    """
    return _parse(text, kube, None)


def check_supported(cfg: Config) -> None:
    """Refuse, naming the key, what flanneld accepts and pyflannel does not implement yet; raises ConfigError.

    IPv4-only, dual-stack and IPv6-only networks run, in iptables or nftables mode; a leftover
    ``Networks``/``IPv6Networks`` runs as :func:`network_list_warnings` says, or is refused when it would
    change the network.
    """
    for warning in network_list_warnings(cfg):
        log.warning("%s", warning)


def network_list_warnings(cfg: Config) -> list[str]:
    """The warnings for a leftover ``Networks``/``IPv6Networks``; raises ConfigError naming the key when it
    would change the network.

    A key whose entries are all the family's network (or that is empty) is accepted with one
    warning, as is any value when the family is not enabled: flannel v0.28.9 ignores the key, and
    v0.20 would have run the same network. An entry that is another network is refused: v0.20 would
    have used it, v0.21 to v0.24 would have run several networks, and v0.28.9 ignores it, so the
    file does not say which network is meant.
    """
    warnings = []
    for key, entries, alone, network, family, enabled in (
            ("Networks", cfg.network_list, "Network", cfg.network, IPV4, cfg.enable_ipv4),
            ("IPv6Networks", cfg.ipv6_network_list, "IPv6Network", cfg.ipv6_network, IPV6, cfg.enable_ipv6)):
        if not entries:
            continue
        others = [str(n) for n in entries if n != network]
        if enabled and others:
            raise ConfigError("%s: %s differs from %s %s; flannel ignores %s since v0.25 and used its first entry "
                              "as the network up to v0.20: remove %s, and name the network you mean in %s"
                              % (key, ", ".join(others), alone, network, key, key, alone))
        why = "it names the same network as %s" % alone if enabled else "%s is not enabled" % family
        warnings.append("%s in net-conf.json is ignored: %s (flannel reads only %s since v0.21); remove it"
                        % (key, why, alone))
    return warnings


def load(path: str, kube: bool = False) -> Config:
    """Read ``path``, :func:`parse` it and :func:`check_supported`; raises :class:`ConfigError` with flanneld's texts."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        op = "read" if isinstance(exc, IsADirectoryError) else "open"
        reason = exc.strerror or str(exc)  # Go spells errno texts in lower case
        raise ConfigError("failed to read net conf: %s %s: %s"
                          % (op, path, reason[:1].lower() + reason[1:])) from None
    cfg = _parse(data.decode("utf-8", errors="replace"), kube, path)
    check_supported(cfg)
    return cfg
