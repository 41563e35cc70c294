"""The image's size and start-up: what an admin pulls, and what each pod start costs.

    python -m bench.image [--image localhost/pyflannel:dev] [--runs 10]

Run from the repository root, as root, after scripts/build-image.sh (it builds or finds the image).
Prints:

- the size uncompressed (containers-storage) and compressed as a registry serves it (the gzip'ed layer
  blobs of ``skopeo copy`` into an OCI layout, plus config and manifest), and the layers with their
  sizes and the instruction that made each;
- what takes the space inside (du of the main directories), and the Debian packages that are build
  tools (pip, compilers): there must be none;
- inside a running container (podman, no network): the median of --runs wall times of ``python3 -c
  pass`` (the interpreter), ``/opt/bin/flanneld --version``, importing the daemon's modules
  (``pyflannel.daemon`` and ``pyflannel.kubeclient``, what a start-up imports before its first API
  call), and ``/opt/bin/install-conf`` copying the CNI config (the install-cni init container).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.kubelet import PODMAN_ULIMITS, podman

MB = 1_000_000
GOAL_COMPRESSED_MB = 60
BUILD_TOOLS = ("python3-pip", "python3-setuptools", "python3-wheel", "python3-dev", "gcc", "g++", "cpp", "make",
               "build-essential", "libc6-dev", "binutils")
# The timed commands, run inside the container by its own Python: wall seconds, median of --runs.
TIMED = {
    "python3 -c pass": ["python3", "-c", "pass"],
    "flanneld --version": ["/opt/bin/flanneld", "--version"],
    "import pyflannel.daemon, kubeclient": ["/opt/pyflannel/bin/python", "-c", "import pyflannel.daemon, pyflannel.kubeclient"],
    "install-conf (10-flannel.conflist)": ["/opt/bin/install-conf", "/etc/hostname", "/tmp/10-flannel.conflist"],
}
TIMER = """
import json, statistics, subprocess, sys, time
cmd, runs = json.loads(sys.argv[1]), int(sys.argv[2])
times = []
for _ in range(runs):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times.append(time.perf_counter() - t)
print(statistics.median(times))
"""


def compressed_size(image: str) -> tuple[int, list[int]]:
    """Bytes a registry serves (gzip'ed layers + config + manifest) and each layer blob's size."""
    with tempfile.TemporaryDirectory(prefix="pyflannel-image-") as tmp:
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-compress-format", "gzip",
                        "containers-storage:" + image, "oci:%s/layout:image" % tmp], check=True, timeout=600)
        layout = Path(tmp) / "layout"
        index = json.loads((layout / "index.json").read_text())
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest_blob = layout / "blobs" / "sha256" / digest
        manifest = json.loads(manifest_blob.read_text())
        layers = [layer["size"] for layer in manifest["layers"]]
        return sum(layers) + manifest["config"]["size"] + manifest_blob.stat().st_size, layers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="localhost/pyflannel:dev")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    inspect = json.loads(podman("image", "inspect", args.image).stdout)[0]
    history = [h for h in json.loads(podman("image", "history", "--format", "json", args.image).stdout)
               if h.get("size", 0) or "ADD" in h.get("CreatedBy", "") or "import" in h.get("comment", "")]
    total, layers = compressed_size(args.image)
    print("image %s (%s, %s/%s)" % (args.image, inspect["Id"][:12], inspect["Os"], inspect["Architecture"]))
    print("  uncompressed: %.1f MB (%d bytes)" % (inspect["Size"] / MB, inspect["Size"]))
    print("  compressed:   %.1f MB (%d bytes, gzip'ed layers + config + manifest; goal <= %d MB: %s)"
          % (total / MB, total, GOAL_COMPRESSED_MB, "met" if total <= GOAL_COMPRESSED_MB * MB else "MISSED"))
    print("  layers: %d" % len(layers))
    for i, size in enumerate(layers):
        made_by = history[len(history) - 1 - i]["CreatedBy"] if len(history) == len(layers) else ""
        print("    %d: %6.1f MB compressed  %s" % (i + 1, size / MB, " ".join(made_by.split())[:90]))

    name = "pyflannel-bench-image"
    podman("rm", "-f", "-t", "0", name, check=False)
    podman("run", "-d", "--name", name, "--network", "none", *PODMAN_ULIMITS, "--entrypoint", '["sleep","3600"]',
           args.image)
    try:
        du = podman("exec", name, "du", "-sx", "--block-size=1", "/usr/lib/python3.11", "/opt/pyflannel",
                    "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/share", "/usr/bin", "/usr/sbin",
                    "/var/lib", check=False).stdout
        print("inside (du):")
        for line in du.splitlines():
            size, path = line.split("\t")
            print("  %6.1f MB  %s" % (int(size) / MB, path))
        installed = podman("exec", name, "dpkg-query", "-W", "-f", "${Package}\\n").stdout.split()
        tools = sorted(set(installed) & set(BUILD_TOOLS))
        print("  %d Debian packages; build tools among them: %s" % (len(installed), ", ".join(tools) or "none"))
        print("  debugging tools: %s" % podman("exec", name, "sh", "-c",
                                               "for t in ip nft wg iptables iptables-legacy iptables-nft; do "
                                               "command -v $t >/dev/null && printf '%s ' $t; done").stdout)
        print("start-up inside the container (median of %d, wall seconds):" % args.runs)
        for label, cmd in TIMED.items():
            out = podman("exec", name, "python3", "-c", TIMER, json.dumps(cmd), str(args.runs)).stdout
            print("  %-40s %.3f" % (label, float(out)))
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
