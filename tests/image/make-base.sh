#!/usr/bin/env bash
# A local stand-in for the NGC PyTorch base image, for the container test (tests/test_image.py):
# Debian 12 (debootstrap minbase) + Python 3.11 + a venv at /opt/venv, first on PATH like NGC's
# python/pip, holding the CPU torch wheel and numpy. No network access beyond Debian and PyPI.
# The machine's CA bundle replaces the image's and pip is pointed at it (PIP_CERT), as a base image
# on a network with a TLS-intercepting proxy needs: the Dockerfile's pip steps then reach PyPI.
#
#   tests/image/make-base.sh IMAGE_TAG WHEEL_DIR     # WHEEL_DIR: torch + numpy wheels and their deps
#
# Cached on this machine: the debootstrap root filesystem as $HPC_CI_CACHE/bookworm-minbase.tar
# (default /var/cache/hpc-ci; the slow part, ~2.7 min) and the finished image in buildah's storage
# under IMAGE_TAG (the caller derives the tag from this script and the wheels, so a change rebuilds).
set -euo pipefail
tag=$1 wheels=$2
cache=${HPC_CI_CACHE:-/var/cache/hpc-ci}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if buildah inspect --type image "$tag" >/dev/null 2>&1; then
    echo "make-base: $tag is cached"
    exit 0
fi
mkdir -p "$cache"
rootfs_tar=$cache/bookworm-minbase.tar
if [[ ! -s $rootfs_tar ]]; then
    echo "make-base: debootstrap bookworm (minbase + python3) into $rootfs_tar"
    work=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" -cf "$rootfs_tar.tmp" .
    mv "$rootfs_tar.tmp" "$rootfs_tar"
fi

echo "make-base: $tag from $rootfs_tar + $(ls "$wheels" | grep -c '\.whl$') wheels"
ctr=$(buildah from scratch)
cleanup() { buildah rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT
mnt=$(buildah mount "$ctr")
tar -C "$mnt" -xf "$rootfs_tar"
mkdir -p "$mnt/tmp/wheels"
cp "$wheels"/*.whl "$mnt/tmp/wheels/"
cp /etc/ssl/certs/ca-certificates.crt "$mnt/etc/ssl/certs/ca-certificates.crt"
buildah umount "$ctr" >/dev/null
buildah run --isolation chroot "$ctr" -- sh -euc '
    python3 -m venv /opt/venv
    /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels torch numpy -q
    rm -rf /tmp/wheels'
buildah config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --cmd /bin/bash "$ctr"
buildah commit --quiet "$ctr" "$tag" >/dev/null
echo "make-base: committed $tag"
