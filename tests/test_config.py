"""pyflannel.config: net-conf.json parsing and validation (flanneld v0.20.2 subnet/config.go)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from pyflannel.config import Config, ConfigError, VXLANConfig, check_supported, load, parse
from pyflannel.family import IPV4, IPV6, Family
from tests.conftest import needs_netns

VXLAN = {"Type": "vxlan"}


def conf(kube: bool = False, **keys: Any) -> Config:
    return parse(json.dumps(keys), kube=kube)


def error(text: str, kube: bool = False) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(text, kube=kube)
    return str(exc.value)


def keys_error(kube: bool = False, **keys: Any) -> str:
    return error(json.dumps(keys), kube=kube)


def test_kube_manifest_config() -> None:
    c = parse('{\n  "Network": "10.244.0.0/16",\n  "Backend": {\n    "Type": "vxlan"\n  }\n}\n', kube=True)
    assert c.network == IPv4Network("10.244.0.0/16")
    assert c.enable_ipv4 is True and c.enable_ipv6 is False and c.ipv6_network is None
    assert c.backend_type == "vxlan" and c.backend == {"Type": "vxlan"}
    assert c.vxlan == VXLANConfig(vni=1, port=0, gbp=False, learning=False, direct_routing=False, mtu=0)
    # kube mode does not derive the subnet range
    assert (c.subnet_len, c.subnet_min, c.subnet_max) == (0, None, None)


def test_config_is_frozen_and_hashable() -> None:
    c = conf(Network="10.244.0.0/16", Backend=VXLAN)
    with pytest.raises(AttributeError):
        c.network = None  # type: ignore[misc]
    hash(c)


def test_keys_are_case_insensitive_and_unknown_keys_ignored() -> None:
    c = parse('{"network": "10.1.0.0/16", "ENABLEIPV6": true, "iPv6nEtWoRk": "fd00::/48", '
              '"subnetlen": 26, "backend": {"type": "VXLAN", "vni": 4, "PORT": 4789, "gbp": true, '
              '"LEARNING": true, "directrouting": true, "mtu": 1400, "Whatever": 1}, "Other": [1]}')
    assert c.network == IPv4Network("10.1.0.0/16") and c.subnet_len == 26
    assert c.enable_ipv6 and c.ipv6_network == IPv6Network("fd00::/48")
    assert c.backend_type == "vxlan"
    assert c.vxlan == VXLANConfig(vni=4, port=4789, gbp=True, learning=True, direct_routing=True, mtu=1400)


def test_later_duplicate_key_wins() -> None:
    assert parse('{"Network": "10.1.0.0/16", "network": "10.2.0.0/16", "Backend": {"Type": "vxlan"}}'
                 ).network == IPv4Network("10.2.0.0/16")


def test_network_host_bits_are_masked() -> None:
    assert conf(Network="10.244.1.5/16", Backend=VXLAN).network == IPv4Network("10.244.0.0/16")
    assert conf(True, EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00::1/64",
                Backend=VXLAN).ipv6_network == IPv6Network("fd00::/64")


def test_missing_backend_is_udp() -> None:
    assert keys_error(Network="10.244.0.0/16") == "error parsing subnet config: unknown backend type: udp"
    assert keys_error(True, Network="10.244.0.0/16", Backend=None) == \
        "error parsing subnet config: unknown backend type: udp"


def test_empty_backend_has_empty_type() -> None:
    assert keys_error(True, Network="10.244.0.0/16", Backend={}) == \
        "error parsing subnet config: unknown backend type: "
    assert keys_error(True, Network="10.244.0.0/16", Backend={"Type": "ipip"}) == \
        "error parsing subnet config: unknown backend type: ipip"


def test_backend_type_is_lower_cased_and_backend_kept_raw() -> None:
    c = conf(True, Network="10.244.0.0/16", Backend={"Type": "VxLaN", "VNI": 2, "Extra": {"a": [1]}})
    assert c.backend_type == "vxlan" and c.backend == {"Type": "VxLaN", "VNI": 2, "Extra": {"a": [1]}}
    assert c.vxlan is not None and c.vxlan.vni == 2


def test_backend_decode_errors() -> None:
    assert keys_error(Network="10.244.0.0/16", Backend="vxlan") == \
        ("error parsing subnet config: error decoding Backend property of config: "
         'expected a JSON object, got string "vxlan"')
    assert keys_error(Network="10.244.0.0/16", Backend={"Type": 1}) == \
        "error parsing subnet config: error decoding Backend property of config: Type: expected a string, got number 1"


@pytest.mark.parametrize("key,value,reason", [
    ("VNI", "1", 'VNI: expected an integer, got string "1"'),
    ("vni", 1.5, "VNI: expected an integer, got number 1.5"),
    ("Port", True, "Port: expected an integer, got bool true"),
    ("GBP", 1, "GBP: expected true or false, got number 1"),
    ("Learning", "true", 'Learning: expected true or false, got string "true"'),
    ("DirectRouting", [], "DirectRouting: expected true or false, got array"),
    ("MTU", {}, "MTU: expected an integer, got object"),
])
def test_vxlan_type_errors(key: str, value: Any, reason: str) -> None:
    assert keys_error(True, Network="10.244.0.0/16", Backend={"Type": "vxlan", key: value}) == \
        "error parsing subnet config: error decoding VXLAN backend config: " + reason


def test_vxlan_null_keeps_default() -> None:
    c = conf(True, Network="10.244.0.0/16", Backend={"Type": "vxlan", "VNI": None})
    assert c.vxlan is not None and c.vxlan.vni == 1


@pytest.mark.parametrize("kube", [True, False])
def test_vxlan_ranges(kube: bool) -> None:
    for vni in (0, 16777215):
        assert conf(kube, Network="10.244.0.0/16", Backend={"Type": "vxlan", "VNI": vni}).vxlan == VXLANConfig(vni=vni)
    assert keys_error(kube, Network="10.244.0.0/16", Backend={"Type": "vxlan", "VNI": 16777216}) == \
        "error parsing subnet config: Backend.VNI: 16777216 is out of range 0..16777215"
    assert keys_error(kube, Network="10.244.0.0/16", Backend={"Type": "vxlan", "VNI": -1}) == \
        "error parsing subnet config: Backend.VNI: -1 is out of range 0..16777215"
    assert keys_error(kube, Network="10.244.0.0/16", Backend={"Type": "vxlan", "Port": 65536}) == \
        "error parsing subnet config: Backend.Port: 65536 is out of range 0..65535"
    assert conf(kube, Network="10.244.0.0/16", Backend={"Type": "vxlan", "Port": 65535}).vxlan == VXLANConfig(port=65535)


@pytest.mark.parametrize("kube", [True, False])
def test_vxlan_mtu_range(kube: bool) -> None:
    for mtu in (0, 118, 1500, 9000, 65535):
        assert conf(kube, Network="10.244.0.0/16", Backend={"Type": "vxlan", "MTU": mtu}).vxlan == VXLANConfig(mtu=mtu)
    for mtu in (-1, 1, 117, 65536):
        assert keys_error(kube, Network="10.244.0.0/16", Backend={"Type": "vxlan", "MTU": mtu}) == \
            "error parsing subnet config: Backend.MTU: %d is out of range 118..65535 (or 0 for the interface's MTU)" % mtu


@pytest.mark.parametrize("mtu,iface_mtu,device_mtu", [
    (0, 1500, 1450),  # flanneld v0.20.2: the interface's MTU less 50
    (0, 9000, 8950),
    (1400, 1500, 1350),  # flannel v0.21.3's MTU key
    (9000, 9001, 8950),
    (9000, 1500, 1450),  # never above the interface's: the kernel caps the device there
    (1500, 1500, 1450),
])
def test_vxlan_device_mtu(mtu: int, iface_mtu: int, device_mtu: int) -> None:
    assert VXLANConfig(mtu=mtu).device_mtu(iface_mtu) == device_mtu


MTU_PROBE = r"""
import json, subprocess, sys
from ipaddress import IPv4Address, IPv4Network
from pyflannel.backend.vxlan import VXLANNetwork, log_config
from pyflannel.config import VXLANConfig
from pyflannel.family import IPV4
from pyflannel.ip import ExtAddr, ExternalInterface
from pyflannel.netlink import Netlink

