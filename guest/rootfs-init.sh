#!/bin/sh
# PID 1 script of the guest root file system (/sbin/microvmm-init): mounts the API file systems,
# configures the network from the kernel command line and execs the agent as init.
#   microvmm.hostname=NAME  microvmm.ip=ADDR/PREFIX  microvmm.agent=tcp:HOST:PORT|vsock:PORT
mount -t proc proc /proc
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
hostname microvmm-guest
listen=vsock:1024
for a in $(cat /proc/cmdline); do
    case "$a" in
    microvmm.hostname=*) hostname "${a#*=}" ;;
    microvmm.ip=*) ip=${a#*=} ;;
    microvmm.agent=*) listen=${a#*=} ;;
    esac
done
ip link set lo up
if [ -n "${ip:-}" ]; then
    ip link set eth0 up
    ip addr add "$ip" dev eth0
fi
echo "microvmm-init: $(hostname) ip=${ip:-none} agent=$listen" >/dev/console
exec /run/guest-agent init -- /run/guest-agent serve --listen "$listen"
