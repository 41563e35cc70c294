"""Property-based tests: any input gives a valid value or the module's own clean error, never an
unexpected exception (net-conf.json, flags and FLANNELD_* variables, annotations, whole nodes from the
API, etcd lease values, subnet math)."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel import diagnose, kubeclient, log
from pyflannel.backend.vxlan import VXLANNetwork, backend_data
from pyflannel.family import IPV4, IPV6
from pyflannel.config import (MAX_MTU, MIN_MTU, OVERHEAD, Config, ConfigError, VXLANConfig, check_supported,
                              default_subnet_len, parse)
from pyflannel.flags import _FLAGS, FlagError, HelpRequested, Options, describe
from pyflannel.flags import parse as parse_flags
from pyflannel.ip import ExtAddr, ExternalInterface
from pyflannel.lease import Lease
from pyflannel.subnet.annotations import AnnotationKeys, PrefixError, normalize_prefix
from pyflannel.subnet import etcd, kube
from pyflannel.subnet.etcd import parse_lease
from pyflannel.subnet.kube import node_info, node_to_lease
from pyflannel.subnetfile import SubnetEnv
from pyflannel.subnetfile import parse as parse_env

SETTINGS = settings(max_examples=150, deadline=None, database=None)

# --- shared strategies ---------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
deep_json = st.integers(1, 5000).flatmap(lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n,
                                                                    "[" * n]))
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(IPv6Network((n, 128)).network_address))
cidr4 = st.builds(lambda a, p: "%s/%d" % (a, p), ipv4, st.integers(0, 33))
cidr6 = st.builds(lambda a, p: "%s/%d" % (a, p), ipv6, st.integers(0, 129))
odd_text = st.sampled_from(["", " ", "-1", "0x10", "1e3", "10.0.0.0", "10.0.0.0/8/8", "10.0.0.0/+8", "::/0",
                            "0.0.0.0/0", "10.0.0.0/255.0.0.0", "１０.0.0.0/8", "10.0.0.0/8\n", "\udcff"]) \
    | st.text(max_size=20)


def any_case(key: str) -> st.SearchStrategy[str]:
    """``key`` in a random mix of upper and lower case (Go's JSON matches keys case-insensitively)."""
    return st.lists(st.booleans(), min_size=len(key), max_size=len(key)).map(
        lambda upper: "".join(c.upper() if u else c.lower() for c, u in zip(key, upper)))


def maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values, sometimes any JSON value."""
    return st.one_of(values, values, values, json_values)


# --- net-conf.json ------------------------------------------------------------------------------------

TOP_LEVEL = {
    "Network": maybe(cidr4 | odd_text),
    "IPv6Network": maybe(cidr6 | odd_text),
    "EnableIPv4": maybe(st.booleans()),
    "EnableIPv6": maybe(st.booleans()),
    "SubnetLen": maybe(st.integers(-1, 40)),
    "SubnetMin": maybe(ipv4 | odd_text),
    "SubnetMax": maybe(ipv4 | odd_text),
    "IPv6SubnetLen": maybe(st.integers(-1, 140)),
    "IPv6SubnetMin": maybe(ipv6 | odd_text),
    "IPv6SubnetMax": maybe(ipv6 | odd_text),
    "Networks": maybe(st.lists(cidr4 | odd_text, max_size=2)),
    "IPv6Networks": maybe(st.lists(cidr6 | odd_text, max_size=2)),
    "EnableNFTables": maybe(st.booleans()),
    "Other": json_values,
}
BACKEND = {
    "Type": maybe(st.sampled_from(["vxlan", "VXLAN", "host-gw", "udp", ""])),
    "VNI": maybe(st.integers(-2, 2**24 + 1)),
    "Port": maybe(st.integers(-2, 2**16 + 1)),
    "GBP": maybe(st.booleans()),
    "Learning": maybe(st.booleans()),
    "DirectRouting": maybe(st.booleans()),
    "MTU": maybe(st.integers(-2, 70000)),
}


@st.composite
def net_conf(draw: st.DrawFn) -> str:
    """A net-conf.json document: some known keys in any case, with plausible or arbitrary values."""
    doc: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(sorted(TOP_LEVEL)), unique=True)):
        doc[draw(any_case(key))] = draw(TOP_LEVEL[key])
    if draw(st.booleans()):
        backend: dict[str, Any] = {}
        for key in draw(st.lists(st.sampled_from(sorted(BACKEND)), unique=True)):
            backend[draw(any_case(key))] = draw(BACKEND[key])
        doc[draw(any_case("Backend"))] = draw(st.one_of(st.just(backend), st.just(backend), json_values))
    return json.dumps(doc)


def check_config(c: Config, kube: bool) -> None:
    """What a Config promises."""
    assert c.enable_ipv4 or c.enable_ipv6
    if c.enable_ipv4:
        assert isinstance(c.network, IPv4Network) and (c.network.prefixlen > 0 or int(c.network.network_address) > 0)
    if c.enable_ipv4 and not kube:
        net = c.network
        assert net is not None and c.subnet_min is not None and c.subnet_max is not None
        assert net.prefixlen + 2 <= c.subnet_len <= 30
        for addr in (c.subnet_min, c.subnet_max):
            assert addr in net and int(addr) % (1 << (32 - c.subnet_len)) == 0
    if c.enable_ipv6 and not kube:
        assert c.ipv6_network is not None and c.ipv6_subnet_min in c.ipv6_network
        assert c.ipv6_network.prefixlen + 2 <= c.ipv6_subnet_len <= 126
    assert list(c.networks) == [f for f, on in ((IPV4, c.enable_ipv4), (IPV6, c.enable_ipv6)) if on]
    assert all(net.version == fam.version and net.prefixlen + int(net.network_address) > 0
               for fam, net in c.networks.items())
    assert c.networks.get(IPV4, c.network) == c.network and c.networks.get(IPV6, c.ipv6_network) == c.ipv6_network
    assert c.backend_type in ("vxlan", "host-gw") and (c.vxlan is not None) == (c.backend_type == "vxlan")
    if c.vxlan is not None:
        assert 0 <= c.vxlan.vni <= 0xFFFFFF and 0 <= c.vxlan.port <= 0xFFFF
        assert c.vxlan.mtu == 0 or MIN_MTU <= c.vxlan.mtu <= MAX_MTU
        for iface_mtu in (68, 1280, 1500, 9000, 65535):
            assert c.vxlan.device_mtu(iface_mtu) <= iface_mtu - OVERHEAD
    try:
        check_supported(c)
    except ConfigError as exc:
        assert str(exc).split(":")[0] in ("Networks", "IPv6Networks")
    else:
        # a leftover Networks/IPv6Networks runs only when it names the family's network (or the family is off)
        assert not c.enable_ipv4 or all(n == c.network for n in c.network_list)
        assert not c.enable_ipv6 or all(n == c.ipv6_network for n in c.ipv6_network_list)


@SETTINGS
@given(net_conf(), st.booleans())
def test_net_conf_gives_a_config_or_a_config_error(text: str, kube: bool) -> None:
    try:
        c = parse(text, kube=kube)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        check_config(c, kube)


@SETTINGS
@given(st.text(max_size=60) | deep_json | json_values.map(json.dumps), st.booleans())
def test_any_text_gives_a_config_or_a_config_error(text: str, kube: bool) -> None:
    try:
        check_config(parse(text, kube=kube), kube)
    except ConfigError:
        pass


@SETTINGS
@given(st.integers(0, 2**31) | st.sampled_from([0, MIN_MTU, MAX_MTU]), st.integers(68, 65535))
def test_device_mtu_never_exceeds_the_interface(mtu: int, iface_mtu: int) -> None:
    got = VXLANConfig(mtu=mtu).device_mtu(iface_mtu)
    assert got == min(mtu or iface_mtu, iface_mtu) - OVERHEAD


# --- flags and FLANNELD_* -------------------------------------------------------------------------------

flag_values = st.sampled_from(["", "0", "1", "-1", "true", "false", "T", "0x1f", "010", "08", "1_000", "1__0",
                               "99999999999999999999", "65536", "klog", "json", "10.0.0.1", "::1", "fd00::1",
                               "a.go:1", "kube=2", "kube=-1", "x=1,y=2", "=", " 1"]) | st.text(max_size=10)
flag_names = st.sampled_from([f.name for f in _FLAGS] + ["h", "help", "nope", "-", ""])


@st.composite
def argv_item(draw: st.DrawFn) -> list[str]:
    name = draw(flag_names)
    dashes = draw(st.sampled_from(["-", "--"]))
    form = draw(st.sampled_from(["bare", "eq", "next", "junk"]))
    if form == "bare":
        return [dashes + name]
    if form == "eq":
        return [dashes + name + "=" + draw(flag_values)]
    if form == "next":
        return [dashes + name, draw(flag_values)]
    return [draw(st.text(max_size=6))]


env_text = st.text(st.characters(blacklist_characters="\x00"), min_size=1, max_size=12) | flag_values.filter(bool)


@SETTINGS
@given(st.lists(argv_item(), max_size=6).map(lambda items: [a for item in items for a in item]),
       st.dictionaries(st.sampled_from([f.env for f in _FLAGS] + ["FLANNELD_NOPE", "PATH"]), env_text, max_size=4))
def test_flags_give_options_or_a_flag_error(argv: list[str], environ: dict[str, str]) -> None:
    try:
        o = parse_flags(argv, environ)
    except (FlagError, HelpRequested) as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(o, Options)
    describe(o)
    if o.version:
        return
    assert 0 <= o.healthz_port <= 65535 and 0 <= o.metrics_port <= 65535
    assert o.iptables_resync >= 1 and o.datapath_resync >= 1 and 1 <= o.subnet_lease_renew_margin < 1440
    assert o.log_format in ("klog", "json")
    assert o.log_backtrace_at == ""
    if o.public_ip:
        IPv4Address(o.public_ip)
    if o.public_ipv6:
        IPv6Address(o.public_ipv6)
    log.parse_vmodule(o.vmodule)


@SETTINGS
@given(st.text(max_size=30))
def test_vmodule_parses_or_raises_value_error(spec: str) -> None:
    try:
        pairs = log.parse_vmodule(spec)
    except ValueError:
        return
    assert all(pattern and 0 <= n < 2**31 for pattern, n in pairs)


# --- annotations ---------------------------------------------------------------------------------------

@SETTINGS
@given(st.text(max_size=30) | st.sampled_from(["flannel.alpha.coreos.com", "example.com/flannel", "a/b/c", "a.b/"]))
def test_annotation_prefix_gives_keys_or_a_prefix_error(prefix: str) -> None:
    try:
        keys = AnnotationKeys.from_prefix(prefix)
    except PrefixError:
        return
    assert keys.prefix == normalize_prefix(keys.prefix) and keys.prefix.endswith(("/", "-"))
    assert keys.backend_data == keys.prefix + "backend-data"


KEYS = AnnotationKeys.from_prefix("flannel.alpha.coreos.com")
ETH1_IP = IPv4Address("192.168.56.11")
mac = st.binary(min_size=6, max_size=6).map(lambda b: ":".join("%02x" % x for x in b))
backend_data_text = maybe(st.builds(backend_data, st.integers(0, 2**24 - 1), mac)
                          | st.builds(lambda m: json.dumps({"VNI": 1, "VtepMAC": m}),
                                      mac.map(str.upper) | odd_text | st.sampled_from(
                                          ["0a00:00:00:00:00:02", "0a:00:00:00:00:0 2", "0a-00-00-00-00-02", " 0a:00:00:00:00:02",
                                           "0a: 00:00:00:00:02", "0a:00:00:00:00:02:"])))
backend_data_text = backend_data_text.map(lambda v: v if isinstance(v, str) else json.dumps(v)) | deep_json


@st.composite
def node_object(draw: st.DrawFn) -> dict[str, Any]:
    """A node as the API returns it, with flannel's annotations holding plausible or arbitrary strings."""
    annotations = {
        KEYS.backend_type: draw(st.sampled_from(["vxlan", "host-gw", ""]) | st.text(max_size=6)),
        KEYS.backend_data: draw(backend_data_text),
        KEYS.backend_public_ip: draw(ipv4 | ipv6 | odd_text),
        KEYS.backend_v6_data: draw(backend_data_text),
        KEYS.backend_public_ipv6: draw(ipv6 | ipv4 | odd_text),
        KEYS.subnet_kube_managed: draw(st.sampled_from(["true", "false"])),
        "other.example.com/x": draw(st.text(max_size=5)),
    }
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        spec["podCIDR"] = draw(cidr4 | cidr6 | odd_text)
    if draw(st.booleans()):
        spec["podCIDRs"] = draw(st.lists(cidr4 | cidr6 | odd_text, max_size=3))
    chosen = draw(st.lists(st.sampled_from(sorted(annotations)), unique=True))
    return {"metadata": {"name": draw(st.text(min_size=1, max_size=8)),
                         "annotations": {k: annotations[k] for k in chosen}}, "spec": spec}


@SETTINGS
@given(node_object())
def test_node_annotations_give_a_lease_or_a_value_error(obj: dict[str, Any]) -> None:
    node = node_info(obj, KEYS.prefix)
    assert all(k.startswith(KEYS.prefix) for k in node.annotations)
    for family, network, address in ((IPV4, IPv4Network, IPv4Address), (IPV6, IPv6Network, IPv6Address)):
        try:
            lease = node_to_lease(node, KEYS, family)
        except ValueError:
            continue
        assert isinstance(lease.subnet, network) and isinstance(lease.public_ip, address)
        assert lease.backend_data == node.annotations.get(KEYS.data(family), "")


@SETTINGS
@given(st.integers(1, 250), ipv4, st.sampled_from(["vxlan", "host-gw", ""]), backend_data_text)
def test_backend_data_gives_an_entry_with_a_valid_mac_or_none(n: int, public_ip: str, kind: str, data: str) -> None:
    ext = ExternalInterface("eth1", 2, 1500, {IPV4: ExtAddr(ETH1_IP, ETH1_IP)})
    backend = VXLANNetwork(None, VXLANConfig(), IPV4, ext, IPv4Network("10.244.0.0/16"))  # type: ignore[arg-type]
    backend.own_subnet = IPv4Network("10.244.0.0/24")
    entry = backend._entry("node", Lease(IPv4Network("10.244.%d.0/24" % n), IPv4Address(public_ip), kind, data))
    if entry is None:
        return
    assert kind == "vxlan"
    assert entry.mac == ":".join("%02x" % b for b in bytes.fromhex(entry.mac.replace(":", "")))
    assert json.loads(data)["VtepMAC"].lower() == entry.mac


# --- subnet math ---------------------------------------------------------------------------------------

@SETTINGS
@given(cidr4.filter(lambda c: int(c.rsplit("/", 1)[1]) <= 32).map(lambda c: IPv4Network(c, strict=False)),
       st.lists(cidr4.filter(lambda c: int(c.rsplit("/", 1)[1]) <= 32).map(lambda c: IPv4Network(c, strict=False)),
                max_size=6))
def test_free_subnet_is_inside_the_network_and_unused(network: IPv4Network, used: list[IPv4Network]) -> None:
    free = diagnose._free_subnet(network, used)
    if free is None:
        return
    assert free.subnet_of(network) and not any(free.overlaps(u) for u in used)
    assert free.prefixlen == default_subnet_len(network)


# --- subnet.env ------------------------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.sampled_from([IPV4, IPV6]), min_size=1, max_size=2, unique=True), st.randoms(use_true_random=False),
       st.integers(0, 65535), st.booleans())
