#!/usr/bin/env bash
# vmm: the test-guest kit is assembled by test-guests/build.rs with gcc/as/ld/nm (build-essential,
# binutils from setup.sh); tests/tests/linux_boot.rs unpacks the Debian kernel's vmlinux with lz4.
# Idempotent.
set -euo pipefail
missing=()
for p in lz4 binutils gcc; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: vmm: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ! -c /dev/kvm ]; then
    echo "setup: vmm: warning: /dev/kvm is missing; the VM tests will print SKIP lines"
fi
