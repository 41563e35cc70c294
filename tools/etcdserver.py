"""A real etcd (Debian's ``etcd-server``) for tests and the demo: one member, its data in a folder.

It listens on loopback by default, or inside a network namespace (``netns``) on a given address.
``stop()`` and ``start()`` again keep the data, as an etcd restart does; ``close()`` ends it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def free_port() -> int:
    """A TCP port on loopback nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd member.

    With ``tls`` (a dict with ``cert``, ``key``, ``ca`` paths) it serves HTTPS and requires
    client certificates signed by ``ca``.
    """

    def __init__(self, datadir: str | Path, host: str = "127.0.0.1", port: int = 0, peer_port: int = 0,
                 netns: str = "", tls: dict[str, str] | None = None) -> None:
        self.datadir = Path(datadir)
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port()
        self.peer_port = peer_port or free_port()
        self.netns = netns
        self.tls = tls
        scheme = "https" if tls else "http"
        self.url = "%s://%s:%d" % (scheme, host, self.port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = self.datadir / "etcd.log"

    def command(self) -> list[str]:
        peer = "http://%s:%d" % (self.host, self.peer_port)
        cmd = [ETCD, "--name", "default", "--data-dir", str(self.datadir / "data"),
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", "default=" + peer, "--logger", "zap", "--log-level", "warn"]
        if self.tls:
            cmd += ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                    "--trusted-ca-file", self.tls["ca"], "--client-cert-auth"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        return cmd

    def start(self, timeout: float = 20.0) -> None:
        """Start etcd and wait until it answers; raises RuntimeError with its log if it does not."""
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("etcd did not start: %s" % self.log_file.read_text()[-2000:])

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 10,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run Debian's etcdctl (API v3) against this member, inside its namespace if it has one."""
        cmd = [ETCDCTL, "--endpoints", self.url, "--dial-timeout", "2s"]
        if self.tls:
            cmd += ["--cacert", self.tls["ca"], "--cert", self.tls["cert"], "--key", self.tls["key"]]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        res = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, input=input,
                             env=dict(os.environ, ETCDCTL_API="3"))
        if check and res.returncode != 0:
            raise RuntimeError("etcdctl %s failed: %s%s" % (" ".join(args), res.stdout, res.stderr))
        return res

    def healthy(self) -> bool:
        """True when etcd answers."""
        return self.etcdctl("endpoint", "health", check=False).returncode == 0

    def stop(self) -> None:
        """Stop etcd (SIGTERM, then SIGKILL), keeping its data."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "EtcdServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

