/*
 * "virtio_vsock" (C): a minimal virtio-vsock driver at CPL3 for the first virtio-mmio device,
 * polled (no interrupts). `shared_mode` 0: listen on port `shared_port`, accept one connection,
 * echo every byte back until the host shuts it down. `shared_mode` 1: connect to host port
 * `shared_port`, send "ping from guest\n", expect "pong from host\n", shut down.
 * Prints "virtio-vsock: ok" or "virtio-vsock: FAIL <step>"; reports 0x50c0000 + step.
 */
#include "virtio_mmio.h"
#include "virtio_vsock.h"

SHARED volatile u64 shared_mmio_base = 0xd0000000ul;
SHARED volatile u64 shared_mode = 0;
SHARED volatile u64 shared_port = 1234;
SHARED volatile u64 shared_echoed = 0;

#define NRX 4
#define BUFSZ 4096

static struct vq q[3];
static u8 rxbuf[NRX][BUFSZ + sizeof(struct hdr)];
static u8 txbuf[BUFSZ + sizeof(struct hdr)];
static u64 base, cid;
static u32 fwd_cnt;

static u32 rd(u64 off) { return mmio_read32(base + off); }
static void wr(u64 off, u32 v) { mmio_write32(base + off, v); }

static void fail(u64 step) { driver_fail("virtio-vsock", 0x50c0000ul, step); }

static void post(int qi, u16 d, u64 addr, u32 len, u16 flags) { vq_post(&q[qi], d, addr, len, flags); }

static void send(u16 op, u32 src_port, u32 dst_port, const u8 *data, u32 len, u32 flags)
{
    struct hdr *h = (struct hdr *)txbuf;
    h->src_cid = cid;
    h->dst_cid = HOST_CID;
    h->src_port = src_port;
    h->dst_port = dst_port;
    h->len = len;
    h->type = 1;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = 64 * 1024;
    h->fwd_cnt = fwd_cnt;
    for (u32 i = 0; i < len; i++)
        txbuf[sizeof(struct hdr) + i] = data[i];
    post(1, 0, (u64)txbuf, sizeof(struct hdr) + len, 0);
    wr(0x50, 1);
    for (u64 spins = 0; *(volatile u16 *)&q[1].used.idx != q[1].next_avail; spins++) {
        if (spins > 2000000000ul)
            fail(90);
        cpu_relax();
    }
}

/* Waits for the next RX packet; copies its header and payload out and re-posts the buffer. */
static struct hdr recv(u8 *data)
{
    struct vq *v = &q[0];
    for (u64 spins = 0; *(volatile u16 *)&v->used.idx == v->seen_used; spins++) {
        if (spins > 4000000000ul)
            fail(91);
        cpu_relax();
    }
    barrier();
    struct used_elem e = v->used.ring[v->seen_used % QSIZE];
    v->seen_used++;
    if (e.id >= NRX || e.len < sizeof(struct hdr))
        fail(92);
    struct hdr h = *(struct hdr *)rxbuf[e.id];
    if (h.len > BUFSZ || sizeof(struct hdr) + h.len > e.len)
        fail(93);
    for (u32 i = 0; i < h.len; i++)
        data[i] = rxbuf[e.id][sizeof(struct hdr) + i];
    fwd_cnt += h.len;
    post(0, (u16)e.id, (u64)rxbuf[e.id], sizeof(rxbuf[0]), F_WRITE);
    wr(0x50, 0);
    return h;
}

static int eq(const u8 *a, const char *b, u32 n)
{
    for (u32 i = 0; i < n; i++)
        if (a[i] != (u8)b[i] || !b[i])
            return 0;
    return b[n] == 0;
}

void guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu != 0) {
        for (;;)
            cpu_relax();
    }
    base = shared_mmio_base;
    struct vq_addrs qa[3];
    for (u32 i = 0; i < 3; i++)
        qa[i] = (struct vq_addrs){ q[i].desc, &q[i].avail, &q[i].used };
    /* Steps 1..4 as virtio_mmio_init numbers them. */
    int step = virtio_mmio_init(base, 19, 0, qa, 3);
    if (step)
        fail((u64)step);
    cid = rd(0x100) | ((u64)rd(0x104) << 32);
    for (u16 i = 0; i < NRX; i++)
        post(0, i, (u64)rxbuf[i], sizeof(rxbuf[0]), F_WRITE);
    wr(0x50, 0);

    static u8 data[BUFSZ];
    u32 port = (u32)shared_port;
    if (shared_mode == 0) {
        struct hdr h = recv(data);
        if (h.op != OP_REQUEST || h.dst_port != port || h.src_cid != HOST_CID || h.dst_cid != cid)
            fail(10);
        u32 peer = h.src_port;
        send(OP_RESPONSE, port, peer, 0, 0, 0);
        for (;;) {
            h = recv(data);
            if (h.src_port != peer || h.dst_port != port)
                fail(11);
            if (h.op == OP_RW) {
                send(OP_RW, port, peer, data, h.len, 0);
                shared_echoed += h.len;
            } else if (h.op == OP_CREDIT_REQUEST) {
                send(OP_CREDIT_UPDATE, port, peer, 0, 0, 0);
            } else if (h.op == OP_SHUTDOWN) {
                send(OP_RST, port, peer, 0, 0, 0);
                break;
            } else if (h.op == OP_RST) {
                break;
            } else if (h.op != OP_CREDIT_UPDATE) {
                fail(12);
            }
        }
    } else {
        const u32 me = 1025;
        send(OP_REQUEST, me, port, 0, 0, 0);
        struct hdr h = recv(data);
        if (h.op != OP_RESPONSE || h.src_port != port || h.dst_port != me)
            fail(20);
        const char *ping = "ping from guest\n";
        u32 n = 0;
        while (ping[n])
            n++;
        send(OP_RW, me, port, (const u8 *)ping, n, 0);
        const char *pong = "pong from host\n";
        u32 want = 0;
        while (pong[want])
            want++;
        u32 got = 0;
        static u8 reply[64];
        while (got < want) {
            h = recv(data);
            if (h.op == OP_CREDIT_UPDATE)
                continue;
            if (h.op != OP_RW || got + h.len > sizeof(reply))
                fail(21);
            for (u32 i = 0; i < h.len; i++)
                reply[got + i] = data[i];
            got += h.len;
        }
        if (!eq(reply, pong, got))
            fail(22);
        send(OP_SHUTDOWN, me, port, 0, 0, 3);
    }
    serial_puts("virtio-vsock: ok\n");
    report(0x50c0000ul);
}
