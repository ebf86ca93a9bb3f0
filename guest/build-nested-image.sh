#!/usr/bin/env bash
# Builds the level-1 host of the nested hardware-KVM harness (scripts/nested.sh): the Debian cloud kernel
# and a busybox-static initramfs whose /init loads kvm + kvm-amd (QEMU TCG with `-cpu max` exposes AMD-V)
# and the virtio-pci/virtio-blk drivers (and tun and bridge, for the guests' TAPs), mounts the per-run scratch disk (/dev/vda, ext4) at /nested and
# the guest-image disk (/dev/vdb, if attached) at /images, runs /nested/.sys/run.sh with its output in
# /nested/.out/, and powers off.
# Usage: build-nested-image.sh [--cached] [--images]
#   --cached  uses the newest kernel already in the cache (no package-list refresh) and fails (exit 3) when
#             there is none, or when --images is given and the minimal guest image is missing;
#   --images  also builds the guest-image disk: an ext4 holding vmlinuz, minimal.cpio.gz (build-linux-image.sh),
#             guest-initrd.cpio.gz and guest-root.ext4 (build-guest-image.sh, if it has run), upgrade-staging.ext4,
#             upgrade-vmlinuz and upgrade-initrd.cpio.gz (build-upgrade-kernel.sh, if it has run), from the cache.
# Cached under $MICROVMM_CACHE (default /var/cache/microvmm). Output lines: vmlinuz, the L1 initramfs, and
# with --images the image disk.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=guest/common.sh
. "$here/common.sh"

NESTED_MODULES=(irqbypass kvm kvm_amd virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    virtio_blk tun bridge)

cached=0
images=0
for a in "$@"; do
    case $a in
    --cached) cached=1 ;;
    --images) images=1 ;;
    *) log "unknown option $a"; exit 2 ;;
    esac
done

