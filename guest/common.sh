# Shared helpers for the guest image builders (sourced, not run).
# Everything comes from Debian bookworm packages fetched with apt/debootstrap from the mirror the host's
# apt already uses; results are cached under $MICROVMM_CACHE (default /var/cache/microvmm).
set -euo pipefail

CACHE="${MICROVMM_CACHE:-/var/cache/microvmm}"
GUEST_SUITE=bookworm
# Kernel modules the guests need: virtio transports/devices, vsock, and what CRIU needs inside the guest.
VIRTIO_MODULES=(virtio_mmio virtio_pci virtio_blk virtio_net virtio_console vmw_vsock_virtio_transport
    vsock vsock_loopback ext4 af_packet)
CRIU_MODULES=(veth unix_diag inet_diag tcp_diag udp_diag af_packet_diag netlink_diag tun nf_tables nft_compat
    xt_mark xt_tcpudp nf_conntrack nft_ct ip_tables iptable_filter x_tables nf_reject_ipv4 nft_reject_inet
    nft_reject)
# The ACPI power button (microvmm's Shutdown) as an input device the agent (init) watches.
POWER_MODULES=(button evdev)

log() { echo "guest: $*" >&2; }

# The Debian mirror the host apt uses (first deb.debian.org-style http URI), default deb.debian.org.
debian_mirror() {
    local m
    m=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
        | grep -oE 'https?://[^ ]+' | grep -v security | head -n1 || true)
    echo "${m:-http://deb.debian.org/debian}"
}

# Installs host tools (Debian packages) the builders need, if missing.
need_host_pkgs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing host packages ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# apt-get/apt-cache ($3) against a private package list under $1 for suite $2 of the Debian mirror (works
# whatever release the host runs).
apt_for() {
    local root=$1 suite=$2 tool=$3
    shift 3
    mkdir -p "$root/lists/partial" "$root/archives/partial" "$root/etc"
    if [ ! -s "$root/etc/sources.list" ]; then
        echo "deb $(debian_mirror) $suite main" >"$root/etc/sources.list"
    fi
    "$tool" -q -o Dir::Etc::SourceList="$root/etc/sources.list" -o Dir::Etc::SourceParts=/nonexistent \
        -o Dir::State::Lists="$root/lists" -o Dir::Cache::Archives="$root/archives" \
        -o Dir::Cache::pkgcache="$root/pkgcache.bin" -o Dir::Cache::srcpkgcache="$root/srcpkgcache.bin" \
        -o APT::Architecture=amd64 -o APT::Sandbox::User=root "$@"
}

# Refreshes the package lists of apt_for's $1/$2 once a day; without network, lists from an earlier run do.
apt_lists_fresh() {
    local root=$1 suite=$2
    find "$root/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | grep -q . && return 0
    apt_for "$root" "$suite" apt-get update -qq >/dev/null \
        || find "$root/lists" -maxdepth 1 -name '*Packages*' 2>/dev/null | grep -q . \
        || { log "cannot fetch the $suite package lists"; return 1; }
}

# apt-get/apt-cache ($1) against a private bookworm package list.
guest_apt() { apt_for "$CACHE/apt" "$GUEST_SUITE" "$@"; }

# The same against bookworm-backports (its lists refreshed once a day first).
bpo_apt() {
    apt_lists_fresh "$CACHE/apt-bpo" "$GUEST_SUITE-backports" || return
    apt_for "$CACHE/apt-bpo" "$GUEST_SUITE-backports" "$@"
}

# Downloads a bookworm package's .deb into $2 (a directory) and prints its path.
fetch_deb() {
    local pkg=$1 dir=$2
    mkdir -p "$dir"
    (cd "$dir" && guest_apt apt-get download "$pkg" >/dev/null)
    ls -t "$dir"/"${pkg}"_*.deb | head -n1
}

# Unpacks the Debian cloud kernel into $CACHE/kernel/<version>/ (vmlinuz + lib/modules) once;
# prints that directory.
fetch_kernel() {
    local meta ver dir deb
    apt_lists_fresh "$CACHE/apt" "$GUEST_SUITE" || return 1
    meta=$(guest_apt apt-cache show linux-image-cloud-amd64 2>/dev/null | sed -n 's/^Depends: *//p' | head -n1)
    ver=$(echo "$meta" | grep -oE 'linux-image-[0-9][^ ,]*-cloud-amd64' | head -n1)
    [ -n "$ver" ] || { log "cannot resolve linux-image-cloud-amd64"; return 1; }
    dir="$CACHE/kernel/${ver#linux-image-}"
    if [ ! -s "$dir/vmlinuz" ]; then
        log "fetching $ver"
        rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
        deb=$(fetch_deb "$ver" "$CACHE/debs")
        dpkg-deb -x "$deb" "$dir.tmp/x"
        cp "$dir.tmp"/x/boot/vmlinuz-* "$dir.tmp/vmlinuz"
        mv "$dir.tmp/x/lib" "$dir.tmp/lib"
        depmod -b "$dir.tmp" "$(ls "$dir.tmp/lib/modules" | head -n1)"
        rm -rf "$dir.tmp/x" "$dir"
        mv "$dir.tmp" "$dir"
    fi
    echo "$dir"
}