subprocess.run("ip link add eth1 type veth peer name eth1p".split(), check=True)
subprocess.run("ip addr add 192.168.56.11/24 dev eth1".split(), check=True)
nl = Netlink()
addr = IPv4Address("192.168.56.11")
ext = ExternalInterface("eth1", nl.link(name="eth1")["index"], 1500, {IPV4: ExtAddr(addr, addr)})
out = []
for mtu in json.loads(sys.argv[1]):
    log_config(VXLANConfig(mtu=mtu), ext)
    backend = VXLANNetwork(nl, VXLANConfig(mtu=mtu), IPV4, ext, IPv4Network("10.244.0.0/16"))
    device = backend.create_device()
    out.append([backend.mtu, nl.link(name=device.name).get_attr("IFLA_MTU")])
    subprocess.run(["ip", "link", "del", device.name], check=True)
print(json.dumps(out))
"""


@pytest.mark.netns
@needs_netns
def test_vxlan_mtu_reaches_the_device_and_subnet_env_alike() -> None:
    """The MTU pyflannel writes to subnet.env (backend.mtu) is the device's, as the kernel made it."""
    ns = "pfcf" + secrets.token_hex(2)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", MTU_PROBE, "[1400, 0, 9000, 1500]"],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=30)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [[1350, 1350], [1450, 1450], [1450, 1450], [1450, 1450]]
    assert "MTU 9000 in net-conf.json's Backend is more than eth1's MTU 1500 allows; the device and the pods get " \
           "1450" in res.stderr


