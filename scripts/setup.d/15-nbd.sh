#!/usr/bin/env bash
# block: the NBD interoperability test drives our server with qemu-io (Debian qemu-utils).
set -euo pipefail
if ! command -v qemu-io >/dev/null; then
    echo "setup: nbd: installing qemu-utils"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
fi
