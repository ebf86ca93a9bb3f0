#!/usr/bin/env bash
# Fetches the QEMU that runs the nested harness's level 1: bookworm-backports' qemu-system-x86 (10.x),
# unpacked under $CACHE/qemu-bpo/<version>/ (not installed). bookworm's own QEMU 7.2 emulates nested SVM
# with faults this project hit: a Linux 6.12 bzImage run by microvmm at level 1 triple-faulted in its
# decompressor (it boots under 10.0), and level 1 itself sometimes triple-faulted under load.
# scripts/nested.sh uses it when present (MICROVMM_NESTED_QEMU overrides).
# Output line: the qemu-system-x86_64 binary. Exit 1 (with a message) when it cannot be fetched or does not
# run here (a library missing), in which case the harness falls back to the system's QEMU.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

ver=$(bpo_apt apt-cache show qemu-system-x86 2>/dev/null | sed -n 's/^Version: *//p' | sort -V | tail -n1)
[ -n "$ver" ] || { log "$GUEST_SUITE-backports offers no qemu-system-x86"; exit 1; }
out="$CACHE/qemu-bpo/${ver//[:~+]/_}"
bin="$out/root/usr/bin/qemu-system-x86_64"
if [ ! -x "$bin" ]; then
    log "fetching QEMU $ver ($GUEST_SUITE-backports) for the nested harness"
    rm -rf "$out.tmp" && mkdir -p "$out.tmp/debs"
    for p in qemu-system-x86 qemu-system-common qemu-system-data; do
        (cd "$out.tmp/debs" && bpo_apt apt-get download "$p=$ver" >/dev/null)
    done
    for d in "$out.tmp"/debs/*.deb; do dpkg-deb -x "$d" "$out.tmp/root"; done
    rm -rf "$out.tmp/debs" "$out"
    mv "$out.tmp" "$out"
fi
if missing=$(ldd "$bin" | grep 'not found'); then
    log "QEMU $ver needs libraries this machine lacks: $missing"
    exit 1
fi
"$bin" --version >/dev/null || { log "$bin does not run"; exit 1; }
echo "$bin"