def test_multi_network_and_nftables_keys_are_parsed() -> None:
    c = conf(Network="10.244.0.0/16", Networks=["10.1.0.0/16", "10.2.0.1/16"], IPv6Networks=["fd00::/48"],
             EnableNFTables=True, Backend=VXLAN)
    assert c.network_list == (IPv4Network("10.1.0.0/16"), IPv4Network("10.2.0.0/16"))
    assert c.ipv6_network_list == (IPv6Network("fd00::/48"),) and c.enable_nftables is True
    assert conf(Network="10.244.0.0/16", Networks=None, Backend=VXLAN).network_list == ()
    assert keys_error(Network="10.244.0.0/16", Networks="10.1.0.0/16", Backend=VXLAN) == \
        'error parsing subnet config: Networks: expected an array, got string "10.1.0.0/16"'
    assert keys_error(Network="10.244.0.0/16", IPv6Networks=["10.1.0.0/16"], Backend=VXLAN) == \
        "error parsing subnet config: IPv6Networks: not an IPv6 network: 10.1.0.0/16"
    assert keys_error(Network="10.244.0.0/16", EnableNFTables="yes", Backend=VXLAN) == \
        'error parsing subnet config: EnableNFTables: expected true or false, got string "yes"'


@pytest.mark.parametrize("keys,reason", [
    ({"Network": "foo"}, "Network: invalid CIDR address: foo"),
    ({"Network": "10.244.0.0/33"}, "Network: invalid CIDR address: 10.244.0.0/33"),
    ({"Network": "10.244.0.0"}, "Network: invalid CIDR address: 10.244.0.0"),
    ({"Network": "10.244.0.0/255.255.0.0"}, "Network: invalid CIDR address: 10.244.0.0/255.255.0.0"),
    ({"Network": "fd00::/8"}, "Network: not an IPv4 network: fd00::/8"),
    ({"Network": 10}, "Network: expected a string, got number 10"),
    ({"IPv6Network": "10.0.0.0/8"}, "IPv6Network: not an IPv6 network: 10.0.0.0/8"),
    ({"EnableIPv4": "true"}, 'EnableIPv4: expected true or false, got string "true"'),
    ({"EnableIPv6": 1}, "EnableIPv6: expected true or false, got number 1"),
    ({"SubnetLen": "24"}, 'SubnetLen: expected a non-negative integer, got string "24"'),
    ({"SubnetLen": -1}, "SubnetLen: expected a non-negative integer, got number -1"),
    ({"SubnetLen": 24.0}, "SubnetLen: expected a non-negative integer, got number 24.0"),
    ({"IPv6SubnetLen": True}, "IPv6SubnetLen: expected a non-negative integer, got bool true"),
    ({"SubnetMin": "10.244.1"}, "SubnetMin: Invalid IP address format"),
    ({"SubnetMax": "fd00::"}, "SubnetMax: Invalid IP address format"),
    ({"SubnetMin": 5}, "SubnetMin: expected a string, got number 5"),
    ({"IPv6SubnetMin": "10.0.0.1"}, "IPv6SubnetMin: Invalid IP address format"),
])
def test_field_errors_name_the_key(keys: dict[str, Any], reason: str) -> None:
    for kube in (True, False):
        assert keys_error(kube, **{"Network": "10.244.0.0/16", "Backend": VXLAN, **keys}) == \
            "error parsing subnet config: " + reason


