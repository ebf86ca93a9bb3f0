#!/usr/bin/env bash
# Runs the merge benchmark workload (2 GiB raw base with 256 MiB of data; 256 MiB dirty, in
# random 64 KiB extents and sequential) through `qemu-img commit -t writeback` and through
# `microvmm disk merge`, REPS times each (default 5), alternating which tool goes first, and
# prints each tool's median throughput, the ratio of the medians (ours / qemu) and the spread
# (min..max, and the ratio of each pair).
#
# Both are durable: the qemu timing includes an fsync of the committed base (`sync FILE`),
# `microvmm disk merge` fsyncs its output itself. Before every run the inputs are rebuilt from
# pristine copies, then `sync` and the page cache is dropped (needs root); then, with
# CACHE=warm (default), the tool's inputs are read once, so both start with their inputs in
# the page cache and nothing dirty (the merge's write side is measured); with CACHE=cold
# neither does (reading scattered extents from the disk is measured too).
# Two references run in the same rounds: a `dd` O_DIRECT sequential write of the same size, and
# `extent_floor`, the same extents written from memory into a sparse file (no reads) the way
# the merge writes them: what any tool writing these bytes through the page cache pays.
# Not run in CI; needs qemu-img and qemu-io (Debian: qemu-utils) and bc.
#
# Usage: benches/compare-qemu-img.sh [random|sequential ...]   (default: both)
# Env: WORK (scratch dir, default /var/tmp/microvmm-compare), CARGO_TARGET_DIR, REPS (5),
#      CACHE (warm|cold), MICROVMM (the binary to time, default the release build's).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in qemu-img qemu-io bc; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install qemu-utils bc)" >&2; exit 1; }
done
patterns=("$@")
((${#patterns[@]})) || patterns=(random sequential)
WORK=${WORK:-/var/tmp/microvmm-compare}
TARGET=${CARGO_TARGET_DIR:-target}
REPS=${REPS:-5}
CACHE=${CACHE:-warm}
[[ $CACHE == warm || $CACHE == cold ]] || { echo "CACHE must be warm or cold" >&2; exit 1; }
[[ -w /proc/sys/vm/drop_caches ]] || { echo "needs root (writes /proc/sys/vm/drop_caches)" >&2; exit 1; }
cargo build --release -q -p microvmm --bin microvmm -p microvmm-benches --bin mkworkload --bin extent_floor
BIN=$TARGET/release
MICROVMM=${MICROVMM:-$BIN/microvmm}
DIRTY_MB=$(echo "256 * 1048576 / 1000000" | bc -l)

now() { date +%s.%N; }

# The same for both tools before each run: nothing dirty, nothing cached, then (warm) the
# given input files read once.
settle() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    if [[ $CACHE == warm ]]; then
        cat "$@" >/dev/null
    fi
}

run_qemu() { # prints seconds
    local dir=$1
    rm -f "$dir/qbase.img" "$dir/overlay.qcow2"
    cp --sparse=always "$dir/base.img" "$dir/qbase.img"
    cp --sparse=always "$dir/overlay.pristine.qcow2" "$dir/overlay.qcow2"
    settle "$dir/overlay.qcow2"
    local t0 t1
    t0=$(now)
    qemu-img commit -q -t writeback -f qcow2 "$dir/overlay.qcow2"
    sync "$dir/qbase.img"
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}

run_ours() { # prints seconds
    local dir=$1
    rm -rf "$dir/merged" "$dir/merged.merging"
    settle "$dir"/active/* "$dir"/upgrade/*
    local t0 t1
    t0=$(now)
    "$MICROVMM" disk merge "$dir/active" "$dir/upgrade" -o "$dir/merged" --progress never >/dev/null
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}

run_dd() { # prints seconds: the device's sequential write rate in this run, for reference
    local dir=$1 t0 t1
    settle
    t0=$(now)
    dd if=/dev/zero of="$dir/dd.out" bs=1M count=256 oflag=direct conv=fdatasync status=none
    t1=$(now)
    rm -f "$dir/dd.out"
    echo "$t1 - $t0" | bc -l
}

run_floor() { # prints seconds: the same extents written from memory (see extent_floor.rs)
    local dir=$1
    rm -f "$dir/floor.out"
    settle
    "$BIN/extent_floor" "$dir/extents" "$dir/floor.out" "$(stat -c %s "$dir/base.img")"
    rm -f "$dir/floor.out"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

for pattern in "${patterns[@]}"; do
    dir=$WORK/$pattern
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "== $pattern: building the workload in $dir"
    "$BIN/mkworkload" "$dir" "$pattern" >"$dir/extents"
    # qemu-img commit writes into the base: it gets a fresh copy of it each run, and the same
    # extents in a qcow2 overlay (copied from a pristine one each run: commit empties it).
    cp --sparse=always "$dir/base.img" "$dir/qbase.img"
    (cd "$dir" && qemu-img create -q -f qcow2 -b qbase.img -F raw overlay.pristine.qcow2)
    awk '{ printf "write -P %d %d %d\n", (NR % 250) + 1, $1, $2 }' "$dir/extents" >"$dir/qemu-io.cmds"
    qemu-io -f qcow2 "$dir/overlay.pristine.qcow2" <"$dir/qemu-io.cmds" >/dev/null

    qs=() ms=() ds=() fs=()
    for ((r = 0; r < REPS; r++)); do
        if ((r % 2 == 0)); then
            q=$(run_qemu "$dir"); m=$(run_ours "$dir")
        else
            m=$(run_ours "$dir"); q=$(run_qemu "$dir")
        fi
        ds+=("$(run_dd "$dir")")
        fs+=("$(run_floor "$dir")")
        qs+=("$q") ms+=("$m")
        printf '%-10s run %d (%s first): qemu-img commit %6.3f s | microvmm disk merge %6.3f s | pair ratio %.2fx\n' \
            "$pattern" $((r + 1)) "$( ((r % 2 == 0)) && echo qemu || echo ours)" "$q" "$m" "$(echo "$q / $m" | bc -l)"
    done
    qmed=$(printf '%s\n' "${qs[@]}" | median)
    mmed=$(printf '%s\n' "${ms[@]}" | median)
    qmin=$(printf '%s\n' "${qs[@]}" | sort -g | head -1) qmax=$(printf '%s\n' "${qs[@]}" | sort -g | tail -1)
    mmin=$(printf '%s\n' "${ms[@]}" | sort -g | head -1) mmax=$(printf '%s\n' "${ms[@]}" | sort -g | tail -1)
    mbps() { echo "$DIRTY_MB / $1" | bc -l; }
    printf '%-10s reference: dd 256 MiB O_DIRECT sequential write, median %7.1f MB/s\n' \
        "$pattern" "$(mbps "$(printf '%s\n' "${ds[@]}" | median)")"
    printf '%-10s reference: the same extents written from memory (no reads; 1 MiB writeback kicks, fdatasync), median %7.1f MB/s\n' \
        "$pattern" "$(mbps "$(printf '%s\n' "${fs[@]}" | median)")"
    printf '%-10s medians of %d (%s inputs): qemu-img commit %7.1f MB/s (%.0f..%.0f) | microvmm disk merge %7.1f MB/s (%.0f..%.0f) | ratio %.2fx\n' \
        "$pattern" "$REPS" "$CACHE" \
        "$(mbps "$qmed")" "$(mbps "$qmax")" "$(mbps "$qmin")" \
        "$(mbps "$mmed")" "$(mbps "$mmax")" "$(mbps "$mmin")" \
        "$(echo "$qmed / $mmed" | bc -l)"
    printf '%-10s 3x qemu-img commit would take %7.1f MB/s\n' "$pattern" "$(echo "3 * $(mbps "$qmed")" | bc -l)"
    rm -rf "$dir"
done
