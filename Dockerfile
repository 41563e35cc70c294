# pyflannel's image, a drop-in replacement for flannel's: /opt/bin/flanneld runs pyflannel.
# No image is published: build it and push it to your registry, for amd64 and arm64 at once:
#   IMAGE=registry.example.com/pyflannel:v0.1.0
#   docker buildx build --platform linux/amd64,linux/arm64 -t "$IMAGE" --push .
# Every stage builds natively per platform (the base image is multi-arch, pip takes each platform's
# wheels, nothing is downloaded by hand). The build stage runs deploy/install.sh, which the tests
# also run outside Docker.

FROM python:3.11-slim-bookworm AS build
COPY pyproject.toml /src/
COPY pyflannel /src/pyflannel
COPY deploy/install.sh /src/deploy/install.sh
RUN sh /src/deploy/install.sh /opt/pyflannel /opt/bin

FROM python:3.11-slim-bookworm
# Debian's iptables brings both backends, iptables-nft and iptables-legacy; the wrapper switches
# the iptables and ip6tables alternatives to the one the host uses, at the first iptables call.
# The base image ships no bytecode for the standard library: compile it so start-up does not.
COPY --chmod=755 deploy/iptables-wrapper /usr/sbin/iptables-wrapper
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/* \
    && /usr/sbin/iptables-wrapper install \
    && python -m pip uninstall -y -q --disable-pip-version-check --root-user-action=ignore pip setuptools wheel \
    && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /usr/local/lib/python3.11
COPY --from=build /opt /opt
ENTRYPOINT ["/opt/bin/flanneld"]
