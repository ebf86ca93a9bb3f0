#!/bin/sh
# Runs inside the nested harness's level 1: a test binary's test, with its output on L1's console as it
# comes; dumps every thread's stack (eu-stack) once when a backup console of an upgrade shows an RCU stall,
# and dumps them and kills the test when its output stalls for 5 minutes. How this session's clone deadlock
# and the stopped guest vCPUs were caught. From the host, e.g.:
#   scripts/nested.sh --timeout 2400 --images --tool mkfs.ext4 --tool e2fsck --tool ip --tool eu-stack \
#       --file target/debug/deps/real_linux_upgrade-HASH:rlu --file scripts/nested-watchdog.sh:watchdog.sh \
#       --out /tmp/run -- sh ./watchdog.sh ./rlu real_linux_upgrade
# (then look at /tmp/run/console.log, or at the live console the script names).
bin=$1
test=$2
log=/nested/tmp/watchdog-test.log
"$bin" --exact "$test" --nocapture > "$log" 2>&1 &
p=$!
tail -f "$log" > /dev/console &
t=$!
last=0; still=0; dumped=0
while kill -0 $p 2>/dev/null; do
    sleep 15
    if [ $dumped = 0 ] && grep -l "detected stalls" /nested/tmp/.tmp*/upgrade*/backup.console >/dev/null 2>&1; then
        dumped=1
        echo "WATCHDOG: RCU stall on a backup console; stacks:" > /dev/console
        grep -h -B2 -A12 "detected stalls" /nested/tmp/.tmp*/upgrade*/backup.console | head -40 > /dev/console
        eu-stack -p $p -n 12 2>&1 | grep -v '^#[0-9]* *0x[0-9a-f]* *\(std::\|core::\|_R\|alloc::\)' > /dev/console
    fi
    n=$(wc -c < "$log")
    if [ "$n" = "$last" ]; then still=$((still + 1)); else still=0; last=$n; fi
    if [ $still -ge 20 ]; then
        echo "WATCHDOG: no output for 5 minutes; stacks:" > /dev/console
        eu-stack -p $p -n 16 > /dev/console 2>&1
        kill -9 $p
        break
    fi
done
wait $p
rc=$?
kill $t
exit $rc
