#!/usr/bin/env bash
# Installs everything the build and the tests need on a fresh Debian machine (run as root),
# then runs each scripts/setup.d/*.sh in name order (guest images, tool checks, ...).
# Idempotent: a second run only checks and exits quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need. Each setup.d script may add its own.
PKGS=(build-essential binutils iproute2 iputils-ping ethtool)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

for s in scripts/setup.d/*.sh; do
    [ -e "$s" ] || continue
    echo "setup: $s"
    bash "$s"
done
