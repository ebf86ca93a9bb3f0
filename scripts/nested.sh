#!/usr/bin/env bash
# Runs a command on hardware-style KVM one level down: boots a level-1 QEMU TCG VM (`-cpu max`, which
# exposes AMD-V; the Debian cloud kernel with kvm-amd loaded), gives it the files the command needs on a
# scratch ext4 disk built for this run, runs the command there, and returns its stdout, stderr and exit
# status. See docs/ARCHITECTURE.md, "Nested hardware-KVM harness".
#
# Usage: scripts/nested.sh [options] -- CMD [ARG...]
#   --timeout S        limit for CMD inside L1 (default 600); L1 is killed S + 120 s after it starts
#   --mem MiB          L1 RAM (default 3072)
#   --smp N            L1 vCPUs (default 1, or MICROVMM_NESTED_SMP: with two, QEMU's multi-threaded TCG
#                      made guest vCPUs triple-fault now and then in its nested SVM)
#   --file SRC[:DEST]  copy SRC (file or directory) to /nested/DEST in L1 (default DEST: basename of SRC);
#                      the shared libraries of dynamically linked ELF files come along (host's, via ldd)
#   --tool NAME        copy the host program NAME (and its libraries) into L1's PATH
#   --images           attach the guest-image disk at /images (vmlinuz, minimal.cpio.gz, guest-initrd.cpio.gz,
#                      guest-root.ext4, and upgrade-staging.ext4, upgrade-vmlinuz, upgrade-initrd.cpio.gz when
#                      built; writable, changes discarded); MICROVMM_GUEST_IMAGES=/images is set
#   --disk MiB         free space on the scratch disk (default 4096; sparse on the host)
#   --env NAME=VALUE   set an environment variable for CMD
#   --out DIR          also leave stdout, stderr, status, console.log, timing and qemu-debug.log (QEMU's
#                      -d cpu_reset,guest_errors log: an L1 crash's registers) in DIR
#   --console          stream L1's console to stderr while it runs
#   --keep             keep the work directory (printed) instead of removing it
# Environment: MICROVMM_NESTED_L1_APPEND (extra L1 kernel parameters), MICROVMM_NESTED_L1_CPU (L1's
# -cpu model and flags, default max,la57=off), MICROVMM_NESTED_TCG_THREAD
# (single | multi: QEMU's TCG threading for L1), MICROVMM_NESTED_QEMU (the QEMU binary).
# In L1, CMD runs with /nested (the scratch disk) as working directory, TMPDIR=/nested/tmp and
# MICROVMM_NESTED_L1=1. Exit status: CMD's; 124 if CMD or L1 timed out; 123 if L1 ended without CMD's status
# (it crashed or reset: QEMU's `cpu_reset` log tail is printed; CMD's output up to L1's last sync is given);
# 77 if the harness cannot run here (no QEMU, no cached kernel or images: a line `nested: SKIP: <reason>` on
# stderr); 125 on a harness error.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

timeout_s=600
mem=3072
smp=${MICROVMM_NESTED_SMP:-1}
disk_free=4096
images=0
console=0
keep=0
out=""
files=()
tools=()
envs=()
while (($#)); do
    case $1 in
    --timeout) timeout_s=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --smp) smp=$2; shift 2 ;;
    --file) files+=("$2"); shift 2 ;;
    --tool) tools+=("$2"); shift 2 ;;
    --images) images=1; shift ;;
    --disk) disk_free=$2; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --out) out=$2; shift 2 ;;
    --console) console=1; shift ;;
    --keep) keep=1; shift ;;
    --) shift; break ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "nested: unknown option $1 (see --help)" >&2; exit 125 ;;
    esac
