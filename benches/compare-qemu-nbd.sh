#!/usr/bin/env bash
# Peer check of our NBD write path: the same client workload through `microvmm disk serve` (a delta
# over a raw base) and through `qemu-nbd` (a qcow2 overlay over the same raw base), in one run;
# prints both MB/s and the ratio (ours / qemu-nbd; target >= 1.0).
#
# Two workloads, each starting from a fresh, empty delta / overlay:
# 1. client-side: `qemu-img bench -w` as the NBD client over a Unix socket (queue depth 16, a flush
#    every 256 requests): sequential and strided ("random-like": a step of 7919 blocks, a prime, so
#    consecutive requests land far apart) with 4 KiB and 64 KiB requests. This measures the servers'
#    write paths (request handling, copy-on-write allocation, journal/metadata and flush cost), not
#    what a guest sees.
# 2. in-guest (when qemu-system-x86_64 and the merge guest of guest/merge-build-image.sh are
#    available; building it needs root): a Linux guest under QEMU TCG whose /dev/vdb is the NBD
#    export writes the same amount of random data with `dd bs=64k oflag=direct conv=fsync`, timed
#    inside the guest. TCG emulation costs are in both numbers (same guest, same QEMU), so the
#    ratio is the meaningful figure, not the absolute MB/s.
# Not run in CI; needs qemu-utils and bc (and qemu-system-x86 for part 2).
#
# Usage: benches/compare-qemu-nbd.sh [MiB per case, default 256]
# Env: WORK (scratch dir, default /var/tmp/microvmm-compare-nbd), CARGO_TARGET_DIR, REPS (client
# runs per server and case, default 3; medians are compared), SKIP_GUEST=1 (client part only).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in qemu-img qemu-nbd bc; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install qemu-utils bc)" >&2; exit 1; }
done
MIB=${1:-256}
WORK=${WORK:-/var/tmp/microvmm-compare-nbd}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p microvmm --bin microvmm
BIN=$TARGET/release/microvmm
SIZE_MIB=$((MIB * 4 > 1024 ? MIB * 4 : 1024))
rm -rf "$WORK"
mkdir -p "$WORK"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
"$BIN" disk create "$WORK/base.img" "${SIZE_MIB}M" >/dev/null

wait_sock() {
    local i
    for i in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done
    echo "no server socket $1" >&2
    return 1
}

# Runs qemu-img bench against URI $1 with request size $2 (bytes) and step $3 (bytes; 0 = sequential).
bench() {
    local uri=$1 bs=$2 step=$3 count
    count=$((MIB * 1048576 / bs))
    local args=(-w -f raw -c "$count" -d 16 -s "$bs" --flush-interval=256 --pattern=0xa5)
    [ "$step" -gt 0 ] && args+=(-S "$step")
    qemu-img bench "${args[@]}" "$uri" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'
}

# Starts server $1 (ours|qemu) on a fresh layer over the base and sets URI to its export (not
# in a subshell: the server must be this shell's child, with its pid in `pids`).
start_server() {
    if [ "$1" = ours ]; then
        rm -rf "$WORK/d" "$WORK/ours.sock"
        "$BIN" disk create -f delta -b "$WORK/base.img" "$WORK/d" >/dev/null
        "$BIN" disk serve --socket "$WORK/ours.sock" --export "d=$WORK/d" 2>/dev/null &
    else
        # A fresh qcow2 overlay over the same base, writeback cache (qemu-nbd's default).
        rm -f "$WORK/ovl.qcow2" "$WORK/qemu.sock"
        qemu-img create -q -f qcow2 -b "$WORK/base.img" -F raw "$WORK/ovl.qcow2"
        qemu-nbd -t -f qcow2 -x d -k "$WORK/qemu.sock" "$WORK/ovl.qcow2" &
    fi
    pids+=($!)
    wait_sock "$WORK/$1.sock"
    URI="nbd+unix:///d?socket=$WORK/$1.sock"
}

# Stops the server started last (ours flushes on SIGTERM) and syncs, so the next run starts
# with no dirty page cache left from this one.
stop_server() {
    kill -TERM "${pids[-1]}" 2>/dev/null || true
    wait "${pids[-1]}" || true
    sync
}

