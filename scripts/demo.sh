#!/usr/bin/env bash
# A local cluster in network namespaces: three nodes running pyflannel, a pod on each, pods pinging across nodes,
# and the datapath probes of one node (pyflannel check).
#   bash scripts/demo.sh [--dual-stack | --ipv6-only] [--backend vxlan|host-gw] [--nodes N] [--hold] [--etcd]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tools.demo "$@"
