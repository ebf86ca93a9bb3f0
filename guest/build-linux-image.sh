#!/usr/bin/env bash
# Builds the minimal Linux guest (issue 3 item 7) from Debian bookworm packages: the
# linux-image-cloud-amd64 kernel and a busybox-static initramfs whose /init loads the virtio modules and
# starts a shell on the console. Cached under $MICROVMM_CACHE (default /var/cache/microvmm).
# The last two output lines are the paths of vmlinuz and of the initramfs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=guest/common.sh
. "$here/common.sh"

need_host_pkgs cpio gzip kmod
kdir=$(fetch_kernel)
stamp=$( (cat "$here/common.sh" "$0"; echo "$kdir") | sha256sum | cut -c1-16)
out="$CACHE/minimal-$stamp.cpio.gz"
if [ ! -s "$out" ]; then
    log "building minimal initramfs"
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    install_busybox "$root"
    copy_modules "$kdir" "$root" "${VIRTIO_MODULES[@]}" >/dev/null
    cat >"$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in virtio_mmio virtio_pci virtio_blk virtio_net virtio_console vmw_vsock_virtio_transport; do
    modprobe "$m" 2>/dev/null
done
echo "microvmm minimal guest: $(uname -r) up, modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
exec setsid cttyhack /bin/sh
INIT
    chmod 755 "$root/init"
    pack_initramfs "$root" "$out"
    find "$CACHE" -maxdepth 1 -name 'minimal-*.cpio.gz' ! -path "$out" -delete
fi
echo "$kdir/vmlinuz"
echo "$out"
