#!/bin/sh
# Local stand-ins for the two images docker-compose.yml starts from, for a Docker engine that
# reaches no registry (docker-compose.yml builds FROM python:3.11-slim and runs redis:7):
#
#   sudo scripts/base_images.sh [--prometheus] [MIRROR]   # default: the Debian mirror apt uses here
#
# Both come from one Debian 12 (bookworm) root filesystem made by debootstrap, with Debian's
# packages only, so the result is the same on any machine that reaches a Debian mirror:
#   python:3.11-slim  Debian's python3 (3.11) with a virtual environment at /opt/python first on
#                     PATH, so `python` and `pip` are the 3.11 ones, as in the Docker Hub image
#   redis:7           Debian's redis-server (7.0) with /data as its working directory
#   prometheus:debian Debian's prometheus (2.42) with promtool, for the monitoring profile:
#                     PROMETHEUS_IMAGE=prometheus:debian (only with `scripts/base_images.sh --prometheus`)
# Where Docker Hub is reachable, use the real images instead (`docker pull`); nothing else changes.
set -eu

PROMETHEUS=no
if [ "${1:-}" = --prometheus ]; then PROMETHEUS=yes; shift; fi
MIRROR=${1:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
WORK=${WORK:-/var/tmp/gpubroker-rootfs}
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
command -v docker >/dev/null || { echo "docker is missing" >&2; exit 1; }

rootfs() {  # rootfs DIR PACKAGES
    dir=$1; shift
    if [ ! -e "$dir/.debootstrap-done" ]; then
        rm -rf "$dir"
        debootstrap --variant=minbase --include="$*" bookworm "$dir" "$MIRROR"
        touch "$dir/.debootstrap-done"
    fi
    chroot "$dir" apt-get clean
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin
}

mkdir -p "$WORK"
rootfs "$WORK/python" python3,python3-venv,ca-certificates
chroot "$WORK/python" sh -c 'test -x /opt/python/bin/pip || python3 -m venv /opt/python'
# CA certificates added on this host (a TLS-inspecting proxy's, a company's) go into the image too,
# and pip is told to use the system bundle, so `pip install` in a build trusts what the host trusts.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$WORK/python/usr/local/share/ca-certificates/"
    chroot "$WORK/python" update-ca-certificates
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$WORK/python/etc/pip.conf"
fi
tar -C "$WORK/python" --exclude=./.debootstrap-done -c . | docker import \
    -c 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - python:3.11-slim

rootfs "$WORK/redis" redis-server
mkdir -p "$WORK/redis/data" "$WORK/redis/usr/local/etc/redis"
tar -C "$WORK/redis" --exclude=./.debootstrap-done -c . | docker import \
    -c 'WORKDIR /data' -c 'EXPOSE 6379' -c 'CMD ["redis-server"]' - redis:7

if [ "$PROMETHEUS" = yes ]; then
    rootfs "$WORK/prometheus" prometheus
    mkdir -p "$WORK/prometheus/prometheus"
    tar -C "$WORK/prometheus" --exclude=./.debootstrap-done -c . | docker import \
        -c 'ENTRYPOINT ["/usr/bin/prometheus"]' -c 'WORKDIR /prometheus' -c 'EXPOSE 9090' - prometheus:debian
    docker image ls prometheus:debian
fi
docker image ls python:3.11-slim
docker image ls redis:7