if ((cached)); then
    kdir=$(ls -d "$CACHE"/kernel/*/ 2>/dev/null | sort -V | tail -n1 || true)
    kdir=${kdir%/}
    if [ -z "$kdir" ] || [ ! -s "$kdir/vmlinuz" ]; then
        log "no Debian kernel in $CACHE/kernel (scripts/setup.d/50-nested.sh fetches it)"
        exit 3
    fi
else
    need_host_pkgs cpio gzip kmod e2fsprogs
    kdir=$(fetch_kernel)
fi

stamp=$( (cat "$here/common.sh" "$0"; echo "$kdir") | sha256sum | cut -c1-16)
initrd="$CACHE/nested-l1-$stamp.cpio.gz"
if [ ! -s "$initrd" ]; then
    log "building the nested L1 initramfs"
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    if ((cached)) && [ -x "$CACHE/busybox.x/bin/busybox" ]; then
        # The busybox-static unpacked by an earlier image build (no package download).
        mkdir -p "$root/bin" "$root/sbin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/run"
        cp "$CACHE/busybox.x/bin/busybox" "$root/bin/busybox"
        for a in $("$root/bin/busybox" --list); do
            [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
        done
    else
        install_busybox "$root"
    fi
    copy_modules "$kdir" "$root" "${NESTED_MODULES[@]}" >/dev/null
    mkdir -p "$root/nested" "$root/images" "$root/lib64" "$root/lib/x86_64-linux-gnu" "$root/etc"
    cat >"$root/init" <<'INIT'
#!/bin/sh
# Level-1 host of the nested harness. The scratch disk holds .sys/{run.sh,env,lib/,bin/,etc/};
# results go to .out/{stdout,stderr,status}.
export PATH=/nested/.sys/bin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=1777 tmp /tmp
for m in virtio_pci virtio_blk kvm_amd tun bridge; do
    modprobe "$m" || echo "nested-l1: modprobe $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
if ! mount -t ext4 /dev/vda /nested; then
    echo "nested-l1: cannot mount the scratch disk /dev/vda"
    poweroff -f
fi
[ -b /dev/vdb ] && mount -t ext4 /dev/vdb /images
for f in /nested/.sys/lib/*; do
    [ -e "$f" ] && ln -sf "$f" /lib/x86_64-linux-gnu/
done
[ -e /nested/.sys/lib/ld-linux-x86-64.so.2 ] && ln -sf /nested/.sys/lib/ld-linux-x86-64.so.2 /lib64/
[ -d /nested/.sys/etc ] && cp -a /nested/.sys/etc/. /etc/
mkdir -p /nested/.out /nested/tmp
limit=600
# shellcheck disable=SC1091
[ -f /nested/.sys/env ] && . /nested/.sys/env
ifconfig lo 127.0.0.1 up 2>/dev/null
kvm=absent
[ -c /dev/kvm ] && kvm=present
grep -qw svm /proc/cpuinfo && kvm="$kvm, svm"
echo "nested-l1: ready after $(cut -d' ' -f1 /proc/uptime) s; /dev/kvm $kvm; running the command (limit ${limit} s)"
cd /nested
# Output written so far survives a hung or crashed L1 (the host reads the disk after QEMU ends).
(while sleep 5; do sync; done) &
syncer=$!
TMPDIR=/nested/tmp HOME=/nested LD_LIBRARY_PATH=/nested/.sys/lib MICROVMM_NESTED_L1=1 \
    timeout -s KILL "$limit" sh /nested/.sys/run.sh >/nested/.out/stdout 2>/nested/.out/stderr </dev/null
rc=$?
kill "$syncer" 2>/dev/null
echo "$rc" >/nested/.out/status
echo "nested-l1: command exited with $rc after $(cut -d' ' -f1 /proc/uptime) s"
cd /
sync
umount /images 2>/dev/null
umount /nested || sync
poweroff -f
INIT
    chmod 755 "$root/init"
    pack_initramfs "$root" "$initrd"
    find "$CACHE" -maxdepth 1 -name 'nested-l1-*.cpio.gz' ! -path "$initrd" -delete
fi
echo "$kdir/vmlinuz"
echo "$initrd"

if ((images)); then
    # The guest images the hardware-only tests boot, on one ext4 disk (attached read-only to L1 with QEMU's
    # snapshot=on, so L1 may write next to them and nothing reaches the cache).
    if ((cached)); then
        minimal=$(ls -t "$CACHE"/minimal-*.cpio.gz 2>/dev/null | head -n1 || true)
        [ -n "$minimal" ] || { log "no minimal guest image in $CACHE (guest/build-linux-image.sh builds it)"; exit 3; }
    else
        minimal=$(bash "$here/build-linux-image.sh" | tail -n 1)
    fi
    groot=$(ls -t "$CACHE"/guest-root-*.ext4 2>/dev/null | head -n1 || true)
    ginitrd=$(ls -t "$CACHE"/guest-initrd-*.cpio.gz 2>/dev/null | head -n1 || true)
    # The real-Linux upgrade's kernel package volume and the new kernel (build-upgrade-kernel.sh).
    ukdir=$(ls -td "$CACHE"/upgrade-kernel/*/ 2>/dev/null | head -n1 || true)
    ukinitrd=$( [ -n "$ukdir" ] && ls -t "$ukdir"initrd-*.cpio.gz 2>/dev/null | head -n1 || true)
    istamp=$( (cat "$0"; echo "$kdir $minimal $groot $ginitrd $ukinitrd") | sha256sum | cut -c1-16)
    disk="$CACHE/nested-images-$istamp.ext4"
    if [ ! -s "$disk" ]; then
        start=$(date +%s)
        log "building the nested guest-image disk"
        stage="$CACHE/nested-images.tmp"
        rm -rf "$stage" && mkdir -p "$stage"
        ln "$kdir/vmlinuz" "$stage/vmlinuz" 2>/dev/null || cp "$kdir/vmlinuz" "$stage/vmlinuz"
        ln "$minimal" "$stage/minimal.cpio.gz" 2>/dev/null || cp "$minimal" "$stage/minimal.cpio.gz"
        if [ -n "$groot" ] && [ -n "$ginitrd" ]; then
            ln "$groot" "$stage/guest-root.ext4" 2>/dev/null || cp "$groot" "$stage/guest-root.ext4"
            ln "$ginitrd" "$stage/guest-initrd.cpio.gz" 2>/dev/null || cp "$ginitrd" "$stage/guest-initrd.cpio.gz"
        else
            log "no full guest image in $CACHE (guest/build-guest-image.sh has not run); the image disk lacks it"
        fi
        if [ -n "$ukinitrd" ]; then
            for f in staging.ext4 vmlinuz; do
                ln "$ukdir$f" "$stage/upgrade-$f" 2>/dev/null || cp "$ukdir$f" "$stage/upgrade-$f"
            done
            ln "$ukinitrd" "$stage/upgrade-initrd.cpio.gz" 2>/dev/null || cp "$ukinitrd" "$stage/upgrade-initrd.cpio.gz"
        else
            log "no upgrade kernel in $CACHE (guest/build-upgrade-kernel.sh has not run); the image disk lacks it"
        fi
        used=$(du -smL "$stage" | cut -f1)
        rm -f "$disk.tmp"
        mkfs.ext4 -q -F -L nested-images -d "$stage" "$disk.tmp" "$((used + used / 5 + 64))M" >&2
        mv "$disk.tmp" "$disk"
        rm -rf "$stage"
        find "$CACHE" -maxdepth 1 -name 'nested-images-*.ext4' ! -path "$disk" -delete
        log "guest-image disk built in $(($(date +%s) - start)) s (${used} MiB)"
    fi
    echo "$disk"
fi
