/*
 * "virtio_net" (C): a minimal polled virtio-net driver at CPL3 for `shared_nics` (1 or 2)
 * virtio-mmio devices at `shared_mmio_base[i]`. Negotiates VERSION_1, MAC and MRG_RXBUF, posts
 * 1 KiB receive buffers (so a full-size frame spans two), and answers, for its IPv4 address
 * `shared_ip[i]` (host byte order; default 10.0.i.2): ARP requests, ICMP echo requests, and UDP
 * datagrams, which it echoes to their sender. It re-reads its MAC address from the config space
 * at every ARP request and after a configuration-change interrupt. Runs until the host sets
 * `shared_stop`, then prints "virtio-net: ok" and reports 0x4e450000; a failure prints
 * "virtio-net: FAIL <step>" and reports 0x4e450000 + step. Counters: `shared_rx[i]` frames
 * received, `shared_tx[i]` sent, `shared_arp`, `shared_icmp`, `shared_udp` answered,
 * `shared_dropped` frames it could not parse or that were too large.
 */
#include "virtio_mmio.h"

#define NMAX 2
#define RXBUF 1024
#define TXBUF 1536
#define HDR 12
#define FRAME_MAX 1514

SHARED volatile u64 shared_nics = 1;
SHARED volatile u64 shared_mmio_base[NMAX] = { 0xd0000000ul, 0xd0001000ul };
SHARED volatile u64 shared_ip[NMAX] = { 0x0a000002ul, 0x0a000102ul };
SHARED volatile u64 shared_rx[NMAX];
SHARED volatile u64 shared_tx[NMAX];
SHARED volatile u64 shared_arp;
SHARED volatile u64 shared_icmp;
SHARED volatile u64 shared_udp;
SHARED volatile u64 shared_dropped;
SHARED volatile u64 shared_stop;


struct nic {
    u64 base;
    u32 ip;
    u8 mac[6];
    struct vq rx, tx;
    u16 tx_next, tx_inflight;
    u8 rxbuf[QSIZE][RXBUF] __attribute__((aligned(64)));
    u8 txbuf[QSIZE][TXBUF] __attribute__((aligned(64)));
};

static struct nic nics[NMAX];
static u8 frame[FRAME_MAX + 64];

static void fail(u64 step) { driver_fail("virtio-net", 0x4e450000ul, step); }

static void copy(u8 *d, const u8 *s, u64 n) { for (u64 i = 0; i < n; i++) d[i] = s[i]; }
static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put_be16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }

static void read_mac(struct nic *n)
{
    u32 lo = mmio_read32(n->base + 0x100);
    u32 hi = mmio_read32(n->base + 0x104);
    for (int i = 0; i < 4; i++)
        n->mac[i] = (u8)(lo >> (8 * i));
    n->mac[4] = (u8)hi;
    n->mac[5] = (u8)(hi >> 8);
}


/* Reclaims completed transmit buffers. */
static void tx_reap(struct nic *n)
{
    while (vq_used_idx(&n->tx) != n->tx.seen_used) {
        n->tx.seen_used++;
        n->tx_inflight--;
    }
}

/* Sends `len` bytes of `frame` (without header) on `n`, waiting for a free buffer. */
static void transmit(struct nic *n, u64 len)
{
    for (u64 spins = 0; n->tx_inflight == QSIZE; spins++) {
        tx_reap(n);
        if (spins > 2000000000ul)
            fail(60);
        cpu_relax();
    }
    u16 d = n->tx_next;
    n->tx_next = (u16)((d + 1) % QSIZE);
    u8 *b = n->txbuf[d];
    for (int i = 0; i < HDR; i++)
        b[i] = 0;
    copy(b + HDR, frame, len);
    n->tx_inflight++;
    vq_post(&n->tx, d, (u64)b, (u32)(HDR + len), 0);
    mmio_write32(n->base + 0x50, 1);
    shared_tx[n - nics]++;
}

