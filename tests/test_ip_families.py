"""Interface selection for IPv6 and dual-stack (spec §4.2), on the fake kernel boundary."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from pyflannel import ip
from pyflannel.family import IPV4, IPV6, Family
from tests.fakenetlink import FakeNetlink

DUAL = (IPV4, IPV6)
V6 = (IPV6,)


def node() -> FakeNetlink:
    """eth0 (10.0.2.15, 2001:db8::15), eth1 (192.168.56.11 then .99; fd56::11 then fd56::aa, link-local),
    both default routes through eth1."""
    nl = FakeNetlink()
    nl.ip_link_add("eth0")
    nl.ip_link_add("eth1", mtu=9000)
    nl.ip_addr_add("eth0", "10.0.2.15/24")
    nl.ip_addr_add("eth0", "2001:db8::15/64")
    nl.ip_addr_add("eth1", "fe80::1/64")
    nl.ip_addr_add("eth1", "192.168.56.11/24")
    nl.ip_addr_add("eth1", "192.168.56.99/24")
    nl.ip_addr_add("eth1", "fd56::aa/64")
    nl.ip_addr_add("eth1", "fd56::11/64")  # the newest global address: the kernel lists it first
    nl.ip_route_add("0.0.0.0/0", "192.168.56.1", "eth1")
    nl.ip_route_add("::/0", "fd56::1", "eth1")
    return nl


def addrs(ext: ip.ExternalInterface) -> dict[Family, tuple[str, str]]:
    return {f: (str(a.iface_addr), str(a.ext_addr)) for f, a in ext.addrs.items()}


def select(nl: FakeNetlink, families: tuple[Family, ...] = DUAL, iface: list[str] = [], regex: list[str] = [],
           reach: str = "", public: str = "", public6: str = "") -> ip.ExternalInterface:
    return ip.select(nl, iface, regex, reach, public, public6, families)


def error(nl: FakeNetlink, **kw: object) -> str:
    with pytest.raises(ip.InterfaceError) as exc:
        select(nl, **kw)  # type: ignore[arg-type]
    return str(exc.value)


def test_dual_default_route(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    ext = select(node())
    assert (ext.name, ext.mtu) == ("eth1", 9000)
    assert addrs(ext) == {IPV4: ("192.168.56.11", "192.168.56.11"), IPV6: ("fd56::11", "fd56::11")}
    assert ext.iface_addr == ip_address("192.168.56.11") and ext.ext_addr == ip_address("192.168.56.11")
    for line in ("Using interface with name eth1 and address 192.168.56.11",
                 "Using interface with name eth1 and v6 address fd56::11",
                 "Defaulting external address to interface address (192.168.56.11)",
                 "Defaulting external v6 address to interface address (fd56::11)"):
        assert line in caplog.messages


def test_dual_default_routes_must_share_the_interface() -> None:
    nl = node()
    nl.ip_route_add("::/0", "2001:db8::1", "eth0")
    assert error(nl) == ("Failed to find any valid interface to use: v6 default route interface eth0 must be the same "
                         "with v4 default route interface eth1")
    nl.ip_route_del("::/0")
    assert error(nl) == "Failed to find any valid interface to use: failed to get default v6 interface: unable to " \
                        "find default v6 route"


def test_dual_iface_by_name_and_public_addresses() -> None:
    assert addrs(select(node(), iface=["eth0"])) == {IPV4: ("10.0.2.15", "10.0.2.15"),
                                                    IPV6: ("2001:db8::15", "2001:db8::15")}
    assert addrs(select(node(), iface=["eth1"], public="203.0.113.5", public6="2001:db8:5::5")) == {
        IPV4: ("192.168.56.11", "203.0.113.5"), IPV6: ("fd56::11", "2001:db8:5::5")}


def test_dual_regex_needs_an_address_of_each_family() -> None:
    nl = node()
    assert select(nl, regex=[r"^(10\.|2001:)"]).name == "eth0"
    ext = select(nl, regex=[r"^(192\.168\.56\.9|fd56::a)"])
    assert addrs(ext) == {IPV4: ("192.168.56.99", "192.168.56.99"), IPV6: ("fd56::aa", "fd56::aa")}
    assert select(nl, regex=[r"^192\.168\.56\.99$", "^eth0$"]).name == "eth0"  # no v6 match on eth1: names next


def test_dual_one_family_given_fills_the_other_from_the_interface() -> None:
    """flanneld v0.20.2 leaves the other family empty (and breaks later); v0.27.4 fills it, as here."""
    nl = node()
    assert addrs(select(nl, iface=["192.168.56.99"])) == {IPV4: ("192.168.56.99", "192.168.56.99"),
                                                          IPV6: ("fd56::11", "fd56::11")}
    assert addrs(select(nl, iface=["fd56::aa"])) == {IPV4: ("192.168.56.11", "192.168.56.11"),
                                                     IPV6: ("fd56::aa", "fd56::aa")}
    assert addrs(select(nl, public="10.0.2.15")) == {IPV4: ("10.0.2.15", "10.0.2.15"),
                                                     IPV6: ("2001:db8::15", "2001:db8::15")}
    assert addrs(select(nl, public6="2001:db8::15")) == {IPV4: ("10.0.2.15", "10.0.2.15"),
                                                         IPV6: ("2001:db8::15", "2001:db8::15")}
    assert addrs(select(nl, reach="2001:db8::99")) == {IPV4: ("10.0.2.15", "10.0.2.15"),
                                                       IPV6: ("2001:db8::15", "2001:db8::15")}


def test_dual_public_addresses_must_share_the_interface() -> None:
    assert addrs(select(node(), public="192.168.56.99", public6="fd56::aa")) == {
        IPV4: ("192.168.56.99", "192.168.56.99"), IPV6: ("fd56::aa", "fd56::aa")}
    assert error(node(), public="192.168.56.11", public6="2001:db8::15") == (
        "Failed to find any valid interface to use: v6 interface eth0 must be the same with v4 interface eth1")


def test_ipv6_only() -> None:
    nl = node()
    ext = select(nl, V6)
    assert ext.name == "eth1" and addrs(ext) == {IPV6: ("fd56::11", "fd56::11")}
    assert addrs(select(nl, V6, iface=["eth0"])) == {IPV6: ("2001:db8::15", "2001:db8::15")}
    # the given address itself (v0.20.2 takes the interface's first; v0.25.7 fixed it)
    assert addrs(select(nl, V6, iface=["fd56::aa"])) == {IPV6: ("fd56::aa", "fd56::aa")}
    assert addrs(select(nl, V6, public6="fd56::aa")) == {IPV6: ("fd56::aa", "fd56::aa")}
    assert addrs(select(nl, V6, iface=["eth1"], public6="2001:db8:5::5")) == {IPV6: ("fd56::11", "2001:db8:5::5")}
    assert addrs(select(nl, V6, reach="2001:db8::99")) == {IPV6: ("2001:db8::15", "2001:db8::15")}
    assert addrs(select(nl, V6, public="192.168.56.99")) == {IPV6: ("fd56::11", "fd56::11")}  # --public-ip unused


def test_ipv6_link_local_only_after_global() -> None:
    nl = node()
    nl.ip_link_add("eth2")
    nl.ip_addr_add("eth2", "fe80::2/64")
    assert addrs(select(nl, V6, iface=["eth2"])) == {IPV6: ("fe80::2", "fe80::2")}
    nl.ip_addr_add("eth2", "fd57::2/64")
    assert addrs(select(nl, V6, iface=["eth2"])) == {IPV6: ("fd57::2", "fd57::2")}


def test_ipv6_errors() -> None:
    nl = node()
    nl.ip_link_add("eth3")
    nl.ip_addr_add("eth3", "172.16.0.3/24")
    assert error(nl, families=V6, iface=["eth3"]) == ("Failed to find any valid interface to use: failed to find "
                                                     "IPv6 address for interface eth3")
    assert error(nl, iface=["eth3"]) == ("Failed to find any valid interface to use: failed to find IPv6 address "
                                         "for interface eth3")
    assert error(nl, families=V6, public6="fd56::99") == (
        "Failed to find any valid interface to use: error looking up v6 interface fd56::99: no interface with "
        "given IPv6 found")
    nl.ip_route_del("::/0")
    assert error(nl, families=V6) == ("Failed to find any valid interface to use: failed to get default v6 "
                                      "interface: unable to find default v6 route")


def test_ipv4_only_is_unchanged() -> None:
    ext = ip.select(node(), ["eth1"], [], "", "")
    assert addrs(ext) == {IPV4: ("192.168.56.11", "192.168.56.11")}


class _Flagged:
    """An address message with IFA_F_* flags, as the kernel sends it (the 32-bit IFA_FLAGS attribute)."""

    def __init__(self, address: str, flags: int) -> None:
        self.attrs = {"IFA_LOCAL": address, "IFA_FLAGS": flags}

    def get_attr(self, name: str) -> object:
        return self.attrs.get(name)

    def __getitem__(self, key: str) -> int:
        return 0


def test_address_preference_follows_the_kernel_s_flags() -> None:
    """Global before link-local, permanent before dynamic, non-temporary before temporary (a privacy
    address), deprecated never; kernel order among equals."""
    flagged = [("fe80::1", ip.IFA_F_PERMANENT), ("fd56::1", ip.IFA_F_TEMPORARY), ("fd56::2", 0),
               ("fd56::3", ip.IFA_F_PERMANENT | ip.IFA_F_DEPRECATED), ("fd56::4", ip.IFA_F_PERMANENT | ip.IFA_F_TEMPORARY),
               ("fd56::5", ip.IFA_F_PERMANENT), ("fd56::6", ip.IFA_F_PERMANENT)]

    class Stub:
        def addresses(self, index: int, family: int) -> list[_Flagged]:
            return [_Flagged(a, f) for a, f in flagged]

    assert [str(a) for a in ip._addresses(Stub(), 1, IPV6)] == [  # type: ignore[arg-type]
        "fd56::5", "fd56::6", "fd56::4", "fd56::2", "fd56::1", "fe80::1"]
