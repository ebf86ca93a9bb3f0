#!/bin/sh
# /init of the real-guest merge test's initramfs (busybox). Loads the virtio/ext4 modules, mounts the
# OS volume (/dev/vda, ext4 Debian root) and the data volume (/dev/vdb, ext4) and runs the role named by
# `merge.role=` on the kernel command line, printing results on the console as `MERGE ...` lines:
#   active  - the application: writes files app/<merge.prefix>1..<merge.files> on the data volume,
#             logs on the OS volume;
#   upgrade - installs (or upgrades) the .deb files staged in /var/cache/merge-debs with dpkg (chroot into the OS
#             volume) and writes a marker on the data volume (a non-owner write the merge must drop);
#   check   - mounts both volumes read-only and reports package versions and file checksums;
#   bench   - (benches/compare-qemu-nbd.sh) writes merge.mib MiB of random data to the raw /dev/vdb
#             with O_DIRECT, 64 KiB writes, then fsync, timed in the guest: `MERGE BENCH <bytes> <cs>`.
# Every role unmounts cleanly and powers off; the host reads the console log.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /merge-modules); do modprobe "$m" 2>/dev/null; done
say() { echo "MERGE $*" >/dev/console; }
role=none
files=40
mib=64
prefix=f
for a in $(cat /proc/cmdline); do
    case "$a" in
    merge.role=*) role=${a#*=} ;;
    merge.files=*) files=${a#*=} ;;
    merge.mib=*) mib=${a#*=} ;;
    merge.prefix=*) prefix=${a#*=} ;;
    esac
done
i=0
while { [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; } && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
# Reports the installed version and status of each staged package (listed in /merge-pkgs).
pkgs() {
    while read -r p _; do
        say "PKG $p $(chroot /os dpkg-query -W -f='${Version} ${Status}' "$p" 2>/dev/null)"
    done </merge-pkgs
}
off() {
    sync
    say "END $role $1"
    poweroff -f
    reboot -f
}
if [ "$role" = bench ]; then
    # The source is made first (tmpfs), so only the device writes are timed.
    mount -t tmpfs -o size=$((mib + 8))m tmpfs /tmp
    dd if=/dev/urandom of=/tmp/src bs=1048576 count="$mib" 2>/dev/null
    read -r t0 _ </proc/uptime
    dd if=/tmp/src of=/dev/vdb bs=65536 oflag=direct conv=fsync 2>/dev/null || say "ERROR dd failed"
    read -r t1 _ </proc/uptime
    say "BENCH $((mib * 1048576)) $(( (${t1%.*}${t1#*.}) - (${t0%.*}${t0#*.}) ))"
    off ok
fi
mkdir -p /os /data
ro=
[ "$role" = check ] && ro=-oro
mount -t ext4 $ro /dev/vda /os || { say "ERROR cannot mount the OS volume"; off fail; }
mount -t ext4 $ro /dev/vdb /data || { say "ERROR cannot mount the data volume"; off fail; }
say "START $role"
case "$role" in
active)
    mkdir -p /data/app /os/var/log
    n=1
    while [ $n -le "$files" ]; do
        # 1..64 KiB (plus a few odd bytes) of random data per file.
        kb=$(( ($(od -An -N2 -tu2 /dev/urandom) % 64) + 1 ))
        dd if=/dev/urandom of=/data/app/$prefix$n bs=1024 count=$kb 2>/dev/null
        head -c $((n * 7)) /dev/urandom >>/data/app/$prefix$n
        echo "app: wrote $prefix$n ($kb KiB) at $(date +%s)" >>/os/var/log/merge-app.log
        [ $((n % 8)) -eq 0 ] && sync
        n=$((n + 1))
    done
    sync
    for f in /data/app/*; do say "FILE ${f#/data/} $(sha256sum <"$f" | cut -d' ' -f1)"; done
    ;;
upgrade)
    mount -t proc proc /os/proc
    mount -t devtmpfs dev /os/dev
    mount -t tmpfs tmpfs /os/tmp
    if chroot /os /bin/sh -c 'DEBIAN_FRONTEND=noninteractive dpkg -i /var/cache/merge-debs/*.deb' \
        >/dev/console 2>&1; then
        say "DPKG ok"
    else
        say "ERROR dpkg failed"
    fi
    pkgs
    umount /os/tmp /os/dev /os/proc
    echo "written by the upgrade VM" >/data/upgrade-marker
    ;;
check)
    pkgs
    for f in /data/app/*; do say "FILE ${f#/data/} $(sha256sum <"$f" | cut -d' ' -f1)"; done
    [ -e /data/upgrade-marker ] && say "MARKER present"
    [ -e /os/var/log/merge-app.log ] && say "APPLOG present"
    ;;
*) say "ERROR unknown role $role" ;;
esac
umount /data || say "ERROR umount data"
umount /os || say "ERROR umount os"
off ok