# One client run of server $1 on a fresh layer: prints the seconds. $2 = bytes, $3 = step.
run_once() {
    local secs
    start_server "$1"
    secs=$(bench "$URI" "$2" "$3")
    stop_server
    echo "$secs"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }

# Each case runs REPS times per server, alternating which server goes first, so that a slow
# moment of the (shared) machine hits both sides alike; the medians are compared.
REPS=${REPS:-3}
mb=$(echo "$MIB * 1048576 / 1000000" | bc -l)
printf '%-13s %10s %10s %7s   %s\n' case "ours MB/s" "qemu MB/s" ratio "ratio per pair"
for case in seq-4k seq-64k strided-4k strided-64k; do
    case $case in
    *-4k) bs=4096 ;;
    *) bs=65536 ;;
    esac
    step=0
    case $case in strided-*) step=$((7919 * 4096)) ;; esac
    ours=() qemu=() pairs=()
    for rep in $(seq "$REPS"); do
        if [ $((rep % 2)) -eq 1 ]; then
            o=$(run_once ours "$bs" "$step")
            q=$(run_once qemu "$bs" "$step")
        else
            q=$(run_once qemu "$bs" "$step")
            o=$(run_once ours "$bs" "$step")
        fi
        ours+=("$o") qemu+=("$q")
        pairs+=("$(printf '%.2f' "$(echo "$q / $o" | bc -l)")")
    done
    om=$(median "${ours[@]}") qm=$(median "${qemu[@]}")
    printf '%-13s %10.1f %10.1f %6.2fx   %s\n' "$case" "$(echo "$mb / $om" | bc -l)" \
        "$(echo "$mb / $qm" | bc -l)" "$(echo "$qm / $om" | bc -l)" "${pairs[*]}"
done

# --- in-guest workload ---
if [ -n "${SKIP_GUEST:-}" ] || ! command -v qemu-system-x86_64 >/dev/null; then
    echo "in-guest: skipped (SKIP_GUEST set or qemu-system-x86_64 not installed)"
    exit 0
fi
if ! mapfile -t img < <(bash guest/merge-build-image.sh 2>/dev/null | tail -n 5) || [ "${#img[@]}" -ne 5 ]; then
    echo "in-guest: skipped (guest/merge-build-image.sh failed; it needs root)"
    exit 0
fi
# Boots the guest with /dev/vdb = NBD URI $1; prints the guest-timed MB/s.
guest_bench() {
    local log=$WORK/guest.console
    rm -f "$log"
    timeout 600 qemu-system-x86_64 -accel tcg -cpu max -m $((MIB + 512)) -smp 1 -display none \
        -monitor none -no-reboot -serial "file:$log" -kernel "${img[0]}" -initrd "${img[1]}" \
        -append "console=ttyS0 quiet panic=-1 merge.role=bench merge.mib=$MIB" \
        -drive "file=${img[2]},format=raw,if=virtio,readonly=on" \
        -drive "file=$1,format=raw,if=virtio,cache=none"
    local line
    line=$(grep -a '^MERGE BENCH ' "$log" | tr -d '\r') || { echo "guest bench failed:" >&2; cat "$log" >&2; return 1; }
    set -- $line
    echo "$3 / 1000000 / ($4 / 100)" | bc -l
}
# One guest run of server $1 on a fresh layer: prints the guest-timed MB/s.
guest_once() {
    local mbs
    start_server "$1"
    mbs=$(guest_bench "$URI")
    stop_server
    echo "$mbs"
}
ours=() qemu=() pairs=()
for rep in $(seq "$REPS"); do
    if [ $((rep % 2)) -eq 1 ]; then
        o=$(guest_once ours)
        q=$(guest_once qemu)
    else
        q=$(guest_once qemu)
        o=$(guest_once ours)
    fi
    ours+=("$o") qemu+=("$q")
    pairs+=("$(printf '%.2f' "$(echo "$o / $q" | bc -l)")")
done
om=$(median "${ours[@]}") qm=$(median "${qemu[@]}")
printf '%-13s %10.1f %10.1f %6.2fx   %s\n' "guest-dd-64k" "$om" "$qm" "$(echo "$om / $qm" | bc -l)" "${pairs[*]}"
