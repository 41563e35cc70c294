#!/usr/bin/env bash
# Runs pyflannel's whole test suite (unit tests and the network-namespace tests; needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
