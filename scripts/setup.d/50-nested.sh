#!/usr/bin/env bash
# Nested hardware-KVM harness (scripts/nested.sh, tests named `nested_*`): QEMU and e2fsprogs, the level-1
# initramfs (busybox + kvm/kvm-amd/virtio modules of the Debian cloud kernel) and the guest-image disk (the
# minimal and full guest images on one ext4), built by guest/build-nested-image.sh. Idempotent; cached under
# /var/cache/microvmm. Cold (after 30-guest-image.sh, which fetches the kernel and builds the guest images):
# ~5 s; warm: < 1 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=guest/common.sh
. guest/common.sh
need_host_pkgs qemu-system-x86 e2fsprogs cpio gzip kmod
start=$(date +%s)
bash guest/build-nested-image.sh --images >/dev/null
# QEMU 10 from bookworm-backports for level 1 (see guest/fetch-nested-qemu.sh); the system's QEMU otherwise.
bash guest/fetch-nested-qemu.sh >/dev/null || echo "setup: the nested harness uses the system's QEMU"
echo "setup: nested harness images ready in $(($(date +%s) - start)) s"
