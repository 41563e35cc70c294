"""flanneld's command line (v0.20.2, and v0.28.9's new flags) and its ``FLANNELD_*`` environment
variables; the other environment variables flanneld's kube subnet manager reads.

Parsing follows Go's ``flag`` package: ``-name`` or ``--name``, ``-name=value`` or ``-name value``
(bool flags take a value only as ``-name=value``), ``--`` or the first non-flag argument ends the
flags, and integers are read like Go's ``strconv.ParseInt(s, 0, 64)`` (``0x1f``, ``010`` = 8,
``1_000``). Error texts are Go's.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import __version__, log

__all__ = ["FlagError", "HelpRequested", "Options", "continue_when_cache_not_ready", "describe", "event_queue_depth",
           "go_quote", "parse", "usage"]


class FlagError(ValueError):
    """A bad command line or ``FLANNELD_*`` value; the message is one line in Go's wording."""


class HelpRequested(Exception):
    """``-h``, ``-help`` or ``--help`` was given: print :func:`usage` and exit 0."""


@dataclass(frozen=True)
class Options:
    """The values of all flags after the command line and the environment were applied."""

    etcd_endpoints: str
    etcd_prefix: str
    etcd_keyfile: str
    etcd_certfile: str
    etcd_cafile: str
    etcd_username: str
    etcd_password: str
    iface: list[str]
    iface_regex: list[str]
    iface_can_reach: str
    subnet_file: str
    public_ip: str
    public_ipv6: str
    subnet_lease_renew_margin: int
    ip_masq: bool
    ip_masq_fully_random_disable: bool
    kube_subnet_mgr: bool
    kube_api_url: str
    kube_annotation_prefix: str
    kubeconfig_file: str
    version: bool
    healthz_ip: str
    healthz_port: int
    iptables_resync: int
    iptables_forward_rules: bool
    ip_blackhole_route: bool
    net_config_path: str
    set_node_network_unavailable: bool
    v: int
    vmodule: str
    log_backtrace_at: str
    log_format: str
    metrics_port: int
    datapath_resync: int
    datapath_probe_port: int
    datapath_probe_interval: int
    vxlan_checksum_offload: str
    etcd_password_file: str


class _BadValue(Exception):
    """A flag value was rejected; the message is the reason Go would print."""


# --- Go's strconv, as far as the flags need it ----------------------------------------------------

_SYNTAX = "invalid syntax"
_RANGE = "value out of range"
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_QUOTE_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                  "\v": "\\v", "\\": "\\\\", '"': '\\"'}


def go_quote(s: str) -> str:
    """``strconv.Quote(s)``, i.e. Go's ``%q``."""
    out = []
    for ch in s:
        cp = ord(ch)
        if ch in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[ch])
        elif 0xDC80 <= cp <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape in argv/environ)
            out.append("\\x%02x" % (cp - 0xDC00))
        elif ch.isprintable():
            out.append(ch)
        elif cp < 0x20 or cp == 0x7F:
            out.append("\\x%02x" % cp)
        elif cp < 0x10000:
            out.append("\\u%04x" % cp)
        else:
            out.append("\\U%08x" % cp)
    return '"' + "".join(out) + '"'


def _underscore_ok(s: str) -> bool:
    """Go's ``underscoreOK``: underscores only between digits (or after a base prefix)."""
    saw, i, hexa = "^", 0, False
    if len(s) >= 2 and s[0] == "0" and s[1].lower() in ("b", "o", "x"):
        saw, i, hexa = "0", 2, s[1].lower() == "x"
    for ch in s[i:]:
        if "0" <= ch <= "9" or (hexa and "a" <= ch.lower() <= "f"):
            saw = "0"
        elif ch == "_":
            if saw != "0":
                return False
            saw = "_"
        else:
            if saw == "_":
                return False
            saw = "!"
    return saw != "_"


def _parse_int(s: str, bits: int, base: int = 0) -> int:
    """Go's ``strconv.ParseInt(s, base, bits)`` for base 0 or 10; raises ``_BadValue(_SYNTAX|_RANGE)``."""
    neg = s.startswith("-")
    body = s[1:] if s.startswith(("+", "-")) else s
    if not body:
        raise _BadValue(_SYNTAX)
    radix, digits = 10, body
    if base == 0 and body[0] == "0":
        if len(body) >= 3 and body[1].lower() in ("b", "o", "x"):
            radix, digits = {"b": 2, "o": 8, "x": 16}[body[1].lower()], body[2:]
        else:
            radix, digits = 8, body[1:]
    n, underscores = 0, False
    for ch in digits:
        if ch == "_" and base == 0:
            underscores = True
            continue
        d = _DIGITS.find(ch.lower()) if ch.isascii() else -1
        if not 0 <= d < radix:
            raise _BadValue(_SYNTAX)
        n = n * radix + d
        if n >= 1 << bits:
            raise _BadValue(_RANGE)
    if underscores and not _underscore_ok(body):
        raise _BadValue(_SYNTAX)
    if n > (1 << (bits - 1)) - (0 if neg else 1):
        raise _BadValue(_RANGE)
    return -n if neg else n


