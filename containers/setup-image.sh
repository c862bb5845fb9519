#!/bin/bash
# The build steps of both recipes, containers/Dockerfile and containers/hpc.def (one script, so the
# two cannot drift apart; tests/test_containers.py checks that they call the same steps). Run as
# root from /opt/hpc, where the recipes copy containers/, pyproject.toml, README.md and hpc/.
#   deps     the locked dependencies (containers/requirements.lock, hashes checked), keeping the
#            base image's torch and numpy (its DALI and CUDA extensions are built against them)
#   package  hpc itself, without dependencies (they are all installed by `deps`)
#   user     the non-root user hpc, uid/gid 1000; a base image that already has uid 1000 (NGC on
#            Ubuntu 24.04: `ubuntu`) gets that account renamed, so both give the same user
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

deps() {
    pip list --format=freeze | grep -iE '^(torch|numpy)==' > /tmp/image-constraints.txt
    pip install --require-hashes -c /tmp/image-constraints.txt -r containers/requirements.lock
    rm -f /tmp/image-constraints.txt
}

package() {
    pip install --no-deps /opt/hpc
    hpc --version
}

user() {
    local old
    old=$(getent passwd 1000 | cut -d: -f1 || true)
    if [[ -z $old ]]; then
        getent group 1000 >/dev/null || groupadd --gid 1000 hpc
        useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash hpc
    elif [[ $old != hpc ]]; then
        usermod --login hpc --home /home/hpc --move-home "$old"
    fi
    local group
    group=$(getent group 1000 | cut -d: -f1)
    [[ $group == hpc ]] || groupmod --new-name hpc "$group"
    mkdir -p /home/hpc /workspace
    chown 1000:1000 /home/hpc /workspace
}

for step in "$@"; do
    case $step in
        deps | package | user) "$step" ;;
        *) echo "setup-image.sh: unknown step $step (deps | package | user)" >&2; exit 2 ;;
    esac
done
