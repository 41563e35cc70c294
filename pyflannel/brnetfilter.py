"""br_netfilter: the kernel module that passes bridged traffic through iptables.

Pods on one node talk across the node's bridge (cni0); only with br_netfilter does that traffic
meet kube-proxy's rules, so a pod reaches a Service whose endpoint is on the same node. flannel
v0.26 checks it at start in iptables mode (v0.28 skips the check in nftables mode) and exits
without it; pyflannel waits for it instead, not ready, and carries on once it is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .family import IPV4, IPV6, Family

__all__ = ["FIXES", "SYSCTLS", "missing", "problem"]

SYSCTLS = {IPV4: "sys/net/bridge/bridge-nf-call-iptables", IPV6: "sys/net/bridge/bridge-nf-call-ip6tables"}
FIXES = ["modprobe br_netfilter",
         "load it at boot: echo br_netfilter > /etc/modules-load.d/br_netfilter.conf"]


def missing(families: Iterable[Family], proc: str = "/proc") -> str:
    """The path of the first sysctl of the enabled ``families`` that br_netfilter provides and that does
    not exist (IPv4's first, as flanneld looks), or '' when the module is loaded."""
    for family in (f for f in (IPV4, IPV6) if f in families):
        path = os.path.join(proc, SYSCTLS[family])
        if not os.path.exists(path):
            return path
    return ""


def problem(path: str) -> str:
    """flanneld's error line for a missing ``path`` (``Failed to check br_netfilter: stat ...``)."""
    return "Failed to check br_netfilter: stat %s: no such file or directory" % path