def test_top_level_must_be_an_object() -> None:
    assert error("[]") == "error parsing subnet config: expected a JSON object, got array"
    assert error('"x"') == 'error parsing subnet config: expected a JSON object, got string "x"'
    # null decodes to nothing, as in Go: the defaults apply
    assert error("null", kube=True) == \
        "error parsing subnet config: please define a correct Network parameter in the flannel config"


def test_malformed_json() -> None:
    assert error('{"Network": "10.244.0.0/16",}') == \
        "error parsing subnet config: Expecting property name enclosed in double quotes: line 1 column 29 (char 28)"
    assert error("") == "error parsing subnet config: Expecting value: line 1 column 1 (char 0)"
    assert error('{"SubnetLen": NaN}') == "error parsing subnet config: NaN is not valid JSON"


# --- CheckNetworkConfig (kube=False) ------------------------------------------------------------------

@pytest.mark.parametrize("network,subnet_len,lo,hi", [
    ("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0"),
    ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
    ("10.244.0.0/22", 24, "10.244.1.0", "10.244.3.0"),
    ("10.244.0.0/23", 25, "10.244.0.128", "10.244.1.128"),
    ("10.244.0.0/28", 30, "10.244.0.4", "10.244.0.12"),
])
def test_derived_subnet_range(network: str, subnet_len: int, lo: str, hi: str) -> None:
    c = conf(Network=network, Backend=VXLAN)
    assert (c.subnet_len, c.subnet_min, c.subnet_max) == (subnet_len, IPv4Address(lo), IPv4Address(hi))


def test_given_subnet_range() -> None:
    c = conf(Network="10.244.0.0/16", SubnetLen=26, SubnetMin="10.244.8.0", SubnetMax="10.244.9.192", Backend=VXLAN)
    assert (c.subnet_len, c.subnet_min, c.subnet_max) == (26, IPv4Address("10.244.8.0"), IPv4Address("10.244.9.192"))
    c = conf(Network="10.244.0.0/16", SubnetLen=20, Backend=VXLAN)
    assert (c.subnet_min, c.subnet_max) == (IPv4Address("10.244.16.0"), IPv4Address("10.244.240.0"))
    # 0.0.0.0 means "not given", as in flanneld
    assert conf(Network="10.244.0.0/16", SubnetMin="0.0.0.0", Backend=VXLAN).subnet_min == IPv4Address("10.244.1.0")


