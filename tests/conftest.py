"""Shared fixtures: root and network-namespace checks."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def netns_available() -> bool:
    """True when running as root with iproute2's ``ip netns``."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


needs_netns = pytest.mark.skipif(not netns_available(), reason="needs root and network namespaces")
