#!/usr/bin/env bash
# System packages the test suite uses: a real Slurm (slurmctld, slurmd, slurmdbd + MariaDB for
# accounting, munge), OpenMPI, iproute2 (the 2-node cluster's namespaces and bridge), and buildah +
# debootstrap (tests/test_image.py builds and runs the container recipes). Installs only what is missing, with apt-get, and only as root;
# otherwise prints the command to run and exits 0 so that `make test` still runs (the service
# tests then skip on a laptop, and fail under CI=true).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server mariadb-client
          openmpi-bin libopenmpi-dev util-linux iproute2 buildah debootstrap)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system: not a Debian/Ubuntu system; install the equivalents of: ${missing[*]}" >&2
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install-system: missing system packages; as root run:" >&2
    echo "  apt-get install -y ${missing[*]}" >&2
    exit 0
fi
echo "install-system: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}"
