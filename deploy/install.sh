#!/bin/sh
# Installs pyflannel from this source tree into a new virtualenv, as the image's build does: the
# runtime dependencies exactly as requirements.lock pins them (--require-hashes, wheels only, no
# dependency resolution), pyflannel built by the locked setuptools, which is removed afterwards; no
# pip in the virtualenv, no caches, all bytecode compiled.
#
#   deploy/install.sh VENV [BINDIR]
#
# VENV is the virtualenv to create (the image uses /opt/pyflannel). With BINDIR (the image uses
# /opt/bin, where the kube-flannel manifests look), BINDIR/flanneld becomes a link to
# VENV/bin/pyflannel and BINDIR/install-conf the install-cni init container's atomic copy, run by
# VENV's interpreter. PYTHON names the interpreter (default: python3); its pip must be 22.3 or later.
# The kubeconfig extra (--kubeconfig-file) is not installed: a DaemonSet uses its service account.
set -eu

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    echo "usage: $0 VENV [BINDIR]" >&2
    exit 2
fi
python=${PYTHON:-python3}
src=$(cd "$(dirname "$0")/.." && pwd)

"$python" -m venv --without-pip "$1"
venv=$(cd "$1" && pwd)
pip() {
    "$python" -m pip --python "$venv/bin/python" --disable-pip-version-check --no-input "$@"
}
pip install --no-cache-dir --no-compile --root-user-action=ignore \
    --require-hashes --no-deps --only-binary=:all: -r "$src/requirements.lock"
pip install --no-cache-dir --no-compile --root-user-action=ignore \
    --no-deps --no-build-isolation --no-index "$src"
pip uninstall -y -q --root-user-action=ignore setuptools
pip check
"$venv/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$venv/lib"
if [ "$#" -eq 2 ]; then
    mkdir -p "$2"
    ln -sfn "$venv/bin/pyflannel" "$2/flanneld"
    { echo "#!$venv/bin/python -IS"; tail -n +2 "$src/deploy/install-conf"; } >"$2/install-conf"
    chmod 755 "$2/install-conf"
fi