@pytest.mark.parametrize("keys,reason", [
    ({"Network": None}, "please define a correct Network parameter in the flannel config"),
    ({"Network": "0.0.0.0/0"}, "please define a correct Network parameter in the flannel config"),
    ({"SubnetLen": 31}, "SubnetLen must be less than /31"),
    ({"SubnetLen": 17}, "network must be able to accommodate at least four subnets"),
    ({"Network": "10.244.0.0/29"}, "network is too small. Minimum useful network prefix is /28"),
    ({"SubnetMin": "10.245.0.0"}, "SubnetMin is not in the range of the Network"),
    ({"SubnetMax": "10.243.255.0"}, "SubnetMax is not in the range of the Network"),
    ({"SubnetMin": "10.244.1.1"}, "SubnetMin is not on a SubnetLen boundary: 10.244.1.1"),
    ({"SubnetMax": "10.244.1.128"}, "SubnetMax is not on a SubnetLen boundary: 10.244.1.128"),
    ({"EnableIPv4": False}, "none defined stack"),
    ({"EnableIPv6": True}, "please define a correct IPv6Network parameter in the flannel config"),
    ({"EnableIPv6": True, "IPv6Network": "::/0"},
     "please define a correct IPv6Network parameter in the flannel config"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/48", "IPv6SubnetLen": 127}, "SubnetLen must be less than /127"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/48", "IPv6SubnetLen": 49},
     "network must be able to accommodate at least four subnets"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/125"},
     "IPv6Network is too small. Minimum useful network prefix is /124"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd01::"},
     "IPv6SubnetMin is not in the range of the IPv6Network"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/48", "IPv6SubnetMax": "fd01::"},
     "IPv6SubnetMax is not in the range of the IPv6Network"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd00:0:0:1::1"},
     "IPv6SubnetMin is not on a SubnetLen boundary: fd00:0:0:1::1"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/48", "IPv6SubnetMax": "fd00:0:0:1:8000::"},
     "IPv6SubnetMax is not on a SubnetLen boundary: fd00:0:0:1:8000::"),
])
def test_check_network_config_errors(keys: dict[str, Any], reason: str) -> None:
    assert keys_error(**{"Network": "10.244.0.0/16", "Backend": VXLAN, **keys}) == \
        "error parsing subnet config: " + reason


@pytest.mark.parametrize("network,subnet_len,lo,hi", [
    ("fd00::/48", 64, "fd00:0:0:1::", "fd00:0:0:ffff::"),
    ("fd00::/62", 64, "fd00:0:0:1::", "fd00:0:0:3::"),
    ("fd00::/64", 66, "fd00::4000:0:0:0", "fd00::c000:0:0:0"),
    ("fd00::/124", 126, "fd00::4", "fd00::c"),
])
def test_ipv6_derivation(network: str, subnet_len: int, lo: str, hi: str) -> None:
    c = conf(EnableIPv4=False, EnableIPv6=True, IPv6Network=network, Backend=VXLAN)
    assert (c.ipv6_subnet_len, c.ipv6_subnet_min, c.ipv6_subnet_max) == (subnet_len, IPv6Address(lo), IPv6Address(hi))
    assert c.network is None and (c.subnet_len, c.subnet_min, c.subnet_max) == (0, None, None)


def test_dual_stack() -> None:
    c = conf(Network="10.244.0.0/16", EnableIPv6=True, IPv6Network="fd00:10:244::/56", Backend=VXLAN)
    assert c.subnet_len == 24 and c.ipv6_subnet_len == 64
    assert c.ipv6_subnet_min == IPv6Address("fd00:10:244:1::")


# --- kube mode ------------------------------------------------------------------------------------------

def test_kube_mode_ignores_subnet_len_min_max() -> None:
    c = conf(True, Network="10.244.0.0/29", SubnetLen=31, SubnetMin="10.1.1.1", SubnetMax="10.244.0.3", Backend=VXLAN)
    assert (c.subnet_len, c.subnet_min, c.subnet_max) == (31, IPv4Address("10.1.1.1"), IPv4Address("10.244.0.3"))
    c = conf(True, EnableIPv6=True, IPv6Network="fd00::/126", IPv6SubnetLen=200, Network="10.0.0.0/8", Backend=VXLAN)
    assert c.ipv6_subnet_len == 200 and c.ipv6_subnet_min is None


@pytest.mark.parametrize("keys,reason", [
    ({"Network": None}, "please define a correct Network parameter in the flannel config"),
    ({"EnableIPv6": True}, "please define a correct IPv6Network parameter in the flannel config"),
    ({"EnableIPv4": False}, "none defined stack"),
    ({"Backend": {"Type": "udp"}}, "unknown backend type: udp"),
])
def test_kube_mode_errors(keys: dict[str, Any], reason: str) -> None:
    assert keys_error(True, **{"Network": "10.244.0.0/16", "Backend": VXLAN, **keys}) == \
        "error parsing subnet config: " + reason


