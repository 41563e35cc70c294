"""pyflannel.subnet.annotations: the annotation prefix and keys (flanneld v0.20.2)."""

from __future__ import annotations

import pytest

from pyflannel.subnet.annotations import AnnotationKeys, PrefixError, normalize_prefix


@pytest.mark.parametrize("prefix,normalized", [
    ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/"),
    ("flannel.alpha.coreos.com/", "flannel.alpha.coreos.com/"),
    ("example.com/flannel", "example.com/flannel-"),
    ("example.com/flannel-", "example.com/flannel-"),
    ("example.com/flannel_x-", "example.com/flannel_x-"),
    ("a.b.c_d-e", "a.b.c_d-e/"),
    # the regex is not anchored at the start, so these pass as in flanneld
    ("Example.com", "Example.com/"),
    ("exa mple.com", "exa mple.com/"),
])
def test_normalize(prefix: str, normalized: str) -> None:
    assert normalize_prefix(prefix) == normalized
    assert normalize_prefix(normalized) == normalized


def test_too_many_slashes() -> None:
    with pytest.raises(PrefixError) as exc:
        normalize_prefix("example.com/a/b")
    assert str(exc.value) == "subnet/kube: prefix can contain at most single slash"


@pytest.mark.parametrize("prefix", ["flannel", "", "/", "example.com/Flannel", "example.com/fl.annel",
                                    "example.COM", "example.com/a b",
                                    "example.com/flannel\n"])
def test_bad_format(prefix: str) -> None:
    with pytest.raises(PrefixError) as exc:
        normalize_prefix(prefix)
    assert str(exc.value) == "subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]*"


def test_prefix_error_is_a_value_error() -> None:
    assert issubclass(PrefixError, ValueError)


def test_default_keys() -> None:
    k = AnnotationKeys.from_prefix("flannel.alpha.coreos.com")
    assert k.prefix == "flannel.alpha.coreos.com/"
    assert k.subnet_kube_managed == "flannel.alpha.coreos.com/kube-subnet-manager"
    assert k.backend_type == "flannel.alpha.coreos.com/backend-type"
    assert k.backend_data == "flannel.alpha.coreos.com/backend-data"
    assert k.backend_public_ip == "flannel.alpha.coreos.com/public-ip"
    assert k.backend_public_ip_overwrite == "flannel.alpha.coreos.com/public-ip-overwrite"
    assert k.backend_v6_data == "flannel.alpha.coreos.com/backend-v6-data"
    assert k.backend_public_ipv6 == "flannel.alpha.coreos.com/public-ipv6"
    assert k.backend_public_ipv6_overwrite == "flannel.alpha.coreos.com/public-ipv6-overwrite"


def test_keys_with_dash_prefix() -> None:
    k = AnnotationKeys.from_prefix("example.com/flannel")
    assert k.backend_data == "example.com/flannel-backend-data"
    assert k.backend_public_ipv6_overwrite == "example.com/flannel-public-ipv6-overwrite"
    assert AnnotationKeys.from_prefix("example.com/flannel-") == k


def test_keys_are_frozen() -> None:
    k = AnnotationKeys.from_prefix("flannel.alpha.coreos.com")
    with pytest.raises(AttributeError):
        k.backend_data = "x"  # type: ignore[misc]


def test_from_prefix_rejects_bad_prefix() -> None:
    with pytest.raises(PrefixError):
        AnnotationKeys.from_prefix("a/b/c")
