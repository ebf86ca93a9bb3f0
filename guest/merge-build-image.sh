#!/usr/bin/env bash
# Builds the two-volume guest of the real-guest merge test (tests/tests/real_guest_merge.rs), from Debian
# bookworm packages only:
#   - the linux-image-cloud-amd64 kernel (shared with the other guest images);
#   - an initramfs: busybox-static, the virtio/ext4 modules and guest/merge-guest-init.sh as /init;
#   - the OS volume: an ext4 root from debootstrap minbase, with the .deb files of a few packages that
#     minbase lacks staged in /var/cache/merge-debs (fetched here with `apt-get download`; the guest has
#     no network) for the upgrade VM to install with dpkg;
#   - the data volume: a fresh, empty 64 MiB ext4.
# Cached under $MICROVMM_CACHE (default /var/cache/microvmm): the volumes keyed by their recipe below,
# the initramfs by the init script.
# Cold: ~1-2 min (debootstrap); warm: well under a second.
# The last five output lines are the paths of vmlinuz, the initramfs, the OS image, the data image and
# the list of staged packages (`NAME VERSION [UPGRADED-FROM]` per line).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=guest/common.sh
. "$here/common.sh"

# Staged packages (with their dependencies not in minbase); dpkg installs them all in one call.
STAGED_PKGS=(tree jq libjq1 libonig5 file libmagic1 libmagic-mgc)
# Upgraded packages: the root gets the older of the package's bookworm and bookworm-updates versions,
# the newer one is staged (tzdata: ~600 files rewritten). Skipped (logged) if the two are equal.
UPGRADE_PKGS=(tzdata)
MODULES=(virtio_pci virtio_blk ext4)
need_host_pkgs cpio gzip kmod debootstrap e2fsprogs

kdir=$(fetch_kernel)
# Volumes (slow: debootstrap) and initramfs (cheap) are cached apart, so that editing the init
# script does not rebuild the volumes.
vstamp=$( (echo "${STAGED_PKGS[*]} ${UPGRADE_PKGS[*]}"; sed -n '/^# --- volumes/,/^# --- end volumes/p' "$0") | sha256sum | cut -c1-16)
vol="$CACHE/merge-vol-$vstamp"
# --- volumes
if [ ! -s "$vol/done" ]; then
    start=$(date +%s)
    rm -rf "$vol" "$vol.tmp"
    mkdir -p "$vol.tmp"
    rdir="$vol.tmp/root"
    log "merge guest: debootstrap $GUEST_SUITE minbase (about a minute)"
    mkdir -p "$CACHE/debootstrap-debs"
    debootstrap --variant=minbase --cache-dir="$CACHE/debootstrap-debs" \
        "$GUEST_SUITE" "$rdir" "$(debian_mirror)" >"$vol.tmp/debootstrap.log" 2>&1 \
        || { tail -n 30 "$vol.tmp/debootstrap.log" >&2; exit 1; }
    mkdir -p "$rdir/var/cache/merge-debs"
    : >"$vol.tmp/pkgs"
    for p in "${STAGED_PKGS[@]}"; do
        deb=$(fetch_deb "$p" "$CACHE/debs")
        cp "$deb" "$rdir/var/cache/merge-debs/"
        echo "$p $(dpkg-deb -f "$deb" Version)" >>"$vol.tmp/pkgs"
        if chroot "$rdir" dpkg-query -W "$p" >/dev/null 2>&1; then
            log "staged package $p is already in the root"
            exit 1
        fi
    done
    for p in "${UPGRADE_PKGS[@]}"; do
        main=$(fetch_deb "$p" "$CACHE/debs")
        # (The exact version: apt's candidate can be the host's installed one.)
        upd=$(
            dir="$CACHE/merge-updates/debs"
            CACHE="$CACHE/merge-updates" GUEST_SUITE=$GUEST_SUITE-updates
            guest_apt apt-get update -qq >/dev/null
            v=$(guest_apt apt-cache madison "$p" | awk -F'|' 'NR == 1 { gsub(/ /, "", $2); print $2 }')
            [ -n "$v" ] || exit 0
            mkdir -p "$dir"
            (cd "$dir" && guest_apt apt-get download "$p=$v" >/dev/null)
            ls -t "$dir/${p}_"*.deb | head -n1
        )
        if [ -z "$upd" ]; then
            log "no upgrade of $p staged: not in $GUEST_SUITE-updates"
            continue
        fi
        vm=$(dpkg-deb -f "$main" Version)
        vu=$(dpkg-deb -f "$upd" Version)
        if [ "$vm" = "$vu" ]; then
            log "no upgrade of $p staged: $GUEST_SUITE and $GUEST_SUITE-updates both have $vm"
            continue
        fi
        old=$main new=$upd
        dpkg --compare-versions "$vm" gt "$vu" && old=$upd new=$main
        cp "$old" "$rdir/tmp/old.deb"
        DEBIAN_FRONTEND=noninteractive chroot "$rdir" dpkg -i /tmp/old.deb >>"$vol.tmp/debootstrap.log" 2>&1
        rm "$rdir/tmp/old.deb"
        cp "$new" "$rdir/var/cache/merge-debs/"
        echo "$p $(dpkg-deb -f "$new" Version) $(dpkg-deb -f "$old" Version)" >>"$vol.tmp/pkgs"
    done
    rm -rf "$rdir"/var/cache/apt/archives/*.deb "$rdir"/var/lib/apt/lists/* "$rdir"/usr/share/doc/* \
        "$rdir"/usr/share/man/* "$rdir"/usr/share/locale/*
    echo merge-guest >"$rdir/etc/hostname"
    used=$(du -sm "$rdir" | cut -f1)
    size=$((used + 128))
    mkfs.ext4 -q -F -L merge-os -d "$rdir" "$vol.tmp/os.ext4" "${size}M"
    mkfs.ext4 -q -F -L merge-data "$vol.tmp/data.ext4" 64M
    rm -rf "$rdir"
    echo "$vstamp" >"$vol.tmp/done"
    mv "$vol.tmp" "$vol"
    find "$CACHE" -maxdepth 1 -name 'merge-vol-*' ! -path "$vol" -exec rm -rf {} +
    log "merge guest volumes built in $(($(date +%s) - start)) s (OS volume ${size} MiB, ${used} MiB used)"
fi
# --- end volumes

istamp=$( (echo "${MODULES[*]} $kdir $vstamp"; cat "$here/merge-guest-init.sh") | sha256sum | cut -c1-16)
initrd="$CACHE/merge-initrd-$istamp.cpio.gz"
if [ ! -s "$initrd" ]; then
    iroot=$(mktemp -d)
    trap 'rm -rf "$iroot"' EXIT
    install_busybox "$iroot"
    copy_modules "$kdir" "$iroot" "${MODULES[@]}" >/dev/null
    echo "${MODULES[*]}" >"$iroot/merge-modules"
    cp "$vol/pkgs" "$iroot/merge-pkgs"
    install -m 755 "$here/merge-guest-init.sh" "$iroot/init"
    pack_initramfs "$iroot" "$initrd"
    find "$CACHE" -maxdepth 1 -name 'merge-initrd-*.cpio.gz' ! -path "$initrd" -delete
fi
echo "$kdir/vmlinuz"
echo "$initrd"
echo "$vol/os.ext4"
echo "$vol/data.ext4"
echo "$vol/pkgs"