def test_kube_mode_ipv6_only() -> None:
    c = conf(True, EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00::/56", Backend=VXLAN)
    assert c.network is None and c.ipv6_network == IPv6Network("fd00::/56")


# --- load -----------------------------------------------------------------------------------------------

def test_load(tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    assert load(str(path), kube=True).network == IPv4Network("10.244.0.0/16")
    assert load(str(path)).subnet_len == 24


def test_load_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert str(exc.value) == "failed to read net conf: open %s: no such file or directory" % path


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(str(tmp_path))
    assert str(exc.value) == "failed to read net conf: read %s: is a directory" % tmp_path


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text("{}")
    path.chmod(0)
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    assert str(exc.value) == "failed to read net conf: open %s: permission denied" % path


def test_load_malformed_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text('{\n  "Network": "10.244.0.0/16"\n  "Backend": {"Type": "vxlan"}\n}\n')
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    assert str(exc.value) == \
        "error parsing subnet config: %s: Expecting ',' delimiter: line 3 column 3 (char 33)" % path


def test_load_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text('{"Network": "foo", "Backend": {"Type": "vxlan"}}')
    with pytest.raises(ConfigError) as exc:
        load(str(path), kube=True)
    assert str(exc.value) == "error parsing subnet config: Network: invalid CIDR address: foo"


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("keys,message", [
    ({"Networks": ["10.1.0.0/16"]},
     "Networks: 10.1.0.0/16 differs from Network 10.244.0.0/16; flannel ignores Networks since v0.25 and used its "
     "first entry as the network up to v0.20: remove Networks, and name the network you mean in Network"),
    ({"Networks": ["10.244.0.0/16", "10.2.0.0/16"]}, "Networks: 10.2.0.0/16 differs from Network 10.244.0.0/16; "),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/48", "IPv6Networks": ["fd00::/56"]},
     "IPv6Networks: fd00::/56 differs from IPv6Network fd00::/48; "),
])
def test_load_refuses_what_pyflannel_does_not_implement(tmp_path: Path, keys: dict[str, Any], message: str) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text(json.dumps({"Network": "10.244.0.0/16", "Backend": VXLAN, **keys}))
    for kube in (True, False):
        with pytest.raises(ConfigError) as exc:
            load(str(path), kube=kube)
        assert str(exc.value).startswith(message)
    with pytest.raises(ConfigError):
        check_supported(parse(path.read_text(), kube=True))


@pytest.mark.parametrize("keys,warning", [
    ({"Networks": ["10.244.0.0/16"]}, "Networks in net-conf.json is ignored: it names the same network as Network "
                                      "(flannel reads only Network since v0.21); remove it"),
    ({"Networks": ["10.244.0.0/16", "10.244.0.0/16"]}, "Networks in net-conf.json is ignored: it names the same "),
    ({"IPv6Networks": ["fd00::/56"]}, "IPv6Networks in net-conf.json is ignored: IPv6 is not enabled (flannel reads "
                                      "only IPv6Network since v0.21); remove it"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/56", "IPv6Networks": ["fd00::/56"]},
     "IPv6Networks in net-conf.json is ignored: it names the same network as IPv6Network "),
    ({"Networks": []}, None),
])
def test_a_leftover_network_list_that_changes_nothing_runs_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, keys: dict[str, Any], warning: str | None) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text(json.dumps({"Network": "10.244.0.0/16", "Backend": VXLAN, **keys}))
    with caplog.at_level(logging.WARNING, logger="pyflannel.config"):
        cfg = load(str(path), kube=True)
    assert cfg.network == IPv4Network("10.244.0.0/16")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == (warning is not None) and all(w.startswith(warning or "") for w in warnings)


def test_a_network_only_in_networks_is_refused_with_the_fix() -> None:
    assert keys_error(Networks=["10.244.0.0/16"], Backend=VXLAN) == (
        "error parsing subnet config: please define a correct Network parameter in the flannel config (Networks is not "
        "read since flannel v0.21: name the network in Network)")
    assert keys_error(EnableIPv4=False, EnableIPv6=True, IPv6Networks=["fd00::/56"], Backend=VXLAN).endswith(
        "IPv6Network parameter in the flannel config (IPv6Networks is not read since flannel v0.21: name the network "
        "in IPv6Network)")


