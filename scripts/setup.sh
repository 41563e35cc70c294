#!/usr/bin/env bash
# Installs what pyflannel's tests and demo need on Debian or Ubuntu (as root), then a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 iptables nftables iputils-ping containernetworking-plugins procps etcd-server etcd-client)
# The image's build (scripts/build-image.sh), its test in the namespace cluster (tests/test_image.py,
# with an HTTPS API server: openssl makes its certificates) and bench/image.py (skopeo).
packages+=(openssl podman buildah mmdebstrap runc skopeo)
# The datapath probes' tests (ethtool, and nft in the namespace cluster) and the alerting rules' (promtool).
packages+=(ethtool prometheus)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv python3-pip)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# pyflannel waits (not ready) while br_netfilter is not loaded, as flanneld v0.26+ refuses to start: the
# namespace tests need it, as every Kubernetes node does.
if [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
  modprobe br_netfilter 2>/dev/null || echo "warning: br_netfilter is not loaded and modprobe failed; the namespace tests need it" >&2
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