def test_subnet_env_reads_back_per_family(families: list[Any], rnd: Any, mtu: int, ipmasq: bool) -> None:
    networks = {}
    for family in families:
        prefix = rnd.randint(1, family.bits - 2)
        network = family.network("%s/%d" % (family.address(str(family.network(family.any_network).network_address
                                                                + rnd.getrandbits(family.bits))), prefix))
        subnet = next(network.subnets(prefixlen_diff=rnd.randint(1, min(8, family.bits - prefix - 1))))
        networks[family] = (network, subnet)
    text = SubnetEnv(networks, mtu, ipmasq).render()
    lines = text.splitlines()
    assert lines[-2:] == ["FLANNEL_MTU=%d" % mtu, "FLANNEL_IPMASQ=%s" % str(ipmasq).lower()]
    assert [line.split("=")[0] for line in lines[:-2]] == [k for f in (IPV4, IPV6) if f in networks
                                                            for k in (f.env_network, f.env_subnet)]
    values = parse_env(text)
    for family, (network, subnet) in networks.items():
        assert family.network(values[family.env_network]) == network
        assert family.network(values[family.env_subnet]) == subnet


# --- whole nodes from the API, and etcd lease values ----------------------------------------------------

@contextlib.contextmanager
def as_the_daemon_decodes() -> Iterator[None]:
    """The recursion limit the daemon runs with (kubeclient.allow_deep_json), for this thread."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, kubeclient.MAX_DEPTH + 1000))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def nested(depth: int) -> str:
    return '{"f:a":' * depth + "{}" + "}" * depth


@st.composite
def hostile_node(draw: st.DrawFn) -> str:
    """A node's JSON as the API server may send it: a plausible flannel node with one part replaced by any
    JSON value, nested deeply, inflated, or given an oversized annotation. (Its text is encoded as the API
    server writes JSON: UTF-8, a lone surrogate replaced, never escaped.)"""
    obj = draw(node_object())
    kind = draw(st.sampled_from(["plain", "any", "deep", "inflated", "oversized"]))
    if kind == "any":
        where = draw(st.sampled_from(["node", "metadata", "name", "annotations", "annotation", "spec", "podCIDR",
                                      "podCIDRs", "creationTimestamp"]))
        value = draw(json_values)
        if where == "node":
            obj = value
        elif where in ("metadata", "spec"):
            obj[where] = value
        elif where in ("name", "annotations", "creationTimestamp"):
            obj["metadata"][where] = value
        elif where == "annotation":
            obj["metadata"].setdefault("annotations", {})[draw(st.sampled_from(
                [KEYS.backend_data, KEYS.backend_public_ip, KEYS.backend_type, KEYS.subnet_kube_managed]))] = value
        else:
            obj["spec"][where] = value
    text = json.dumps(obj, ensure_ascii=False)
    if kind == "deep" and isinstance(obj, dict):
        where = draw(st.sampled_from(['"status":%s', '"metadata":{"managedFields":[{"fieldsV1":%s}]}']))
        text = text[:-1] + "," + where % nested(draw(st.integers(900, 9_999))) + "}"
    elif kind == "inflated" and isinstance(obj, dict):
        text = text[:-1] + ',"status":{"images":[%s]}}' % ",".join(['{"names":["a"]}'] * draw(st.integers(1, 6000)))
    elif kind == "oversized" and isinstance(obj, dict):
        obj["metadata"]["annotations"] = {**obj["metadata"].get("annotations", {}),
                                          draw(st.sampled_from([KEYS.backend_data, KEYS.backend_type])): "x" * 5000}
        text = json.dumps(obj, ensure_ascii=False)
    return text


ANCHOR = ('{"metadata":{"name":"anchor","annotations":{"flannel.alpha.coreos.com/kube-subnet-manager":"true",'
          '"flannel.alpha.coreos.com/backend-type":"vxlan","flannel.alpha.coreos.com/public-ip":"192.168.56.250",'
          '"flannel.alpha.coreos.com/backend-data":"{\\"VNI\\":1,\\"VtepMAC\\":\\"0a:00:00:00:00:fa\\"}"}},'
          '"spec":{"podCIDR":"10.244.250.0/24"}}')


class PageClient:
    """The API client boundary: node lists paged as the API server pages them, and watch lines; each answer
    decoded with the decoder asked for, errors raised as KubeClient raises them."""

    host = "https://10.96.0.1:443"

    def __init__(self, nodes: list[str], events: list[str]) -> None:
        self.nodes, self.events = nodes, events

    def list_nodes(self, limit: int, cont: str = "", field_selector: str = "", decode: Any = json.loads) -> Any:
        start = int(cont or 0)
        end = start + limit
        meta = '{"resourceVersion":"5"%s}' % (',"continue":"%d"' % end if end < len(self.nodes) else "")
        raw = ('{"kind":"NodeList","metadata":%s,"items":[%s]}' % (meta, ",".join(self.nodes[start:end]))).encode(
            "utf-8", "replace")
        page = kubeclient.decode_json(raw, decode)
        if not isinstance(page, dict):
            raise kubeclient.Undecodable(200, "not a JSON object")
        return page

    def watch_nodes(self, rv: str, timeout: int, decode: Any = json.loads) -> Iterator[Any]:
        for line in self.events:
            event = kubeclient.decode_json(line.encode("utf-8", "replace"), decode)
            if not isinstance(event, dict):
                raise kubeclient.Undecodable(0, "not a JSON object")
            yield event


def check_leases(sm: kube.KubeSubnetManager) -> None:
    """Every lease is a valid one, and the anchor, a valid node no other node can take from, has its lease."""
    leases = sm.leases(IPV4)
    assert leases["anchor"].subnet == IPv4Network("10.244.250.0/24")
    for lease in leases.values():
        assert lease.subnet.subnet_of(IPv4Network("10.244.0.0/16")) and not lease.public_ip.is_loopback


@SETTINGS
@given(st.lists(hostile_node(), max_size=6), st.integers(1, 4), st.booleans())
def test_any_node_list_gives_leases_or_skipped_nodes(nodes: list[str], page_size: int, big_page: bool) -> None:
    """A node list of any content (the anchor, and a big node that makes pages large enough for msgspec):
    every node becomes a lease or is skipped; nothing escapes the list."""
    padding = ['{"metadata":{"name":"pad"},"status":{"images":[%s]}}' % ",".join(['{"names":["a"]}'] * 5000)]
    nodes = [n for n in nodes if '"anchor"' not in n and '"k8s01"' not in n]
    sm = kube.KubeSubnetManager(PageClient([ANCHOR, *nodes, *(padding if big_page else [])], []),  # type: ignore[arg-type]
                                "k8s01", KEYS, KEYS.prefix, {IPV4: IPv4Network("10.244.0.0/16")}, lambda names, changed_at: None)
    with as_the_daemon_decodes():
        for _ in range(2):  # a relist of the same nodes
            with mock.patch.object(kube, "LIST_PAGE_SIZE", page_size):
                sm._list()
            check_leases(sm)


watch_types = st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]) | st.text(max_size=5) | json_values


@SETTINGS
@given(st.lists(st.tuples(watch_types, hostile_node()), max_size=6))
def test_any_watch_event_is_applied_or_ends_the_watch_with_an_api_error(events: list[tuple[Any, str]]) -> None:
    lines = ['{"type":%s,"object":%s}' % (json.dumps(kind), node) for kind, node in events if '"anchor"' not in node]
    sm = kube.KubeSubnetManager(PageClient([ANCHOR], lines), "k8s01", KEYS, KEYS.prefix,  # type: ignore[arg-type]
                                {IPV4: IPv4Network("10.244.0.0/16")}, lambda names, changed_at: None)
    with as_the_daemon_decodes():
        sm._list()
        try:
            sm._watch(threading.Event(), kube._Backoff())
        except kubeclient.ApiError:
            pass  # the run loop lists again (undecodable, an ERROR event) or resumes
    check_leases(sm)


lease_values = (json_values.map(json.dumps) | deep_json | st.binary(max_size=40)
                | st.builds(lambda ip, data: json.dumps({"PublicIP": ip, "BackendType": "vxlan", "BackendData": data}),
                            ipv4 | odd_text, json_values | st.just({"VNI": 1, "VtepMAC": "0a:00:00:00:00:02"}))
                | st.integers(900, 5000).map(lambda n: '{"PublicIP":"192.168.56.2","BackendData":%s}' % nested(n))
                | st.integers(4000, 5000).map(lambda n: '{"PublicIP":"192.168.56.2","x":"%s"}' % ("y" * n)))


@SETTINGS
@given(st.sampled_from(["10.244.2.0-24", "10.244.2.0-24&fd00::-64", "10.9.0.0-24", "bad"]),
       lease_values.map(lambda v: v if isinstance(v, bytes) else v.encode()))
def test_any_etcd_value_gives_a_lease_or_a_warning(name: str, value: bytes) -> None:
    sm = etcd.EtcdSubnetManager(None, "/coreos.com/network", None, 3600, lambda names: None)  # type: ignore[arg-type]
    sm.config = parse('{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}', kube=False)
    sm.network = IPv4Network("10.244.0.0/16")
    with as_the_daemon_decodes():
        changed = sm._put(name, value)
    lease = sm.lease_of(name, IPV4)
    assert changed == (lease is not None)
    if lease is not None:
        assert lease.subnet == IPv4Network("10.244.2.0/24") and not lease.public_ip.is_unspecified
    try:
        parse_lease(name, value)
    except ValueError:
        pass
