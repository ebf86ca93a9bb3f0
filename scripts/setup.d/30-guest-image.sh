#!/usr/bin/env bash
# Builds the Linux guest images the guest-agent harness boots under QEMU (TCG): the Debian cloud kernel,
# the busybox initramfs with the static guest-agent, the debootstrap ext4 root with CRIU and Java, and the
# newer kernel (bookworm-backports) the real-Linux upgrade test installs and restarts into.
# Installs QEMU and the image tools. Idempotent; cached under /var/cache/microvmm (cold: ~2-3 min).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=guest/common.sh
. guest/common.sh
need_host_pkgs qemu-system-x86 iproute2 debootstrap cpio gzip kmod e2fsprogs openjdk-17-jdk-headless
start=$(date +%s)
bash guest/build-linux-image.sh >/dev/null
bash guest/build-guest-image.sh | tail -n 3
# The kernel package (bookworm-backports) the real-Linux upgrade test installs in its guest.
bash guest/build-upgrade-kernel.sh | tail -n 3 \
    || echo "setup: no upgrade kernel from $GUEST_SUITE-backports; real_linux_upgrade upgrades packages only"
echo "setup: guest images ready in $(($(date +%s) - start)) s"
