"""subnet.env: flanneld's exact format, written atomically."""

from __future__ import annotations

import os
import stat
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from pyflannel import subnetfile
from pyflannel.family import IPV4, IPV6

V4 = (IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"))
V6 = (IPv6Network("fd00:10:244::/56"), IPv6Network("fd00:10:244::/64"))
ENV = subnetfile.SubnetEnv({IPV4: V4}, 1450, True)


def test_render_is_flanneld_format() -> None:
    assert ENV.render() == ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
                            "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    off = subnetfile.SubnetEnv({IPV4: (IPv4Network("10.0.0.0/8"), IPv4Network("10.5.0.0/16"))}, 8950, False)
    assert off.render() == "FLANNEL_NETWORK=10.0.0.0/8\nFLANNEL_SUBNET=10.5.0.1/16\nFLANNEL_MTU=8950\nFLANNEL_IPMASQ=false\n"


def test_render_dual_stack_and_ipv6_only() -> None:
    """Spec §5, byte for byte: the IPv4 pair, then the IPv6 pair, whatever the dict's order."""
    dual = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.0.1/24\n"
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244::1/64\n"
            "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    v4 = (IPv4Network("10.244.0.0/16"), IPv4Network("10.244.0.0/24"))
    assert subnetfile.SubnetEnv({IPV4: v4, IPV6: V6}, 1450, True).render() == dual
    assert subnetfile.SubnetEnv({IPV6: V6, IPV4: v4}, 1450, True).render() == dual
    assert subnetfile.SubnetEnv({IPV6: V6}, 1450, True).render() == (
        "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244::1/64\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    odd = (IPv6Network("fd00:10:244::/48"), IPv6Network("fd00:10:244:1:2::/80"))
    assert "FLANNEL_IPV6_SUBNET=fd00:10:244:1:2::1/80\n" in subnetfile.SubnetEnv({IPV6: odd}, 1430, False).render()


def test_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "run" / "flannel" / "subnet.env"
    subnetfile.write(str(path), ENV)
    assert path.read_text() == ENV.render()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    inode = path.stat().st_ino
    other = subnetfile.SubnetEnv({IPV4: (V4[0], IPv4Network("10.244.7.0/24"))}, 1450, True)
    subnetfile.write(str(path), other)
    assert path.read_text() == other.render()
    assert path.stat().st_ino != inode, "the file must be replaced by rename, never rewritten in place"
    assert os.listdir(path.parent) == ["subnet.env"]


def test_read_previous(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "subnet.env"
    assert subnetfile.read_previous(str(path), IPV4) == (None, None)
    subnetfile.write(str(path), ENV)
    assert subnetfile.read_previous(str(path), IPV4) == V4
    assert subnetfile.read_previous(str(path), IPV6) == (None, None)
    path.write_text("FLANNEL_NETWORK=garbage\nFLANNEL_SUBNET=10.244.3.1/24\n")
    assert subnetfile.read_previous(str(path), IPV4) == (None, IPv4Network("10.244.3.0/24"))
    assert "Couldn't parse previous FLANNEL_NETWORK from subnet file at %s: " % path in caplog.text


def test_read_previous_ipv6(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "subnet.env"
    subnetfile.write(str(path), subnetfile.SubnetEnv({IPV4: V4, IPV6: V6}, 1450, True))
    assert subnetfile.read_previous(str(path), IPV6) == V6
    assert subnetfile.read_previous(str(path), IPV4) == V4
    path.write_text("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=10.0.0.1/24\n")
    assert subnetfile.read_previous(str(path), IPV6) == (V6[0], None)
    assert "Couldn't parse previous FLANNEL_IPV6_SUBNET from subnet file at %s: " % path in caplog.text


def test_parse_reads_as_the_cni_plugin_does(tmp_path: Path) -> None:
    assert subnetfile.parse(ENV.render()) == {"FLANNEL_NETWORK": "10.244.0.0/16", "FLANNEL_SUBNET": "10.244.1.1/24",
                                              "FLANNEL_MTU": "1450", "FLANNEL_IPMASQ": "true"}
    assert subnetfile.parse("# comment\nA=b=c\n\nnoequals\r\nB=\n") == {"A": "b=c", "B": ""}
    assert subnetfile.read(str(tmp_path / "missing")) is None
    (tmp_path / "subnet.env").write_text(ENV.render())
    assert subnetfile.read(str(tmp_path / "subnet.env")) == subnetfile.parse(ENV.render())
    (tmp_path / "subnet.env").write_bytes(b"FLANNEL_MTU=\xff\n")
    assert subnetfile.read(str(tmp_path / "subnet.env")) == {"FLANNEL_MTU": "\ufffd"}


def test_keeper_puts_the_file_back_only_when_it_differs(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    keeper = subnetfile.Keeper(str(path), ENV)
    assert keeper.check() == "it was missing"  # never written yet, e.g. the first write failed
    inode = path.stat().st_ino
    assert keeper.check() == ""
    os.utime(path)  # touched, same contents: read once, not written
    assert keeper.check() == "" and path.stat().st_ino == inode
    path.unlink()
    assert keeper.check() == "it was missing"
    assert path.read_text() == ENV.render()
    path.write_text(ENV.render().replace("1450", "1500"))
    assert keeper.check() == "its contents had changed"
    path.write_bytes(b"\xff")
    assert keeper.check() == "its contents had changed"
    assert path.read_text() == ENV.render()
    inode = path.stat().st_ino
    assert keeper.check() == "" and path.stat().st_ino == inode
