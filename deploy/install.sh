#!/bin/sh
# Installs pyflannel from this source tree into a new virtualenv, as the image's build does:
# the runtime dependencies from PyPI, no pip in the virtualenv, no caches, all bytecode compiled.
#
#   deploy/install.sh VENV [BINDIR]
#
# VENV is the virtualenv to create (the image uses /opt/pyflannel). With BINDIR, BINDIR/flanneld
# becomes a link to VENV/bin/pyflannel (the image uses /opt/bin: the kube-flannel manifests run
# /opt/bin/flanneld). PYTHON names the interpreter (default: python3); its pip must be 22.3 or later.
set -eu

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    echo "usage: $0 VENV [BINDIR]" >&2
    exit 2
fi
python=${PYTHON:-python3}
src=$(cd "$(dirname "$0")/.." && pwd)

"$python" -m venv --without-pip "$1"
venv=$(cd "$1" && pwd)
"$python" -m pip --python "$venv/bin/python" install --no-cache-dir --no-compile \
    --disable-pip-version-check --root-user-action=ignore "$src"
"$venv/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$venv/lib"
if [ "$#" -eq 2 ]; then
    mkdir -p "$2"
    ln -sfn "$venv/bin/pyflannel" "$2/flanneld"
fi