done
(($#)) || { echo "nested: no command given (scripts/nested.sh [options] -- CMD...)" >&2; exit 125; }

say() { echo "nested: $*" >&2; }
skip() {
    say "SKIP: $*"
    exit 77
}
fail() {
    say "error: $*"
    exit 125
}

# QEMU: MICROVMM_NESTED_QEMU if set, else the one guest/fetch-nested-qemu.sh unpacked (bookworm-backports'
# 10.x: bookworm's 7.2 has nested-SVM faults), else the system's. Its data directory beside it
# (../share/qemu) is searched first for option ROMs.
cache=${MICROVMM_CACHE:-/var/cache/microvmm}
qemu=${MICROVMM_NESTED_QEMU:-$(ls -d "$cache"/qemu-bpo/*/root/usr/bin/qemu-system-x86_64 2>/dev/null | sort -V | tail -n1)}
qemu=${qemu:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || skip "$qemu is not installed (scripts/setup.d/50-nested.sh installs it)"
qemu_data=()
qdir=$(cd "$(dirname "$(command -v "$qemu")")/../share/qemu" 2>/dev/null && pwd || true)
[ -n "$qdir" ] && qemu_data=(-L "$qdir")
command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || skip "mkfs.ext4/debugfs (e2fsprogs) missing"

work=$(mktemp -d "${TMPDIR:-/tmp}/nested.XXXXXX")
qpid=""
tailpid=""
# Ends QEMU: SIGTERM, then SIGKILL if it is still there 10 s later.
stop_qemu() {
    kill "$qpid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$qpid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$qpid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
        stop_qemu
        wait "$qpid" 2>/dev/null || true
    fi
    if [ -n "$tailpid" ]; then
        kill "$tailpid" 2>/dev/null || true
    fi
    if ((keep)); then
        say "work directory kept: $work"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- L1 kernel, initramfs and (optionally) the guest-image disk, from the cache ---
img_args=(--cached)
((images)) && img_args+=(--images)
if ! paths=$(bash "$repo/guest/build-nested-image.sh" "${img_args[@]}" 2>"$work/build.err"); then
    reason=$(grep -v '^guest: building' "$work/build.err" | tail -n 1 | sed 's/^guest: //')
    skip "${reason:-cannot build the L1 image}"
fi
mapfile -t p <<<"$paths"
kernel=${p[0]}
l1initrd=${p[1]}
imgdisk=${p[2]:-}

# --- scratch disk: the files, their libraries, the command ---
stage="$work/stage"
sys="$stage/.sys"
mkdir -p "$sys/lib" "$sys/bin" "$sys/etc" "$stage/.out" "$stage/tmp"
add_libs() { # the shared libraries (and interpreter) ldd lists for ELF file $1
    local f=$1 lib
    head -c 4 "$f" 2>/dev/null | grep -q 'ELF' || return 0
    while read -r lib; do
        [ -n "$lib" ] && [ -e "$lib" ] && [ ! -e "$sys/lib/$(basename "$lib")" ] && cp -L "$lib" "$sys/lib/"
    done < <(ldd "$f" 2>/dev/null | grep -oE '(=> )?/[^ ]+' | sed 's/^=> //')
    return 0
}
put() { # copies $1 to $2 (hard link when possible)
    mkdir -p "$(dirname "$2")"
    if [ -d "$1" ]; then
        cp -a "$1" "$2"
    else
        ln -f "$1" "$2" 2>/dev/null || cp -L "$1" "$2"
    fi
}
for spec in "${files[@]}"; do
    src=${spec%%:*}
    dest=${spec#*:}
    [ "$dest" = "$spec" ] && dest=$(basename "$src")
    [ -e "$src" ] || fail "--file $src: no such file"
    put "$src" "$stage/$dest"
    if [ -d "$src" ]; then
        while IFS= read -r -d '' f; do add_libs "$f"; done < <(find "$src" -type f -perm -u+x -print0)
    else
        add_libs "$src"
    fi
done
for t in "${tools[@]}"; do
    tp=$(command -v "$t") || fail "--tool $t: not found on the host"
    cp -L "$tp" "$sys/bin/$t"
    add_libs "$tp"
    case $t in mkfs.ext* | mke2fs) [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$sys/etc/" ;; esac
done
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
{
    echo "limit=$timeout_s"
} >"$sys/env"
{
    for e in "${envs[@]}"; do echo "export $(q "$e")"; done
    ((images)) && echo "export MICROVMM_GUEST_IMAGES=/images"
    printf 'exec'
    for a in "$@"; do printf ' %s' "$(q "$a")"; done
    echo
} >"$sys/run.sh"
used=$(du -sm "$stage" | cut -f1)
scratch="$work/scratch.ext4"
mkfs.ext4 -q -F -L nested-scratch -O ^has_journal -d "$stage" "$scratch" "$((used + used / 10 + disk_free))M" >/dev/null \
    || fail "mkfs.ext4 of the scratch disk failed"
rm -rf "$stage"

# --- L1 ---
drives=(-drive "file=$scratch,format=raw,if=virtio,cache=unsafe")
if [ -n "$imgdisk" ]; then
    drives+=(-drive "file=$imgdisk,format=raw,if=virtio,snapshot=on,cache=unsafe")
fi
limit_l1=$((timeout_s + 120))
# L1's timer: the LAPIC's one-shot mode. With TSC-deadline mode, an L1 once went idle for good (both
# vCPUs halted, its 5 s sync loop stopped) while a test waited: a timer interrupt QEMU's TCG never
# delivered. (A periodic tick, nohz=off, was tried too and left out: more interrupts, and L1 kernel
# panics in the window after a #VMEXIT, see docs/ARCHITECTURE.md, came sooner.)
l1_timer="lapic=notscdeadline"
# No 5-level paging at L1 (so none for the guests either): guests under microvmm in L1 triple-faulted
# now and then, at random moments of a plain boot too (the vCPU found reset, RIP 0xfff0), and L1 itself
# died in the window after a #VMEXIT; 5-level paging under TCG's nested SVM is the least-trodden path.
l1_cpu="max,la57=off"
# MICROVMM_NESTED_L1_CPU replaces it for experiments (e.g. "max,la57=off,avx512f=off").
l1_cpu=${MICROVMM_NESTED_L1_CPU:-$l1_cpu}
# Extra L1 kernel parameters for experiments (e.g. kvm_amd.npt=0: L1's KVM on shadow paging).
l1_extra=${MICROVMM_NESTED_L1_APPEND:-}
# TCG threading for experiments: MICROVMM_NESTED_TCG_THREAD=single runs all L1 vCPUs on one host thread
# (QEMU's default here is multi-threaded TCG, one host thread per vCPU).
tcg_thread=${MICROVMM_NESTED_TCG_THREAD:-}
case $tcg_thread in "" | single | multi) ;; *) fail "MICROVMM_NESTED_TCG_THREAD must be single or multi" ;; esac
accel=tcg${tcg_thread:+,thread=$tcg_thread}
say "L1: $("$qemu" --version | head -n1 | sed 's/ (.*//'), ${accel^^} -cpu $l1_cpu, ${mem} MiB, ${smp} vCPUs; scratch disk ${used} MiB used; command limit ${timeout_s} s${l1_extra:+; kernel parameters: $l1_extra}"
say "L1: console $work/console.log, QEMU monitor $work/monitor.sock (e.g. socat - UNIX-CONNECT:...)"
start=$(date +%s.%N)
TMPDIR=$work "$qemu" "${qemu_data[@]}" -accel "$accel" -cpu "$l1_cpu" -m "$mem" -smp "$smp" -nodefaults -no-user-config \
    -display none -serial "file:$work/console.log" -monitor "unix:$work/monitor.sock,server=on,wait=off" \
    -no-reboot -rtc base=utc \
    -d cpu_reset,guest_errors -D "$work/qemu-debug.log" \
    -kernel "$kernel" -initrd "$l1initrd" \
    -append "console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable $l1_timer $l1_extra" "${drives[@]}" \
    </dev/null >"$work/qemu.log" 2>&1 &
qpid=$!
if ((console)); then
    tail -n +1 -F "$work/console.log" 2>/dev/null >&2 &
    tailpid=$!
fi
# A halted L1 vCPU is not always woken for an interrupt pending in its local APIC (QEMU's TCG): an L1
# stopped for minutes with its LAPIC timer vector in IRR, IF set, in its idle loop, until a key press
# (an IOAPIC interrupt) woke it. So from 10 s after its start, a shift key goes to L1 every 5 s (no
# character on any console; harmless before its keyboard driver is up), through the monitor.
kick() {
    python3 -c 'import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
time.sleep(0.05)
s.sendall(b"sendkey shift\n")
time.sleep(0.1)' "$work/monitor.sock" 2>/dev/null
}
can_kick=0
command -v python3 >/dev/null && can_kick=1
((can_kick)) || say "python3 not found: L1 gets no wake-up key presses"
kicks=0
next_kick=$(($(date +%s) + 10))
timed_out=0
while kill -0 "$qpid" 2>/dev/null; do
    now=$(date +%s)
    if ((now - ${start%.*} > limit_l1)); then
        timed_out=1
        stop_qemu
        break
    fi
    if ((can_kick && now >= next_kick)); then
        kick && kicks=$((kicks + 1))
        next_kick=$((now + 5))
    fi
    sleep 0.2
done
wait "$qpid" 2>/dev/null && qrc=0 || qrc=$?
qpid=""
end=$(date +%s.%N)
if [ -n "$tailpid" ]; then
    sleep 0.3
    kill "$tailpid" 2>/dev/null || true
    tailpid=""
fi

# --- results, read off the scratch disk ---
res="$work/result"
mkdir -p "$res"
for f in stdout stderr status; do
    debugfs -R "dump /.out/$f $res/$f" "$scratch" >/dev/null 2>&1 || true
done
cp "$work/console.log" "$res/console.log" 2>/dev/null || : >"$res/console.log"
# QEMU's -d log: an L1 crash's CPU state (registers at the triple fault) for whoever looks into it.
tail -n 400 "$work/qemu-debug.log" >"$res/qemu-debug.log" 2>/dev/null || true
ready=$(sed -n 's/^nested-l1: ready after \([0-9.]*\) s.*/\1/p' "$res/console.log" | head -n1)
done_at=$(sed -n 's/^nested-l1: command exited with [0-9]* after \([0-9.]*\) s.*/\1/p' "$res/console.log" | head -n1)
wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
cmd_s="?"
[ -n "$ready" ] && [ -n "$done_at" ] && cmd_s=$(awk -v a="$ready" -v b="$done_at" 'BEGIN { printf "%.1f", b - a }')
printf 'l1_ready_s=%s\ncommand_s=%s\nwall_s=%s\n' "${ready:-?}" "$cmd_s" "$wall" >"$res/timing"
if [ -n "$out" ]; then
    mkdir -p "$out"
    cp "$res"/* "$out"/
fi
[ -f "$res/stdout" ] && cat "$res/stdout"
[ -f "$res/stderr" ] && cat "$res/stderr" >&2
status=$(cat "$res/status" 2>/dev/null || true)
say "L1 ready after ${ready:-?} s (guest uptime), command ${cmd_s} s, wall ${wall} s; ${kicks} wake-up key presses"
if ((timed_out)); then
    say "L1 did not finish within ${limit_l1} s; console tail:"
    tail -n 30 "$res/console.log" >&2
    exit 124
fi
if [ -z "$status" ]; then
    say "no exit status from L1 (qemu exit $qrc: L1 crashed or reset); console tail:"
    tail -n 30 "$res/console.log" >&2
    tail -n 5 "$work/qemu.log" >&2
    # QEMU logs a triple fault (then, with -no-reboot, ends) and guest errors under -d.
    say "QEMU's log of L1 faults and guest errors (-d cpu_reset,guest_errors), last lines:"
    grep -v -E '^(CPU Reset|[A-Z][A-Z0-9 ]{1,5}=|[A-Z]{2,3} *=|FPR|XMM|YMM|ZMM|Opmask|PKRU)' "$work/qemu-debug.log" 2>/dev/null \
        | tail -n 8 >&2 || true
    exit 123
fi
# busybox timeout -s KILL: the command ends with status 137.
if [ "$status" = 137 ] && [ "$cmd_s" != "?" ] && awk -v c="$cmd_s" -v l="$timeout_s" 'BEGIN { exit !(c >= l - 1) }'; then
    say "the command was killed (time limit ${timeout_s} s or SIGKILL)"
    exit 124
fi
exit "$status"