# --- value converters: text -> value, raising _BadValue with Go's reason ------------------------------

def _go_int(s: str) -> int:
    """Go's ``intValue.Set``: ``ParseInt(s, 0, 64)`` with the errors shortened by ``numError``."""
    try:
        return _parse_int(s, 64)
    except _BadValue as exc:
        raise _BadValue("parse error" if str(exc) == _SYNTAX else "value out of range") from None


def _go_bool(s: str) -> bool:
    """Go's ``boolValue.Set`` (``strconv.ParseBool``)."""
    if s in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if s in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise _BadValue("parse error")


def _klog_level(s: str) -> int:
    """klog's ``Level.Set`` (``-v``): ``ParseInt(s, 10, 32)``, errors in strconv's full text."""
    try:
        return _parse_int(s, 32, base=10)
    except _BadValue as exc:
        raise _BadValue("strconv.ParseInt: parsing %s: %s" % (go_quote(s), exc)) from None


def _klog_vmodule(s: str) -> str:
    """klog's ``moduleSpec.Set`` (``-vmodule pattern=N,...``); the text is kept as given."""
    try:
        log.parse_vmodule(s)
    except ValueError as exc:
        raise _BadValue(str(exc)) from None
    return s


def _klog_trace(s: str) -> str:
    """klog's ``traceLocation.Set`` (``-log_backtrace_at file.go:N``): pyflannel accepts only the empty value."""
    if s:
        raise _BadValue("pyflannel does not support -log_backtrace_at; leave it empty")
    return s


# --- pyflannel's checks of values flanneld only checks (or trips over) later --------------------

def _port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise _BadValue("must be between 0 and 65535")


def _positive(value: int) -> None:
    if value < 1:
        raise _BadValue("must be at least 1")


def _log_format(value: str) -> None:
    if value not in ("klog", "json"):
        raise _BadValue("must be klog or json")


def _offload_mode(value: str) -> None:
    if value not in ("auto", "on", "off"):
        raise _BadValue("must be auto, on or off")


