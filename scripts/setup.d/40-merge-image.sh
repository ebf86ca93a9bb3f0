#!/usr/bin/env bash
# Real-guest merge test (tests/tests/real_guest_merge.rs): QEMU (TCG) and e2fsprogs, and the two-volume
# Debian guest guest/merge-build-image.sh builds (kernel + busybox initramfs, debootstrap minbase OS
# volume with staged .deb files, empty data volume). Idempotent; cached under /var/cache/microvmm.
# Cold: ~30-60 s (debootstrap and a few .deb downloads; the kernel is shared with 30-guest-image.sh);
# warm: < 1 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=guest/common.sh
. guest/common.sh
need_host_pkgs qemu-system-x86 qemu-utils debootstrap e2fsprogs cpio gzip kmod
start=$(date +%s)
bash guest/merge-build-image.sh | tail -n 5 >/dev/null
echo "setup: merge guest images ready in $(($(date +%s) - start)) s"