def test_load_accepts_ipv4_only_with_ipv6_keys_off(tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text(json.dumps({"Network": "10.244.0.0/16", "EnableIPv4": True, "EnableIPv6": False,
                                "IPv6Network": "fd00::/48", "Networks": [], "EnableNFTables": False,
                                "Backend": {"Type": "vxlan", "MTU": 1400}}))
    c = load(str(path), kube=True)
    assert c.ipv6_network == IPv6Network("fd00::/48") and c.vxlan == VXLANConfig(mtu=1400)


def test_load_accepts_nftables_mode(tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text(json.dumps({"Network": "10.244.0.0/16", "EnableNFTables": True, "Backend": VXLAN}))
    for kube in (True, False):
        assert load(str(path), kube=kube).enable_nftables is True


def test_load_checks_ipv6_keys_before_refusing(tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text(json.dumps({"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00::1",
                                "Backend": VXLAN}))
    with pytest.raises(ConfigError) as exc:
        load(str(path), kube=True)
    assert str(exc.value) == "error parsing subnet config: IPv6Network: invalid CIDR address: fd00::1"


# --- stacks and backends (issue 9) ----------------------------------------------------------------------

@pytest.mark.parametrize("keys,networks", [
    ({"Network": "10.244.0.0/16"}, {IPV4: IPv4Network("10.244.0.0/16")}),
    ({"Network": "10.244.0.0/16", "IPv6Network": "fd00:10:244::/56"}, {IPV4: IPv4Network("10.244.0.0/16")}),
    ({"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::1/56"},
     {IPV4: IPv4Network("10.244.0.0/16"), IPV6: IPv6Network("fd00:10:244::/56")}),
    ({"enableipv4": False, "ENABLEIPV6": True, "ipv6network": "fd00:10:244::/56"},
     {IPV6: IPv6Network("fd00:10:244::/56")}),
    ({"Network": "10.244.0.0/16", "EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00::/56"},
     {IPV6: IPv6Network("fd00::/56")}),
])
def test_networks_are_the_enabled_families(tmp_path: Path, keys: dict[str, Any],
                                           networks: dict[Family, IPv4Network | IPv6Network]) -> None:
    path = tmp_path / "net-conf.json"
    for backend in ({"Type": "vxlan"}, {"Type": "host-gw"}):
        path.write_text(json.dumps({**keys, "Backend": backend}))
        c = load(str(path), kube=True)
        assert c.networks == networks and list(c.networks) == [f for f in (IPV4, IPV6) if f in networks]


def test_host_gw_backend() -> None:
    c = conf(True, Network="10.244.0.0/16", Backend={"Type": "host-gw"})
    assert c.backend_type == "host-gw" and c.vxlan is None
    c = conf(True, Network="10.244.0.0/16", Backend={"Type": "HOST-GW", "DirectRouting": "x"})  # no keys of its own
    assert c.backend_type == "host-gw"


@pytest.mark.parametrize("keys,reason", [
    ({"EnableIPv6": True}, "please define a correct IPv6Network parameter in the flannel config"),
    ({"EnableIPv6": True, "IPv6Network": "::/0"},
     "please define a correct IPv6Network parameter in the flannel config"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::1"}, "IPv6Network: invalid CIDR address: fd00::1"),
    ({"EnableIPv6": True, "IPv6Network": "10.0.0.0/8"}, "IPv6Network: not an IPv6 network: 10.0.0.0/8"),
    ({"EnableIPv6": "yes", "IPv6Network": "fd00::/56"}, 'EnableIPv6: expected true or false, got string "yes"'),
    ({"EnableIPv4": False}, "none defined stack"),
    ({"EnableIPv4": False, "EnableIPv6": False, "IPv6Network": "fd00::/56"}, "none defined stack"),
])
def test_stack_errors(keys: dict[str, Any], reason: str) -> None:
    for kube in (True, False):
        assert keys_error(kube, **{"Network": "10.244.0.0/16", "Backend": VXLAN, **keys}) == \
            "error parsing subnet config: " + reason