# Copies modules $3.. (with their dependencies, from modules.dep) of kernel dir $1 into initramfs root $2.
copy_modules() {
    local kdir=$1 root=$2
    shift 2
    local kver mdir m f dep
    kver=$(ls "$kdir/lib/modules" | head -n1)
    mdir="$kdir/lib/modules/$kver"
    mkdir -p "$root/lib/modules/$kver"
    : >"$root/lib/modules/$kver/modules.dep"
    declare -A seen=()
    local queue=("$@")
    while ((${#queue[@]})); do
        m=${queue[0]}
        queue=("${queue[@]:1}")
        [ -n "${seen[$m]:-}" ] && continue
        seen[$m]=1
        f=$(grep -E "(^|/)${m//_/[_-]}\.ko(\.[a-z]+)?:" "$mdir/modules.dep" | head -n1 || true)
        [ -n "$f" ] || { log "module $m is built in or absent; skipping"; continue; }
        grep -E "^${f%%:*}:" "$mdir/modules.dep" >>"$root/lib/modules/$kver/modules.dep"
        for dep in ${f#*:}; do
            queue+=("$(basename "$dep" | sed -E 's/\.ko(\.[a-z]+)?$//')")
        done
        mkdir -p "$root/lib/modules/$kver/$(dirname "${f%%:*}")"
        cp "$mdir/${f%%:*}" "$root/lib/modules/$kver/${f%%:*}"
    done
    # busybox's modprobe hands the file to the kernel as it is: compressed modules (Debian's kernels
    # from 6.x on ship .ko.xz) are stored uncompressed.
    local z
    while IFS= read -r -d '' z; do
        case $z in
        *.xz) xz -d -f "$z" ;;
        *.zst) zstd -q -d --rm -f "$z" ;;
        *.gz) gzip -d -f "$z" ;;
        esac
    done < <(find "$root/lib/modules/$kver" -name '*.ko.*' -print0)
    sed -i -E 's/\.ko\.(xz|zst|gz)/.ko/g' "$root/lib/modules/$kver/modules.dep"
    sort -u -o "$root/lib/modules/$kver/modules.dep" "$root/lib/modules/$kver/modules.dep"
    echo "$kver"
}

# Installs busybox-static into initramfs root $1 (with applet links).
install_busybox() {
    local root=$1 deb
    deb=$(fetch_deb busybox-static "$CACHE/debs")
    rm -rf "$CACHE/busybox.x" && dpkg-deb -x "$deb" "$CACHE/busybox.x"
    mkdir -p "$root/bin" "$root/sbin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/run" "$root/newroot"
    cp "$CACHE/busybox.x/bin/busybox" "$root/bin/busybox"
    local a
    for a in $("$root/bin/busybox" --list); do
        [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
    done
}

# Packs initramfs root $1 into a gzip'd newc cpio at $2 (atomically).
pack_initramfs() {
    (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -9n >"$2.tmp"
    mv "$2.tmp" "$2"
}

# Builds the full guest's initramfs at $3 for kernel dir $1 (vmlinuz + lib/modules) with agent binary $2:
# busybox-static, the virtio and CRIU modules, the static agent; its /init loads the modules, mounts
# /dev/vda (ext4) and switches to it with the agent as PID 1 (via the root's /sbin/microvmm-init).
guest_initramfs() {
    local kdir=$1 agent=$2 out=$3 iroot
    iroot=$(mktemp -d)
    install_busybox "$iroot"
    copy_modules "$kdir" "$iroot" "${VIRTIO_MODULES[@]}" "${CRIU_MODULES[@]}" "${POWER_MODULES[@]}" >/dev/null
    install -s -m 755 "$agent" "$iroot/guest-agent"
    {
        echo '#!/bin/sh'
        echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
        echo "for m in ${VIRTIO_MODULES[*]} ${CRIU_MODULES[*]} ${POWER_MODULES[*]}; do modprobe \$m 2>/dev/null; done"
        cat <<'INIT'
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 /dev/vda /newroot; then
    echo "microvmm-initramfs: cannot mount /dev/vda; shell" >/dev/console
    exec setsid cttyhack /bin/sh
fi
mount -t tmpfs -o mode=755 run /newroot/run
cp /guest-agent /newroot/run/guest-agent
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/microvmm-init
INIT
    } >"$iroot/init"
    chmod 755 "$iroot/init"
    pack_initramfs "$iroot" "$out"
    rm -rf "$iroot"
}
