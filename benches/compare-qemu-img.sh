#!/usr/bin/env bash
# Runs the merge benchmark workload (2 GiB raw base with 256 MiB of data; 256 MiB dirty, in
# random 64 KiB extents and sequential) through `qemu-img commit -t writeback` and through
# `microvmm disk merge` in one run, and prints both throughputs and their ratio.
#
# Both are durable: the qemu timing includes an fsync of the committed base (`sync FILE`),
# `microvmm disk merge` fsyncs its output itself. Both start with the dirty data in the page
# cache. Not run in CI; needs qemu-img and qemu-io (Debian: qemu-utils) and bc.
#
# Usage: benches/compare-qemu-img.sh [random|sequential ...]   (default: both)
# Env: WORK (scratch dir, default /var/tmp/microvmm-compare), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in qemu-img qemu-io bc; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install qemu-utils bc)" >&2; exit 1; }
done
patterns=("$@")
((${#patterns[@]})) || patterns=(random sequential)
WORK=${WORK:-/var/tmp/microvmm-compare}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p microvmm --bin microvmm -p microvmm-benches --bin mkworkload
BIN=$TARGET/release
DIRTY_MB=$(echo "256 * 1048576 / 1000000" | bc -l)

now() { date +%s.%N; }

for pattern in "${patterns[@]}"; do
    dir=$WORK/$pattern
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "== $pattern: building the workload in $dir"
    "$BIN/mkworkload" "$dir" "$pattern" >"$dir/extents"
    # qemu-img commit writes into the base: give it its own copy, and the same extents in a
    # qcow2 overlay.
    cp --sparse=always "$dir/base.img" "$dir/qbase.img"
    (cd "$dir" && qemu-img create -q -f qcow2 -b qbase.img -F raw overlay.qcow2)
    awk '{ printf "write -P %d %d %d\n", (NR % 250) + 1, $1, $2 }' "$dir/extents" >"$dir/qemu-io.cmds"
    qemu-io -f qcow2 "$dir/overlay.qcow2" <"$dir/qemu-io.cmds" >/dev/null
    sync

    t0=$(now)
    qemu-img commit -q -t writeback -f qcow2 "$dir/overlay.qcow2"
    sync "$dir/qbase.img"
    t1=$(now)
    qemu_s=$(echo "$t1 - $t0" | bc -l)

    t0=$(now)
    "$BIN/microvmm" disk merge "$dir/active" "$dir/upgrade" -o "$dir/merged" --progress never >/dev/null
    t1=$(now)
    mv_s=$(echo "$t1 - $t0" | bc -l)

    qemu_mbps=$(echo "$DIRTY_MB / $qemu_s" | bc -l)
    mv_mbps=$(echo "$DIRTY_MB / $mv_s" | bc -l)
    printf '%-10s qemu-img commit: %7.3f s %8.1f MB/s | microvmm disk merge: %7.3f s %8.1f MB/s | ratio %.2fx\n' \
        "$pattern" "$qemu_s" "$qemu_mbps" "$mv_s" "$mv_mbps" "$(echo "$mv_mbps / $qemu_mbps" | bc -l)"
    rm -rf "$dir"
done
