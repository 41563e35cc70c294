#!/usr/bin/env bash
# Builds pyflannel's image from ./Dockerfile and prints its size.
#
#   scripts/build-image.sh              # IMAGE (default localhost/pyflannel:dev), this machine's platform
#   PUSH=1 IMAGE=registry.example.com/pyflannel:v0.1.0 scripts/build-image.sh
#
# Two ways, chosen by BUILDER (default: docker where `docker buildx` works, else buildah):
#   docker   docker buildx build --platform $PLATFORMS (default linux/amd64,linux/arm64), from the
#            registry's debian:bookworm-slim (or BASE_IMAGE); PUSH=1 pushes the multi-platform image,
#            otherwise one platform is --load'ed into the local Docker.
#   buildah  no Docker daemon and no registry: mmdebstrap makes a Debian bookworm base from Debian's
#            archive, slimmed as debian:bookworm-slim is (no docs, man pages or locales), `podman
#            import` makes it the local image localhost/pyflannel-base:bookworm (rebuilt only when
#            its recipe changes, or with REBUILD_BASE=1), and `buildah bud` builds the Dockerfile on
#            it, for this machine's platform. PUSH=1 then pushes IMAGE with podman.
# The image is labelled with a hash of its inputs (Dockerfile, pyproject.toml, requirements.lock,
# pyflannel/, the deploy/ files the Dockerfile copies); when IMAGE already has that label the build
# is skipped (REBUILD=1 builds anyway). The tests reuse the image this way.
#
# Needs (buildah): root, apt-based host with mmdebstrap buildah podman runc (installed with apt-get
# when missing, unless NO_INSTALL=1), a Debian mirror (MIRROR, SECURITY_MIRROR) and PyPI, and about
# 1 GB free under SCRATCH and in containers-storage. Behind a TLS-intercepting proxy the host's CA
# bundle (CA_BUNDLE, default Debian's /etc/ssl/certs/ca-certificates.crt; empty for none) is mounted
# read-only into the build stage for pip; it never reaches the image. RUN steps use the host network
# (so the build makes no bridge or NAT rule), and runc where cgroups are v1 or hybrid.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/pyflannel:dev}
SCRATCH=${SCRATCH:-/tmp/pyflannel-image-build}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
PLATFORMS=${PLATFORMS:-linux/amd64,linux/arm64}
LOCAL_BASE=localhost/pyflannel-base:bookworm
SUITE=bookworm

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'build-image.sh: %s\n' "$*" >&2; exit 1; }
heavy() { if [[ ${NICE:-1} == 0 ]]; then "$@"; else nice -n 19 ionice -c3 "$@"; fi; }

# The build's inputs, hashed: what the Dockerfile copies, and the Dockerfile.
source_hash() {
    { printf '%s\n' Dockerfile pyproject.toml requirements.lock deploy/install.sh deploy/install-conf \
          deploy/iptables-wrapper
      find pyflannel -type f \( -name '*.py' -o -name py.typed \) | LC_ALL=C sort
    } | while read -r f; do printf '%s\n' "$f"; cat "$f"; done | sha256sum | cut -c1-16
}

builder=${BUILDER:-}
if [[ -z $builder ]]; then
    if command -v docker >/dev/null && docker buildx version >/dev/null 2>&1; then builder=docker; else builder=buildah; fi
fi
hash=$(source_hash)

if [[ $builder == docker ]]; then
    args=(--platform "$PLATFORMS" --label "org.pyflannel.source=$hash" -t "$IMAGE")
    [[ -n ${BASE_IMAGE:-} ]] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    if [[ ${PUSH:-0} == 1 ]]; then args+=(--push); else args+=(--load); fi
    exec docker buildx build "${args[@]}" .
fi
[[ $builder == buildah ]] || die "BUILDER must be docker or buildah, not $builder"

[[ $(id -u) == 0 ]] || die "run as root (mmdebstrap --mode=root and rootful buildah need it)"
have_hash=$(podman image inspect --format '{{index .Labels "org.pyflannel.source"}}' "$IMAGE" 2>/dev/null || true)
if [[ $have_hash == "$hash" && ${REBUILD:-0} != 1 ]]; then
    log "$IMAGE is up to date (inputs $hash)"
