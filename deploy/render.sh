#!/bin/sh
# Prints deploy/kube-flannel.yml with the image the admin built and pushed, and optionally another
# net-conf.json (one of deploy/examples/, or your own):
#
#   deploy/render.sh IMAGE [NET_CONF] | kubectl apply -f -
#
# e.g. deploy/render.sh registry.example.com/pyflannel:v0.1.0 deploy/examples/net-conf-dual-stack.json
set -eu

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    echo "usage: $0 IMAGE [NET_CONF]" >&2
    exit 2
fi
case $1 in
    *[!A-Za-z0-9._/:@-]* | "")
        echo "$0: not an image reference: $1" >&2
        exit 2
        ;;
esac
conf=${2:-}
if [ -n "$conf" ] && [ ! -r "$conf" ]; then
    echo "$0: cannot read $conf" >&2
    exit 2
fi
# The ConfigMap's net-conf.json block runs from its key to the end of that YAML document.
awk -v image="$1" -v conf="$conf" '
    conf != "" && /^  net-conf\.json: \|$/ {
        print
        while ((getline line < conf) > 0) print "    " line
        skip = 1
        next
    }
    skip && /^---$/ { skip = 0 }
    skip { next }
    { gsub(/@IMAGE@/, image); print }
' "$(dirname "$0")/kube-flannel.yml"
