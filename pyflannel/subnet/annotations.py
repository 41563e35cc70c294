"""flannel's node annotation keys and their prefix (flanneld v0.20.2 ``subnet/kube/annotations.go``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..family import FAMILIES, IPV4, Family

__all__ = ["AnnotationKeys", "PrefixError", "node_public_ips", "normalize_prefix"]

# Unanchored at the start, like Go's regexp.MatchString; \Z because Python's $ also matches before "\n".
_PREFIX_RE = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?\Z")


class PrefixError(ValueError):
    """The ``--kube-annotation-prefix`` is not usable; the message is flanneld's."""


def normalize_prefix(prefix: str) -> str:
    """The key prefix for ``--kube-annotation-prefix``, e.g. ``flannel.alpha.coreos.com/``.

    Without a slash one is appended; then ``-`` is appended unless the prefix ends in ``/`` or ``-``
    (``example.com/flannel`` gives ``example.com/flannel-``). Raises :class:`PrefixError`.
    """
    slashes = prefix.count("/")
    if slashes > 1:
        raise PrefixError("subnet/kube: prefix can contain at most single slash")
    if slashes == 0:
        prefix += "/"
    if not prefix.endswith(("/", "-")):
        prefix += "-"
    if not _PREFIX_RE.search(prefix):
        raise PrefixError("subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]*")
    return prefix


@dataclass(frozen=True)
class AnnotationKeys:
    """The full annotation keys under one prefix."""

    prefix: str  # normalised, e.g. "flannel.alpha.coreos.com/"
    subnet_kube_managed: str
    backend_type: str
    backend_data: str
    backend_public_ip: str
    backend_public_ip_overwrite: str  # read only: set by users
    backend_v6_data: str
    backend_public_ipv6: str
    backend_public_ipv6_overwrite: str  # read only: set by users

    def data(self, family: Family) -> str:
        """The key of ``family``'s backend data (``backend-data``, ``backend-v6-data``)."""
        return self.prefix + family.data_annotation

    def public_ip(self, family: Family) -> str:
        """The key of ``family``'s public address (``public-ip``, ``public-ipv6``)."""
        return self.prefix + family.public_ip_annotation

    def public_ip_overwrite(self, family: Family) -> str:
        """The key a user sets to overwrite ``family``'s public address (read only)."""
        return self.prefix + family.public_ip_overwrite_annotation

    def node_public_ip(self, family: Family) -> str:
        """The key a user sets to pin ``family``'s public address before the interface is chosen, as
        ``--public-ip(v6)`` would (``node-public-ip``, ``node-public-ipv6``; flannel v0.25.3; read only)."""
        return self.prefix + "node-" + family.public_ip_annotation

    @classmethod
    def from_prefix(cls, prefix: str) -> AnnotationKeys:
        """The keys for ``prefix`` (normalised first); raises :class:`PrefixError`."""
        p = normalize_prefix(prefix)
        return cls(
            prefix=p,
            subnet_kube_managed=p + "kube-subnet-manager",
            backend_type=p + "backend-type",
            backend_data=p + "backend-data",
            backend_public_ip=p + "public-ip",
            backend_public_ip_overwrite=p + "public-ip-overwrite",
            backend_v6_data=p + "backend-v6-data",
            backend_public_ipv6=p + "public-ipv6",
            backend_public_ipv6_overwrite=p + "public-ipv6-overwrite",
        )


def node_public_ips(keys: AnnotationKeys, annotations: Mapping[str, str]) -> dict[Family, str]:
    """The ``node-public-ip(v6)`` annotations of a node that are set, by family: what replaces
    ``--public-ip(v6)``. Raises ValueError naming the annotation when one is not an address of its family."""
    found = {}
    for family in FAMILIES:
        key = keys.node_public_ip(family)
        value = annotations.get(key, "")
        if not value:
            continue
        try:
            family.address(value)
        except ValueError:
            raise ValueError("invalid public %s address: %s (node annotation '%s')"
                             % ("IP" if family is IPV4 else "IPv6", value, key)) from None
        found[family] = value
    return found
