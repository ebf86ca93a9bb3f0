#!/usr/bin/env bash
# Builds what the real-Linux upgrade test (tests/tests/real_linux_upgrade.rs) needs to upgrade the guest's
# kernel: the newest linux-image-cloud-amd64 that bookworm-backports offers, with linux-base from there (its
# maintainer scripts need linux-run-hooks), on a small ext4 "staging" volume the guest installs them from
# with dpkg; and, for the restart into that kernel, its vmlinuz and a guest initramfs for it (the same as
# build-guest-image.sh's, with this kernel's modules).
# Usage: build-upgrade-kernel.sh [AGENT_BINARY]   (default: the static agent build-guest-image.sh built)
# Output lines: the staging volume, the new kernel's vmlinuz, its initramfs. Cached under $CACHE/upgrade-kernel.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

agent=${1:-$CACHE/agent-target/x86_64-unknown-linux-gnu/release/guest-agent}
[ -x "$agent" ] || { log "agent binary $agent missing (run guest/build-guest-image.sh first)"; exit 1; }

meta=$(bpo_apt apt-cache show linux-image-cloud-amd64 2>/dev/null | sed -n 's/^Depends: *//p' | head -n1)
pkg=$(echo "$meta" | grep -oE 'linux-image-[0-9][^ ,]*-cloud-amd64' | head -n1)
[ -n "$pkg" ] || { log "$GUEST_SUITE-backports offers no linux-image-cloud-amd64"; exit 1; }
kver=${pkg#linux-image-}

out="$CACHE/upgrade-kernel/$kver"
stamp=$( (cat "$0" "$here/common.sh" "$here/build-guest-image.sh" "$agent") | sha256sum | cut -c1-16)
if [ ! -s "$out/initrd-$stamp.cpio.gz" ]; then
    log "preparing the upgrade kernel $kver"
    rm -rf "$out.tmp" && mkdir -p "$out.tmp/debs"
    for p in "$pkg" linux-base; do
        (cd "$out.tmp/debs" && bpo_apt apt-get download "$p" >/dev/null)
    done
    # The new kernel and its modules, for the host side of the restart.
    dpkg-deb -x "$out.tmp"/debs/linux-image-*.deb "$out.tmp/x"
    cp "$out.tmp"/x/boot/vmlinuz-* "$out.tmp/vmlinuz"
    mv "$out.tmp/x/lib" "$out.tmp/lib"
    rm -rf "$out.tmp/x"
    depmod -b "$out.tmp" "$kver"
    # The guest initramfs for it (see build-guest-image.sh).
    guest_initramfs "$out.tmp" "$agent" "$out.tmp/initrd-$stamp.cpio.gz"
    rm -rf "$out.tmp/lib"
    # The staging volume the guest installs the packages from.
    used=$(du -sm "$out.tmp/debs" | cut -f1)
    mkfs.ext4 -q -F -L microvmm-staging -d "$out.tmp/debs" "$out.tmp/staging.ext4" "$((used + used / 4 + 16))M" >&2
    rm -rf "$out.tmp/debs" "$out"
    mv "$out.tmp" "$out"
    find "$CACHE/upgrade-kernel" -mindepth 1 -maxdepth 1 ! -path "$out" -exec rm -rf {} +
fi
echo "$out/staging.ext4"
echo "$out/vmlinuz"
echo "$out/initrd-$stamp.cpio.gz"
