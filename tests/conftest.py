"""Shared fixtures: root and network-namespace checks, the in-repo API server."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tools.kubeapi import FakeKubeAPI


def netns_available() -> bool:
    """True when running as root with iproute2's ``ip netns``."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


needs_netns = pytest.mark.skipif(not netns_available(), reason="needs root and network namespaces")


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    """The in-repo API server, without authentication, on a free loopback port."""
    server = FakeKubeAPI()
    server.start()
    yield server
    server.stop()