else
    # --- tools --------------------------------------------------------------------------------------
    need=()
    for tool in mmdebstrap buildah podman runc; do
        command -v "$tool" >/dev/null || need+=("$tool")
    done
    if ((${#need[@]})); then
        [[ ${NO_INSTALL:-0} == 1 ]] && die "missing: ${need[*]} (apt-get install ${need[*]})"
        log "installing ${need[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
    fi
    # Pure cgroup v2 has cgroup.controllers at the top; crun 1.8 refuses v1 and hybrid hosts.
    if [[ -f /sys/fs/cgroup/cgroup.controllers ]] && command -v crun >/dev/null; then
        runtime=${OCI_RUNTIME:-$(command -v crun)}
    else
        runtime=${OCI_RUNTIME:-$(command -v runc)}
    fi
    mkdir -p "$SCRATCH"

    # --- base image: debian:bookworm-slim's equivalent, from Debian's archive ---------------------------
    base=${BASE_IMAGE:-}
    if [[ -z $base ]]; then
        base=$LOCAL_BASE
        # debuerreotype's slimming (debian:*-slim): no docs but copyrights, no man pages or locales;
        # apt keeps no package cache or lists.
        # shellcheck disable=SC2089  # apt.conf text, written to a file as it is
        APT_CLEAN='DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";'
        DPKG_OPTS=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
                   --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
                   --dpkgopt='path-exclude=/usr/share/groff/*' --dpkgopt='path-exclude=/usr/share/lintian/*'
                   --dpkgopt='path-exclude=/usr/share/linda/*' --dpkgopt='path-exclude=/usr/share/locale/*')
        # shellcheck disable=SC2016  # expanded by the hook's shell: $1 is the rootfs
        CUSTOMIZE='printf "%s\n" "$APT_CLEAN" > "$1"/etc/apt/apt.conf.d/docker-clean
printf "%s\n" "Acquire::Languages \"none\";" > "$1"/etc/apt/apt.conf.d/docker-no-languages
rm -rf "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/* "$1"/var/log/apt/* "$1"/var/log/dpkg.log "$1"/var/log/alternatives.log'
        recipe=$(printf '%s\n' 1 "$SUITE" "$MIRROR" "$SECURITY_MIRROR" "$APT_CLEAN" "${DPKG_OPTS[*]}" "$CUSTOMIZE" |
                 sha256sum | cut -c1-16)
        have=$(podman image inspect --format '{{index .Labels "org.pyflannel.base-recipe"}}' "$base" 2>/dev/null || true)
        if [[ $have == "$recipe" && ${REBUILD_BASE:-0} != 1 ]]; then
            log "base image $base: cached (recipe $recipe)"
        else
            log "base image $base: mmdebstrap $SUITE minbase"
            start=$SECONDS
            rm -f "$SCRATCH/rootfs.tar"
            export APT_CLEAN  # the customize hook writes it
            heavy mmdebstrap --quiet --variant=minbase --mode=root --format=tar \
                --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr "${DPKG_OPTS[@]}" --customize-hook="$CUSTOMIZE" \
                "$SUITE" "$SCRATCH/rootfs.tar" \
                "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY_MIRROR $SUITE-security main"
            heavy podman import --quiet \
                --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                --change 'CMD ["bash"]' --change "LABEL org.pyflannel.base-recipe=$recipe" \
                --message "Debian $SUITE minbase, slim (mmdebstrap)" \
                "$SCRATCH/rootfs.tar" "$base" >/dev/null
            rm -f "$SCRATCH/rootfs.tar"
            log "base image built in $((SECONDS - start)) s"
        fi
    fi

    # --- the Dockerfile ---------------------------------------------------------------------------------
    args=(--layers --pull=never --runtime "$runtime" --network host --build-arg "BASE_IMAGE=$base"
          --label "org.pyflannel.source=$hash" -f Dockerfile -t "$IMAGE")
    if [[ -n $CA_BUNDLE ]]; then
        [[ -r $CA_BUNDLE ]] || die "CA_BUNDLE $CA_BUNDLE is not readable (CA_BUNDLE= to mount none)"
        args+=(-v "$CA_BUNDLE:/run/host-ca-bundle.crt:ro" --build-arg PIP_CERT=/run/host-ca-bundle.crt)
    fi
    old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    log "buildah bud -> $IMAGE (inputs $hash, runtime $runtime)"
    start=$SECONDS
    heavy buildah bud --quiet "${args[@]}" . >"$SCRATCH/build.log" 2>&1 ||
        { tail -40 "$SCRATCH/build.log" >&2; die "buildah bud failed (log: $SCRATCH/build.log)"; }
    log "built in $((SECONDS - start)) s"
    # The previous build, untagged now, and the intermediate images of builds before it.
    [[ -n $old && $old != $(podman image inspect --format '{{.Id}}' "$IMAGE") ]] &&
        podman rmi "$old" >/dev/null 2>&1 || true
fi

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
layers=$(podman image inspect --format '{{len .RootFS.Layers}}' "$IMAGE")
printf '%s: %s bytes uncompressed, %s layers\n' "$IMAGE" "$size" "$layers"
if [[ ${PUSH:-0} == 1 ]]; then
    podman push "$IMAGE"
fi