def _ip(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _BadValue("not an IP address") from None


# --- the flag table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Kind:
    """How a kind of flag reads its text and shows in the usage listing."""

    type_name: str  # the type shown by PrintDefaults; "" for bool
    convert: Callable[[str], Any]
    zero: Any  # defaults equal to this are not shown in the usage listing


_STRING = _Kind("string", str, "")
_INT = _Kind("int", _go_int, 0)
_BOOL = _Kind("", _go_bool, False)
_LIST = _Kind("value", str, None)  # flanneld's flagSlice: each use appends
_LEVEL = _Kind("value", _klog_level, 0)
_VMODULE = _Kind("value", _klog_vmodule, "")
_TRACE = _Kind("value", _klog_trace, "")


@dataclass(frozen=True)
class _Flag:
    name: str
    kind: _Kind
    default: Any
    usage: str
    check: Callable[[Any], None] | None = None

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "FLANNELD_" + self.name.upper().replace("-", "_")


_FLAGS = (
    _Flag("etcd-endpoints", _STRING, "http://127.0.0.1:4001,http://127.0.0.1:2379",
          "a comma-delimited list of etcd endpoints"),
    _Flag("etcd-prefix", _STRING, "/coreos.com/network", "etcd prefix"),
    _Flag("etcd-keyfile", _STRING, "", "SSL key file used to secure etcd communication"),
    _Flag("etcd-certfile", _STRING, "", "SSL certification file used to secure etcd communication"),
    _Flag("etcd-cafile", _STRING, "", "SSL Certificate Authority file used to secure etcd communication"),
    _Flag("etcd-username", _STRING, "", "username for BasicAuth to etcd"),
    _Flag("etcd-password", _STRING, "", "password for BasicAuth to etcd"),
    _Flag("iface", _LIST, None,
          "interface to use (IP or name) for inter-host communication. Can be specified multiple times "
          "to check each option in order. Returns the first match found."),
    _Flag("iface-regex", _LIST, None,
          "regex expression to match the first interface to use (IP or name) for inter-host "
          "communication. Can be specified multiple times to check each regex in order. Returns the "
          "first match found. Regexes are checked after specific interfaces specified by the iface "
          "option have already been checked."),
    _Flag("iface-can-reach", _STRING, "",
          "detect interface to use (IP or name) for inter-host communication based on which will be "
          "used for provided IP. This is exactly the interface to use of command 'ip route get "
          "<ip-address>'"),
    _Flag("subnet-file", _STRING, "/run/flannel/subnet.env",
          "filename where env variables (subnet, MTU, ... ) will be written to"),
    _Flag("public-ip", _STRING, "", "IP accessible by other nodes for inter-host communication"),
    _Flag("public-ipv6", _STRING, "", "IPv6 accessible by other nodes for inter-host communication"),
    _Flag("subnet-lease-renew-margin", _INT, 60,
          "subnet lease renewal margin, in minutes, ranging from 1 to 1439"),
    _Flag("ip-masq", _BOOL, False,
          "setup IP masquerade rule for traffic destined outside of overlay network"),
    _Flag("ip-masq-fully-random-disable", _BOOL, False,
          "disable fully random source port allocation (--random-fully, fully-random) in the IP masquerade rules"),
    _Flag("kube-subnet-mgr", _BOOL, False,
          "contact the Kubernetes API for subnet assignment instead of etcd."),
    _Flag("kube-api-url", _STRING, "",
          "Kubernetes API server URL. Does not need to be specified if flannel is running in a pod."),
    _Flag("kube-annotation-prefix", _STRING, "flannel.alpha.coreos.com",
          'Kubernetes annotation prefix. Can contain single slash "/", otherwise it will be appended '
          "at the end."),
    _Flag("kubeconfig-file", _STRING, "",
          "kubeconfig file location. Does not need to be specified if flannel is running in a pod."),
    _Flag("version", _BOOL, False, "print version and exit"),
    _Flag("healthz-ip", _STRING, "0.0.0.0", "the IP address for healthz server to listen", _ip),
    _Flag("healthz-port", _INT, 0, "the port for healthz server to listen(0 to disable)", _port),
    _Flag("iptables-resync", _INT, 5, "resync period for iptables rules, in seconds", _positive),
    _Flag("iptables-forward-rules", _BOOL, True, "add default accept rules to FORWARD chain in iptables"),
    _Flag("ip-blackhole-route", _BOOL, False, "add a blackhole route on the node for the local podCIDR"),
    _Flag("net-config-path", _STRING, "/etc/kube-flannel/net-conf.json",
          "path to the network configuration file"),
    _Flag("set-node-network-unavailable", _BOOL, True, "set NodeNetworkUnavailable after ready"),
    _Flag("v", _LEVEL, 0, "number for the log level verbosity"),
    _Flag("vmodule", _VMODULE, "", "comma-separated list of pattern=N settings for file-filtered logging "
          "(pyflannel: patterns match its source file names, e.g. kube=4,vxlan=2)"),
    _Flag("log_backtrace_at", _TRACE, "",
          "when logging hits line file:N, emit a stack trace (pyflannel: not supported, must be empty)"),
    # pyflannel's own flags
    _Flag("log-format", _STRING, "klog", "log format: klog or json", _log_format),
    _Flag("metrics-port", _INT, 0,
          "the port for the metrics server to listen on the healthz IP (0 to disable)", _port),
    _Flag("datapath-resync", _INT, 30,
          "resync period for routes, neighbours and FDB entries, in seconds", _positive),
    _Flag("datapath-probe-port", _INT, 8473,
          "the TCP and UDP port of the datapath probes between the nodes, the same on every node (0 to disable)",
          _port),
    _Flag("datapath-probe-interval", _INT, 30,
          "seconds between two rounds of datapath probes (each probes up to 8 other nodes per IP family)",
          _positive),
    _Flag("vxlan-checksum-offload", _STRING, "auto",
          "tx checksum offload of the VXLAN device: auto (turned off when the checksum-offload bug is seen), on "
          "(left as the kernel sets it) or off", _offload_mode),
    _Flag("etcd-password-file", _STRING, "",
          "file holding the password for BasicAuth to etcd (read once at start; unlike --etcd-password, not "
          "shown to every process on the host)"),
)
_BY_NAME = {f.name: f for f in _FLAGS}


def _set(flag: _Flag, values: dict[str, Any], text: str) -> None:
    """Set ``flag`` from ``text`` like ``flag.Value.Set``; raises ``_BadValue``."""
    value = flag.kind.convert(text)
    if flag.check is not None:
        flag.check(value)
    if flag.kind is _LIST:
        values[flag.field].append(value)
    else:
        values[flag.field] = value


def _parse_args(argv: list[str], values: dict[str, Any]) -> set[str]:
    """Go's ``FlagSet.Parse``; returns the names of the flags that were given."""
    given: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if len(arg) < 2 or arg[0] != "-":
            break
        if arg == "--":
            break
        name = arg[2:] if arg[1] == "-" else arg[1:]
        if not name or name[0] in "-=":
            raise FlagError("bad flag syntax: %s" % arg)
        i += 1
        name, eq, text = name.partition("=")
        flag = _BY_NAME.get(name)
        if flag is None:
            if name in ("h", "help"):
                raise HelpRequested()
            raise FlagError("flag provided but not defined: -%s" % name)
        if flag.kind is _BOOL:
            try:
                _set(flag, values, text if eq else "true")
            except _BadValue as exc:
                raise FlagError("invalid boolean value %s for -%s: %s" % (go_quote(text), name, exc)) from None
        else:
            if not eq:
                if i == len(argv):
                    raise FlagError("flag needs an argument: -%s" % name)
                text = argv[i]
                i += 1
            try:
                _set(flag, values, text)
            except _BadValue as exc:
                raise FlagError("invalid value %s for flag -%s: %s" % (go_quote(text), name, exc)) from None
        given.add(name)
    return given


def parse(argv: list[str], environ: Mapping[str, str]) -> Options:
    """Parse ``argv`` (the arguments after the program name) and the ``FLANNELD_*`` variables.

    Raises :class:`HelpRequested` for ``-h``/``-help`` and :class:`FlagError` for anything bad.
    With ``--version`` the environment is not read and nothing after parsing is checked.
    """
    values = {f.field: [] if f.kind is _LIST else f.default for f in _FLAGS}
    given = _parse_args(argv, values)
    if values["version"]:
        return Options(**values)
    for flag in sorted(_FLAGS, key=lambda f: f.name):
        text = environ.get(flag.env, "")
        if flag.name in given or flag.name == "version" or not text:
            continue
        try:
            _set(flag, values, text)
        except _BadValue as exc:
            raise FlagError("invalid value %s for %s: %s" % (go_quote(text), flag.env, exc)) from None
    if values["etcd_password"] and values["etcd_password_file"]:
        raise FlagError("give the etcd password with --etcd-password or --etcd-password-file, not both")
    if not 1 <= values["subnet_lease_renew_margin"] < 24 * 60:
        raise FlagError("Invalid subnet-lease-renew-margin option, out of acceptable range")
    for field, family, what in (("public_ip", ipaddress.IPv4Address, "IP"),
                                ("public_ipv6", ipaddress.IPv6Address, "IPv6")):
        if values[field]:
            try:
                family(values[field])
            except ValueError:
                raise FlagError("invalid public %s address: %s" % (what, values[field])) from None
    return Options(**values)


def usage() -> str:
    """flanneld's usage text: ``Usage: pyflannel [OPTION]...`` and Go's ``PrintDefaults`` listing.

    The text has no trailing newline.
    """
    lines = ["Usage: pyflannel [OPTION]..."]
    for flag in sorted(_FLAGS, key=lambda f: f.name):
        head = "  -" + flag.name + (" " + flag.kind.type_name if flag.kind.type_name else "")
        line = head + ("\t" if len(head) <= 4 else "\n    \t") + flag.usage
        if flag.kind is not _LIST and flag.default != flag.kind.zero:
            if flag.kind is _STRING:
                line += " (default %s)" % go_quote(flag.default)
            else:
                line += " (default %s)" % _go_format(flag.default)
        lines.append(line)
    return "\n".join(lines)


# Go field names of flanneld v0.28.9's CmdLineOpts in declaration order, then pyflannel's own.
_DESCRIBE_FIELDS = (
    ("etcdEndpoints", "etcd_endpoints"), ("etcdPrefix", "etcd_prefix"), ("etcdKeyfile", "etcd_keyfile"),
    ("etcdCertfile", "etcd_certfile"), ("etcdCAFile", "etcd_cafile"), ("etcdUsername", "etcd_username"),
    ("etcdPassword", "etcd_password"), ("version", "version"), ("kubeSubnetMgr", "kube_subnet_mgr"),
    ("kubeApiUrl", "kube_api_url"), ("kubeAnnotationPrefix", "kube_annotation_prefix"),
    ("kubeConfigFile", "kubeconfig_file"), ("iface", "iface"), ("ifaceRegex", "iface_regex"),
    ("ipMasq", "ip_masq"), ("ipMasqRandomFullyDisable", "ip_masq_fully_random_disable"),
    ("ifaceCanReach", "iface_can_reach"), ("subnetFile", "subnet_file"),
    ("publicIP", "public_ip"), ("publicIPv6", "public_ipv6"),
    ("subnetLeaseRenewMargin", "subnet_lease_renew_margin"), ("healthzIP", "healthz_ip"),
    ("healthzPort", "healthz_port"), ("iptablesResyncSeconds", "iptables_resync"),
    ("iptablesForwardRules", "iptables_forward_rules"), ("blackholeRoute", "ip_blackhole_route"),
    ("netConfPath", "net_config_path"),
    ("setNodeNetworkUnavailable", "set_node_network_unavailable"),
    ("logFormat", "log_format"), ("metricsPort", "metrics_port"), ("datapathResync", "datapath_resync"),
    ("datapathProbePort", "datapath_probe_port"), ("datapathProbeInterval", "datapath_probe_interval"),
    ("vxlanChecksumOffload", "vxlan_checksum_offload"), ("etcdPasswordFile", "etcd_password_file"),
)


def _go_format(value: Any) -> str:
    """A value as Go's ``%v`` prints it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + " ".join(value) + "]"
    return str(value)


def describe(opts: Options) -> str:
    """The ``%+v`` part of flanneld's ``CLI flags config: %+v`` log line, e.g. ``{etcdEndpoints:...}``.

    The etcd password is shown as ``********`` when set, and so is a password in a URL's userinfo;
    pyflannel's own flags come last.
    """
    parts = []
    for go_name, field in _DESCRIBE_FIELDS:
        value = getattr(opts, field)
        if field == "etcd_password" and value:
            value = "********"
        elif field in ("etcd_endpoints", "kube_api_url"):
            value = log.redact_urls(value)
        parts.append("%s:%s" % (go_name, _go_format(value)))
    return "{" + " ".join(parts) + "}"


def parse_or_exit_code(argv: list[str], environ: Mapping[str, str], program: str, about: str = "") -> Options | int:
    """Options, or after ``--help``, ``--version`` or a bad flag, the exit code (the text is on stderr)."""
    try:
        opts = parse(argv, environ)
    except HelpRequested:
        flag_lines = usage().partition("\n")[2]
        print("Usage: %s [OPTION]...\n%s%s" % (program, about + "\n" if about else "", flag_lines), file=sys.stderr)
        return 0
    except FlagError as exc:
        print("%s: %s (see --help)" % (program, exc), file=sys.stderr)
        return 2
    if opts.version:
        print(__version__, file=sys.stderr)
        return 0
    return opts


# --- the other environment variables of flanneld's kube subnet manager ---------------------------------

DEFAULT_EVENT_QUEUE_DEPTH = 5000


def event_queue_depth(environ: Mapping[str, str]) -> int:
    """``EVENT_QUEUE_DEPTH``, validated as flanneld does (a value of 0 or less means the default, 5000).

    flanneld sizes its lease-event channel with it. pyflannel has no such queue (changes are
    coalesced per node), so the value sizes nothing; a bad one is refused all the same, with
    flanneld's text, so that a manifest that works here works with flanneld. Raises FlagError.
    """
    text = environ.get("EVENT_QUEUE_DEPTH", "")
    if not text:
        return DEFAULT_EVENT_QUEUE_DEPTH
    try:
        value = _parse_int(text, 64, base=10)
    except _BadValue as exc:
        raise FlagError("env EVENT_QUEUE_DEPTH=%s format error: strconv.Atoi: parsing %s: %s"
                        % (text, go_quote(text), exc)) from None
    return value if value > 0 else DEFAULT_EVENT_QUEUE_DEPTH


def continue_when_cache_not_ready(environ: Mapping[str, str]) -> bool:
    """``CONT_WHEN_CACHE_NOT_READY``: exactly ``true`` makes the daemon carry on when the first node list
    takes longer than the 10 minutes it waits for it (flannel v0.27.1); anything else makes it exit."""
    return environ.get("CONT_WHEN_CACHE_NOT_READY", "") == "true"
