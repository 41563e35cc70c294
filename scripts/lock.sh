#!/usr/bin/env bash
# Re-locks requirements.lock: pyflannel's runtime dependencies (pyproject.toml's dependencies, not
# the kubeconfig or test extras) and its build backend (setuptools), pinned with the sha256 of every
# file PyPI has for each version, all platforms. deploy/install.sh installs exactly these with
# --require-hashes --no-deps. Run it after changing the dependencies, or to take new releases:
#
#   bash scripts/lock.sh && git diff requirements.lock
#
# pip-tools runs in a throw-away virtualenv, against PyPI only (no local pip configuration).
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_CONSTRAINT=
python3 -m venv "$tools"
"$tools/bin/pip" install -q --disable-pip-version-check pip-tools
"$tools/bin/pip-compile" -q --generate-hashes --allow-unsafe --strip-extras --build-deps-for=wheel \
    --no-emit-index-url --no-emit-find-links --no-header -o "$tools/requirements.lock" pyproject.toml
{
    echo "# pyflannel's runtime dependencies and build backend, hash-locked for every platform."
    echo "# Made by scripts/lock.sh (pip-compile --generate-hashes); installed by deploy/install.sh."
    cat "$tools/requirements.lock"
} >requirements.lock
