#!/usr/bin/env bash
# Builds the full Linux guest used by the agent handoff harness (issue 6), from Debian bookworm packages:
#   - the linux-image-cloud-amd64 kernel;
#   - an initramfs: busybox-static, the virtio + CRIU kernel modules, and the static `guest-agent`;
#     its /init loads the modules, mounts /dev/vda (ext4) and switches to it with the agent as PID 1;
#   - an ext4 root: debootstrap minbase + criu, iptables, nftables, iproute2, arping,
#     openjdk-17-jre-headless and the Java demo service /opt/demo/EchoLog.class.
# Usage: build-guest-image.sh [AGENT_BINARY]   (default: builds the static agent from this checkout,
#        with the cargo features in $AGENT_FEATURES, e.g. fault-injection for the handoff's fault tests)
# Cached under $MICROVMM_CACHE (default /var/cache/microvmm): the root image is rebuilt only when this
# script or the demo changes, the initramfs only when the agent binary changes.
# The last three output lines are the paths of vmlinuz, the initramfs and the root image.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=guest/common.sh
. "$here/common.sh"

ROOT_PKGS=criu,iptables,nftables,iproute2,iputils-arping,openjdk-17-jre-headless,kmod,procps
# Bump when the root file system recipe below changes (the cache key also covers the packages, the
# demo service and the guest init script).
ROOTFS_RECIPE=1
need_host_pkgs cpio gzip kmod debootstrap e2fsprogs openjdk-17-jdk-headless

agent=${1:-}
if [ -z "$agent" ]; then
    log "building the static guest-agent"
    features=${AGENT_FEATURES:-}
    # One target directory per feature set: switching does not rebuild the other's agent.
    tdir="$CACHE/agent-target${features:+-${features//[, ]/-}}"
    (cd "$here/.." && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$tdir" \
        "${CARGO:-cargo}" build -q --release -p guest-agent --bin guest-agent \
        --target x86_64-unknown-linux-gnu ${features:+--features "$features"})
    agent="$tdir/x86_64-unknown-linux-gnu/release/guest-agent"
fi
[ -x "$agent" ] || { log "agent binary $agent missing"; exit 1; }

kdir=$(fetch_kernel)

# --- root file system (slow part: cached) ---
rstamp=$( (echo "$ROOTFS_RECIPE $GUEST_SUITE $ROOT_PKGS"; cat "$here/demo/EchoLog.java" "$here/rootfs-init.sh") | sha256sum | cut -c1-16)
rootimg="$CACHE/guest-root-$rstamp.ext4"
if [ ! -s "$rootimg" ]; then
    start=$(date +%s)
    rdir="$CACHE/rootfs.tmp"
    rm -rf "$rdir"
    log "debootstrap $GUEST_SUITE minbase + $ROOT_PKGS (a few minutes)"
    mkdir -p "$CACHE/debootstrap-debs"
    debootstrap --variant=minbase --include="$ROOT_PKGS" --cache-dir="$CACHE/debootstrap-debs" \
        "$GUEST_SUITE" "$rdir" "$(debian_mirror)" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
    # Demo service.
    jtmp=$(mktemp -d)
    javac --release 17 -d "$jtmp" "$here/demo/EchoLog.java"
    mkdir -p "$rdir/opt/demo" "$rdir/data"
    cp "$jtmp/EchoLog.class" "$rdir/opt/demo/"
    rm -rf "$jtmp"
    install -m 755 "$here/rootfs-init.sh" "$rdir/sbin/microvmm-init"
    echo microvmm-guest >"$rdir/etc/hostname"
    # Slim down: package caches, docs, locales.
    rm -rf "$rdir"/var/cache/apt/archives/*.deb "$rdir"/var/lib/apt/lists/* "$rdir"/usr/share/doc/* \
        "$rdir"/usr/share/man/* "$rdir"/usr/share/locale/*
    used=$(du -sm "$rdir" | cut -f1)
    size=$((used + used / 2 + 200))
    rm -f "$rootimg.tmp"
    mkfs.ext4 -q -F -L microvmm-root -d "$rdir" "$rootimg.tmp" "${size}M"
    mv "$rootimg.tmp" "$rootimg"
    find "$CACHE" -maxdepth 1 -name 'guest-root-*.ext4' ! -path "$rootimg" -delete
    rm -rf "$rdir"
    log "root image built in $(($(date +%s) - start)) s (${used} MiB used, ${size} MiB image)"
fi

# --- initramfs (cheap: rebuilt when the agent changes) ---
istamp=$( (cat "$here/common.sh" "$0" "$agent"; echo "$kdir") | sha256sum | cut -c1-16)
initrd="$CACHE/guest-initrd-$istamp.cpio.gz"
if [ ! -s "$initrd" ]; then
    log "building initramfs"
    guest_initramfs "$kdir" "$agent" "$initrd"
    find "$CACHE" -maxdepth 1 -name 'guest-initrd-*.cpio.gz' ! -path "$initrd" -delete
fi
echo "$kdir/vmlinuz"
echo "$initrd"
echo "$rootimg"
