# pyflannel's image, a drop-in replacement for flannel's: /opt/bin/flanneld runs pyflannel and
# /opt/bin/install-conf installs the CNI config, as in flannel's image.
# No image is published: build it and push it to your registry, for amd64 and arm64 at once:
#   IMAGE=registry.example.com/pyflannel:v0.1.0
#   docker buildx build --platform linux/amd64,linux/arm64 -t "$IMAGE" --push .
# or, without Docker, scripts/build-image.sh (mmdebstrap, podman and buildah).
# Both stages start from BASE_IMAGE, Debian bookworm (multi-arch; pin it by digest with
# --build-arg BASE_IMAGE=debian:bookworm-slim@sha256:...), and use Debian's Python 3.11. The build
# stage runs deploy/install.sh, which the tests also run outside a container: the dependencies come
# from requirements.lock, hash-checked, wheels only. The final stage has no pip, compiler or build
# tool: Python, the virtualenv, iptables (both backends, behind deploy/iptables-wrapper), and ip,
# nft and wg for `kubectl exec` debugging.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
# A CA bundle for pip behind a TLS-intercepting proxy (scripts/build-image.sh mounts the host's);
# it exists in this stage only.
ARG PIP_CERT
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml requirements.lock /src/
COPY pyflannel /src/pyflannel
COPY deploy/install.sh deploy/install-conf /src/deploy/
RUN sh /src/deploy/install.sh /opt/pyflannel /opt/bin

FROM ${BASE_IMAGE}
COPY --chmod=755 deploy/iptables-wrapper /usr/sbin/iptables-wrapper
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 iptables nftables iproute2 wireguard-tools \
    && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log /var/log/alternatives.log \
    && /usr/sbin/iptables-wrapper install
COPY --from=build /opt /opt
ENTRYPOINT ["/opt/bin/flanneld"]