static u16 csum(const u8 *p, u64 len)
{
    u64 sum = 0;
    for (u64 i = 0; i + 1 < len; i += 2)
        sum += be16(p + i);
    if (len & 1)
        sum += (u64)p[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

/* Answers the frame in `frame` (`len` bytes) if it is for us. */
static void handle(struct nic *n, u64 len)
{
    u8 *f = frame;
    if (len < 14)
        goto drop;
    u16 type = be16(f + 12);
    if (type == 0x0806) {
        u8 *a = f + 14;
        if (len < 14 + 28 || be16(a) != 1 || be16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4)
            goto drop;
        if (be16(a + 6) != 1 || be32(a + 24) != n->ip)
            return;
        read_mac(n);
        copy(f, a + 8, 6);   /* to the asker */
        copy(f + 6, n->mac, 6);
        put_be16(a + 6, 2);
        copy(a + 18, a + 8, 10); /* target = the sender's MAC and IP */
        copy(a + 8, n->mac, 6);
        a[14] = (u8)(n->ip >> 24);
        a[15] = (u8)(n->ip >> 16);
        a[16] = (u8)(n->ip >> 8);
        a[17] = (u8)n->ip;
        transmit(n, 42);
        shared_arp++;
        return;
    }
    if (type != 0x0800)
        return;
    u8 *ip = f + 14;
    if (len < 34 || (ip[0] >> 4) != 4)
        goto drop;
    u64 ihl = (u64)(ip[0] & 15) * 4;
    u64 total = be16(ip + 2);
    if (ihl < 20 || total < ihl || 14 + total > len)
        goto drop;
    if (be32(ip + 16) != n->ip)
        return;
    u8 *l4 = ip + ihl;
    u64 l4len = total - ihl;
    if (ip[9] == 1) {
        if (l4len < 8 || l4[0] != 8)
            return;
        l4[0] = 0;
        l4[2] = l4[3] = 0;
        put_be16(l4 + 2, csum(l4, l4len));
        shared_icmp++;
    } else if (ip[9] == 17) {
        if (l4len < 8)
            goto drop;
        u8 t[2];
        copy(t, l4, 2);
        copy(l4, l4 + 2, 2);
        copy(l4 + 2, t, 2);
        shared_udp++;
    } else {
        return;
    }
    /* Swap the addresses; the IP and UDP checksums do not change. */
    u8 t4[4];
    copy(t4, ip + 12, 4);
    copy(ip + 12, ip + 16, 4);
    copy(ip + 16, t4, 4);
    copy(f, f + 6, 6);
    copy(f + 6, n->mac, 6);
    transmit(n, 14 + total);
    return;
drop:
    shared_dropped++;
}

/* Takes every received frame off `n`'s receive queue; returns how many. */
static u64 poll_rx(struct nic *n)
{
    u64 got = 0;
    while (vq_used_idx(&n->rx) != n->rx.seen_used) {
        barrier();
        struct used_elem e = n->rx.used.ring[n->rx.seen_used % QSIZE];
        n->rx.seen_used++;
        if (e.id >= QSIZE || e.len < HDR || e.len > RXBUF)
            fail(50);
        u8 *b = n->rxbuf[e.id];
        u16 nbuf = (u16)(b[10] | b[11] << 8);
        u64 len = e.len - HDR;
        int fits = len <= FRAME_MAX;
        if (fits)
            copy(frame, b + HDR, len);
        vq_post(&n->rx, (u16)e.id, (u64)b, RXBUF, F_WRITE);
        for (u16 k = 1; k < nbuf; k++) {
            /* The device publishes all buffers of a frame at once. */
            if (vq_used_idx(&n->rx) == n->rx.seen_used)
                fail(51);
            e = n->rx.used.ring[n->rx.seen_used % QSIZE];
            n->rx.seen_used++;
            if (e.id >= QSIZE || e.len > RXBUF)
                fail(52);
            if (len + e.len > FRAME_MAX)
                fits = 0;
            if (fits)
                copy(frame + len, n->rxbuf[e.id], e.len);
            len += e.len;
            vq_post(&n->rx, (u16)e.id, (u64)n->rxbuf[e.id], RXBUF, F_WRITE);
        }
        mmio_write32(n->base + 0x50, 0);
        shared_rx[n - nics]++;
        got++;
        if (fits)
            handle(n, len);
        else
            shared_dropped++;
    }
    return got;
}

void guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu != 0) {
        for (;;)
            idle();
    }
    u64 count = shared_nics;
    if (count < 1 || count > NMAX)
        fail(1);
    for (u64 i = 0; i < count; i++) {
        struct nic *n = &nics[i];
        n->base = shared_mmio_base[i];
        n->ip = (u32)shared_ip[i];
        struct vq_addrs q[2] = {
            { n->rx.desc, &n->rx.avail, &n->rx.used },
            { n->tx.desc, &n->tx.avail, &n->tx.used },
        };
        /* MAC is feature bit 5, MRG_RXBUF bit 15. Steps 1..4 as virtio_mmio_init numbers them. */
        int step = virtio_mmio_init(n->base, 1, 1u << 5 | 1u << 15, q, 2);
        if (step)
            fail(10 * (i + 1) + (u64)step);
        read_mac(n);
        for (u16 d = 0; d < QSIZE; d++)
            vq_post(&n->rx, d, (u64)n->rxbuf[d], RXBUF, F_WRITE);
        mmio_write32(n->base + 0x50, 0);
    }
    while (!shared_stop) {
        u64 work = 0;
        for (u64 i = 0; i < count; i++) {
            work += poll_rx(&nics[i]);
            tx_reap(&nics[i]);
        }
        if (work)
            continue;
        for (u64 i = 0; i < count; i++) {
            struct nic *n = &nics[i];
            u32 isr = mmio_read32(n->base + 0x60);
            if (isr) {
                mmio_write32(n->base + 0x64, isr);
                if (isr & 2)
                    read_mac(n);
            }
        }
        idle();
    }
    serial_puts("virtio-net: ok\n");
    report(0x4e450000ul);
}
