/*
 * "service" (C): a tiny stateful network service plus its own agent, on two polled virtio-mmio
 * devices (no interrupts): virtio-blk at `shared_blk_base` and virtio-vsock at
 * `shared_vsock_base`. The stand-in for a Java service and the guest agent in the live
 * OS-upgrade demo; host side in upgrade/src/service_guest.rs. vCPU 0 works, the others spin.
 *
 * Disk: the OS stamp in sector 0 ("MVOSVER1", u64 LE version; written as version 1 at boot when
 * missing), the log from 1 MiB: slot i = sector 2048 + i = "MVLOGREC", seq, value, checksum
 * after that request, zeros. At boot the log is scanned from slot 0 up to the first slot
 * without the magic (or the disk's end) to rebuild seq and checksum.
 *
 * Service (vsock port `shared_service_port`): 16-byte requests (u64 LE seq, u64 LE value) on a
 * byte stream; seq must be the last seq + 1, else the reply is (seq, u64::MAX) and nothing is
 * logged. Otherwise checksum = (checksum ^ value) * 0x100000001b3 + seq, the record is written
 * to the next log slot and the disk flushed, then the reply is (seq, checksum). Up to 4
 * connections share the one state. New connections only in mode SERVING.
 *
 * Agent (vsock port `shared_agent_port`): one text line in, one line out ("ok ..." or
 * "err <reason>"): status, exec <argv...> (upgrade, true, false, sleep <ms>, poweroff (after
 * answering), crash (powers off without answering), else exit 127),
 * freeze, checkpoint, restore <hex>, release, rollback. See upgrade/src/service_guest.rs for the
 * checkpoint image format (built in `checkpoint_image` below).
 *
 * Modes (`shared_mode`): 0 SERVING, 1 FROZEN (service requests are held, not answered; the
 * receive window of service connections is closed so that the host side stops sending and
 * everything the device sent is in the checkpoint), 2 STANDBY (a clone after a transport reset:
 * never answers the old clients, never writes the log; waits for `restore`), 3 RELEASED (the old
 * copy after a handover: never serves again).
 *
 * A transport-reset event (the VMM cloned or restored this VM) drops every connection without a
 * word, re-reads the CID, and turns SERVING or FROZEN into STANDBY.
 *
 * Connections created by `restore` belong to host sockets the VMM moves into this VM's device
 * around that time (before or after the agent's answer). Until the device shows it knows such a
 * connection (any packet on it other than RST), nothing is sent on it but a CREDIT_REQUEST
 * every 5 ms (its RST answers are ignored); after 30 s without that it is dropped silently.
 * In STANDBY, packets for unknown connections to the service port (other than REQUEST) are
 * ignored rather than answered with RST, so the move may also come before `restore`.
 */
#include "virtio_mmio.h"
#include "virtio_vsock.h"

SHARED volatile u64 shared_blk_base = 0xd0000000ul;
SHARED volatile u64 shared_vsock_base = 0xd0001000ul;
SHARED volatile u64 shared_service_port = 5000;
SHARED volatile u64 shared_agent_port = 1100;
/* 0 serving, 1 frozen, 2 standby, 3 released. */
SHARED volatile u64 shared_mode;
/* Last served sequence number. */
SHARED volatile u64 shared_seq;
/* Requests served (logged and answered) since boot or restore. */
SHARED volatile u64 shared_requests;

#define FAIL_CODE 0x5e2c0000ul

#define MODE_SERVING 0
#define MODE_FROZEN 1
#define MODE_STANDBY 2
#define MODE_RELEASED 3

/* ---------------------------------------------------------------------------------------------
 * Freestanding helpers. gcc may emit calls to memcpy/memset/memmove for struct copies and
 * loops, so they are defined here (as string instructions, which cannot turn into calls).
 */
void *memcpy(void *dst, const void *src, unsigned long n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

void *memmove(void *dst, const void *src, unsigned long n)
{
    if ((u64)dst <= (u64)src || (u64)dst >= (u64)src + n)
        return memcpy(dst, src, n);
    void *d = (u8 *)dst + n - 1;
    const void *s = (const u8 *)src + n - 1;
    __asm__ volatile("std\n\trep movsb\n\tcld" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return dst;
}

void *memset(void *dst, int c, unsigned long n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static u64 rd64(const u8 *p)
{
    u64 v;
    memcpy(&v, p, 8);
    return v;
}

static void wr64(u8 *p, u64 v) { memcpy(p, &v, 8); }

static u32 rd32(const u8 *p)
{
    u32 v;
    memcpy(&v, p, 4);
    return v;
}

static void wr32(u8 *p, u32 v) { memcpy(p, &v, 4); }

static int bytes_eq(const u8 *a, const char *b, u64 n)
{
    for (u64 i = 0; i < n; i++)
        if (a[i] != (u8)b[i])
            return 0;
    return 1;
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

/* Decimal u64, digits only, no overflow; 0 on success. */
static int parse_u64(const char *s, u64 *out)
{
    u64 v = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        u64 d = (u64)(*s - '0');
        if (v > (~0ul - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

static int hexval(u8 c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* CRC32C (Castagnoli, reflected, init and final xor ~0), as the crc32c crate computes it. */
static u32 crc32c(const u8 *p, u64 n)
{
    u32 c = ~0u;
    for (u64 i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
    }
    return ~c;
}

/* A text buffer for reply lines. */
struct text {
    char *p;
    u64 n, cap;
};

static void t_putc(struct text *t, char c)
{
    if (t->n + 1 < t->cap)
        t->p[t->n++] = c;
}

static void t_str(struct text *t, const char *s)
{
    while (*s)
        t_putc(t, *s++);
}

static void t_dec(struct text *t, u64 v)
{
    char d[24];
    int n = 0;
    do {
        d[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        t_putc(t, d[--n]);
}

static void t_hex_byte(struct text *t, u8 b)
{
    static const char digits[] = "0123456789abcdef";
    t_putc(t, digits[b >> 4]);
    t_putc(t, digits[b & 15]);
}

static void t_hex64(struct text *t, u64 v)
{
    for (int i = 7; i >= 0; i--)
        t_hex_byte(t, (u8)(v >> (i * 8)));
}

static void say(const char *s) { serial_puts(s); }

static void say_dec(u64 v) { serial_put_dec(v); }

/* ---------------------------------------------------------------------------------------------
 * Time. The TSC is calibrated once at boot against PIT channel 2 (the in-kernel PIT; port 0x61
 * is KVM's speaker stub): channel 2 in mode 0 counts 11932 ticks of 1.193182 MHz (10 ms) and
 * raises OUT2 (port 0x61 bit 5) at the end; the TSC ticks in between give ticks per ms. If the
 * PIT does not behave (OUT2 already high, or never rising), a 2 GHz TSC is assumed. Good to a
 * few percent, which is all `exec sleep` and the timeouts need.
 */
static u64 tsc_per_ms = 2000000;

static void calibrate_tsc(void)
{
    u8 v = inb(0x61);
    outb(0x61, (u8)((v & ~0x02) | 0x01)); /* gate 2 on, speaker off */
    outb(0x43, 0xb0);                      /* channel 2, lobyte/hibyte, mode 0, binary */
    outb(0x42, 11932 & 0xff);
    outb(0x42, 11932 >> 8);
    u64 t0 = rdtsc();
    if (inb(0x61) & 0x20)
        return;
    for (u64 i = 0; i < 50000000ul; i++) {
        if (inb(0x61) & 0x20) {
            u64 per_ms = (rdtsc() - t0) / 10;
            if (per_ms >= 100000) /* at least 100 MHz: believable */
                tsc_per_ms = per_ms;
            return;
        }
    }
}

static u64 deadline_ms(u64 ms) { return rdtsc() + ms * tsc_per_ms; }

static int past(u64 deadline) { return (long)(rdtsc() - deadline) >= 0; }

/* ---------------------------------------------------------------------------------------------
 * Queues: QSIZE-entry split rings (virtio_mmio.h), polled.
 */
/* struct vq, vq_post and vq_used_idx come from virtio_mmio.h. */

/* ---------------------------------------------------------------------------------------------
 * virtio-blk: one request at a time, polled to completion.
 */
#define OS_MAGIC "MVOSVER1"
#define LOG_MAGIC "MVLOGREC"
#define LOG_FIRST_SECTOR 2048 /* 1 MiB */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4

struct blk_hdr {
    u32 type, reserved;
    u64 sector;
};

static struct vq bq;
static struct blk_hdr bhdr;
static volatile u8 bstatus;
static u8 sector_buf[4096] __attribute__((aligned(4096)));
static u64 blk_base, disk_sectors, log_slots;

/* Returns the request's status byte (0 = OK), or -1 if the device does not complete it. */
static int blk_request(u32 type, u64 sector, u8 *data, u32 len)
{
    bhdr.type = type;
    bhdr.reserved = 0;
    bhdr.sector = sector;
    bstatus = 0xff;
    bq.desc[0] = (struct desc){ (u64)&bhdr, sizeof(bhdr), F_NEXT, 1 };
    if (data) {
        u16 fl = (u16)(F_NEXT | (type == BLK_T_IN ? F_WRITE : 0));
        bq.desc[1] = (struct desc){ (u64)data, len, fl, 2 };
        bq.desc[2] = (struct desc){ (u64)&bstatus, 1, F_WRITE, 0 };
    } else {
        bq.desc[1] = (struct desc){ (u64)&bstatus, 1, F_WRITE, 0 };
    }
    bq.avail.ring[bq.next_avail % QSIZE] = 0;
    barrier();
    bq.next_avail++;
    bq.avail.idx = bq.next_avail;
    barrier();
    vmmio_wr(blk_base, 0x50, 0);
    u64 end = deadline_ms(30000);
    while (vq_used_idx(&bq) != bq.next_avail) {
        if (past(end))
            return -1;
        idle(); /* the host is writing: leave it the CPU */
    }
    barrier();
    return bstatus;
}

/* Writes `n` sectors from `data` at `sector` and flushes; 0 on success. */
static int blk_write_flush(u64 sector, u8 *data, u32 n)
{
    if (blk_request(BLK_T_OUT, sector, data, n * 512) != 0)
        return -1;
    if (blk_request(BLK_T_FLUSH, 0, 0, 0) != 0)
        return -1;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Service state.
 */
static u64 mode;
static u64 os_version;
static u64 last_seq, checksum, next_slot;
static int disk_failed;

static void set_mode(u64 m)
{
    mode = m;
    shared_mode = m;
}

static const char *mode_name(u64 m)
{
    switch (m) {
    case MODE_SERVING:
        return "serving";
    case MODE_FROZEN:
        return "frozen";
    case MODE_STANDBY:
        return "standby";
    default:
        return "released";
    }
}

static u64 next_checksum(u64 ck, u64 seq, u64 value)
{
    return (ck ^ value) * 0x100000001b3ul + seq;
}

/* ---------------------------------------------------------------------------------------------
 * virtio-vsock (spec 1.2 section 5.10).
 */
#define BUFSZ 4096
#define NRX QSIZE
#define NEV 2

static struct vq vq[3]; /* rx, tx, event */
static u8 rxbuf[NRX][HDR_LEN + BUFSZ] __attribute__((aligned(64)));
static u8 txbuf[QSIZE][HDR_LEN + BUFSZ] __attribute__((aligned(64)));
static u32 evbuf[NEV][2];
static u64 vsock_base, cid;

#define MAX_CONNS 8
#define MAX_SERVICE_CONNS 4
#define MAX_AGENT_CONNS 4
#define SERVICE_CAP 4096
#define AGENT_CAP 65536
#define K_FREE 0
#define K_SERVICE 1
#define K_AGENT 2

struct conn {
    u32 kind, gen;
    u32 local_port, peer_port;
    /* The peer's receive buffer and consumed count, as its last packet said. */
    u32 peer_buf_alloc, peer_fwd_cnt;
    /* Bytes we sent; bytes the service/agent consumed; fwd_cnt last told to the peer. */
    u32 tx_cnt, fwd_cnt, fwd_cnt_sent;
    /* Input buffer: bytes received and not yet consumed are buf[head .. head + len). */
    u32 cap, head, len;
    u8 *buf;
    /* Restored connection not yet seen on the device: probe time and give-up time. */
    int unconfirmed;
    u64 probe_at, give_up_at;
    /* Agent: discarding an over-long line; a command (exec sleep) running until busy_until. */
    int discarding, busy;
    u64 busy_until;
};

static struct conn conns[MAX_CONNS];
static u8 conn_bufs[MAX_CONNS][AGENT_CAP];
static u32 conn_gen;

static int alive(int ci, u32 gen) { return conns[ci].kind != K_FREE && conns[ci].gen == gen; }

static int count_kind(u32 kind)
{
    int n = 0;
    for (int i = 0; i < MAX_CONNS; i++)
        n += conns[i].kind == kind;
    return n;
}

static int free_slot(void)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].kind == K_FREE)
            return i;
    return -1;
}

static int find_conn(u32 local_port, u32 peer_port)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].kind != K_FREE && conns[i].local_port == local_port &&
            conns[i].peer_port == peer_port)
            return i;
    return -1;
}

static int new_conn(int ci, u32 kind, u32 local_port, u32 peer_port)
{
    struct conn *c = &conns[ci];
    memset(c, 0, sizeof(*c));
    c->kind = kind;
    c->gen = ++conn_gen;
    c->local_port = local_port;
    c->peer_port = peer_port;
    c->cap = kind == K_SERVICE ? SERVICE_CAP : AGENT_CAP;
    c->buf = conn_bufs[ci];
    return ci;
}

static void drop_conn(int ci) { conns[ci].kind = K_FREE; }

/* The receive buffer we advertise. A frozen service connection advertises only what it holds,
 * so the host side's credit is zero and it sends nothing more until the window reopens. */
static u32 adv_buf_alloc(const struct conn *c)
{
    if (c->kind == K_SERVICE && mode == MODE_FROZEN)
        return c->len;
    return c->cap;
}

/* Waits for a free TX slot. Slots complete in order (the device handles TX chains FIFO). */
static void tx_slot_wait(void)
{
    struct vq *v = &vq[1];
    u64 end = deadline_ms(10000);
    while ((u16)(v->next_avail - vq_used_idx(v)) >= QSIZE) {
        if (past(end)) {
            say("service: vsock tx queue stuck\n");
            end = deadline_ms(10000);
        }
        cpu_relax();
    }
}

static void send_pkt(u32 src_port, u32 dst_port, u16 op, u32 flags, u32 buf_alloc, u32 fwd_cnt,
                     const u8 *data, u32 len)
{
    struct vq *v = &vq[1];
    tx_slot_wait();
    u16 slot = v->next_avail % QSIZE;
    u8 *b = txbuf[slot];
    struct hdr h = { cid, HOST_CID, src_port, dst_port, len, 1, op, flags, buf_alloc, fwd_cnt };
    memcpy(b, &h, HDR_LEN);
    if (len)
        memcpy(b + HDR_LEN, data, len);
    vq_post(v, slot, (u64)b, HDR_LEN + len, 0);
    vmmio_wr(vsock_base, 0x50, 1);
}

/* A packet without data on a known connection (carries our credit). */
static void conn_ctrl(struct conn *c, u16 op, u32 flags)
{
    c->fwd_cnt_sent = c->fwd_cnt;
    send_pkt(c->local_port, c->peer_port, op, flags, adv_buf_alloc(c), c->fwd_cnt, 0, 0);
}

static void conn_consume(struct conn *c, u32 n)
{
    c->head += n;
    c->len -= n;
    c->fwd_cnt += n;
    if (!c->len)
        c->head = 0;
}

/* Tells the peer about consumed bytes once half the buffer was consumed unannounced. */
static void conn_maybe_credit(struct conn *c)
{
    if (!c->unconfirmed && c->fwd_cnt - c->fwd_cnt_sent >= c->cap / 2)
        conn_ctrl(c, OP_CREDIT_UPDATE, 0);
}

/* Appends received bytes; -1 if they do not fit (the peer ignored our credit). */
static int conn_append(struct conn *c, const u8 *p, u32 n)
{
    if (n > c->cap - c->len)
        return -1;
    if (c->head + c->len + n > c->cap) {
        memmove(c->buf, c->buf + c->head, c->len);
        c->head = 0;
    }
    memcpy(c->buf + c->head + c->len, p, n);
    c->len += n;
    return 0;
}

static void transport_reset(void)
{
    for (int i = 0; i < MAX_CONNS; i++)
        drop_conn(i);
    cid = vmmio_rd(vsock_base, 0x100) | ((u64)vmmio_rd(vsock_base, 0x104) << 32);
    if (mode == MODE_SERVING || mode == MODE_FROZEN)
        set_mode(MODE_STANDBY);
    say("service: transport reset cid=");
    say_dec(cid);
    say(" mode=");
    say(mode_name(mode));
    say("\n");
}

/* Handles used event-queue buffers (transport resets). */
static void poll_events(void)
{
    struct vq *v = &vq[2];
    int reposted = 0;
    while (vq_used_idx(v) != v->seen_used) {
        barrier();
        struct used_elem e = v->used.ring[v->seen_used % QSIZE];
        v->seen_used++;
        if (e.id >= NEV)
            continue;
        if (e.len >= 4 && evbuf[e.id][0] == EVENT_TRANSPORT_RESET)
            transport_reset();
        evbuf[e.id][0] = ~0u;
        vq_post(v, (u16)e.id, (u64)evbuf[e.id], sizeof(evbuf[0]), F_WRITE);
        reposted = 1;
    }
    if (reposted)
        vmmio_wr(vsock_base, 0x50, 2);
}

static void handle_packet(const struct hdr *h, const u8 *payload)
{
    u32 agent_port = (u32)shared_agent_port, service_port = (u32)shared_service_port;
    int ci = find_conn(h->dst_port, h->src_port);
    if (ci < 0) {
        if (h->op == OP_REQUEST) {
            u32 kind = K_FREE;
            if (h->dst_port == agent_port && count_kind(K_AGENT) < MAX_AGENT_CONNS)
                kind = K_AGENT;
            else if (h->dst_port == service_port && h->dst_port != agent_port &&
                     mode == MODE_SERVING && !disk_failed &&
                     count_kind(K_SERVICE) < MAX_SERVICE_CONNS)
                kind = K_SERVICE;
            int slot = kind != K_FREE ? free_slot() : -1;
            if (slot < 0) {
                send_pkt(h->dst_port, h->src_port, OP_RST, 0, 0, 0, 0, 0);
                return;
            }
            struct conn *c = &conns[new_conn(slot, kind, h->dst_port, h->src_port)];
            c->peer_buf_alloc = h->buf_alloc;
            c->peer_fwd_cnt = h->fwd_cnt;
            conn_ctrl(c, OP_RESPONSE, 0);
            return;
        }
        if (h->op == OP_RST)
            return;
        /* A connection being moved into this standby copy's device may speak first. */
        if (mode == MODE_STANDBY && h->dst_port == service_port)
            return;
        send_pkt(h->dst_port, h->src_port, OP_RST, 0, 0, 0, 0, 0);
        return;
    }
    struct conn *c = &conns[ci];
    if (c->unconfirmed) {
        /* RSTs come from the device while it does not know the connection yet. */
        if (h->op == OP_RST)
            return;
        c->unconfirmed = 0;
    }
    c->peer_buf_alloc = h->buf_alloc;
    c->peer_fwd_cnt = h->fwd_cnt;
    switch (h->op) {
    case OP_RW:
        if (conn_append(c, payload, h->len) != 0) {
            say("service: peer overran its credit; connection reset\n");
            conn_ctrl(c, OP_RST, 0);
            drop_conn(ci);
        }
        break;
    case OP_CREDIT_UPDATE:
        break;
    case OP_CREDIT_REQUEST:
        conn_ctrl(c, OP_CREDIT_UPDATE, 0);
        break;
    case OP_RST:
        drop_conn(ci);
        break;
    case OP_SHUTDOWN:
    case OP_REQUEST:  /* a second request for a live connection */
    case OP_RESPONSE: /* we never connect out */
        conn_ctrl(c, OP_RST, 0);
        drop_conn(ci);
        break;
    default:
        break; /* unknown op: ignored */
    }
}

/* RX packets handled so far (the main loop idles when a pass handled none). */
static u64 rx_handled;

/* Takes every used RX buffer (and event), handles its packet and posts the buffer again. */
static void rx_poll(void)
{
    poll_events();
    struct vq *v = &vq[0];
    int reposted = 0;
    while (vq_used_idx(v) != v->seen_used) {
        barrier();
        struct used_elem e = v->used.ring[v->seen_used % QSIZE];
        v->seen_used++;
        if (e.id >= NRX)
            continue; /* not ours: ignore */
        if (e.len >= HDR_LEN) {
            struct hdr h;
            memcpy(&h, rxbuf[e.id], HDR_LEN);
            /* A device that posts a transport reset does so before any packet for the new CID,
             * but possibly just after the look at the event queue above: look again. */
            if (h.dst_cid != cid)
                poll_events();
            if (h.len <= BUFSZ && HDR_LEN + h.len <= e.len && h.type == 1 &&
                h.src_cid == HOST_CID && h.dst_cid == cid)
                handle_packet(&h, rxbuf[e.id] + HDR_LEN);
        }
        vq_post(v, (u16)e.id, (u64)rxbuf[e.id], sizeof(rxbuf[0]), F_WRITE);
        reposted = 1;
        rx_handled++;
    }
    if (reposted)
        vmmio_wr(vsock_base, 0x50, 0);
}

/*
 * Sends `len` bytes on connection `ci` within the peer's credit: when the credit is short, asks
 * for an update and keeps handling RX (packets only, no service or agent work) until it comes,
 * for up to 5 s; then the connection is reset. Returns 0, or -1 if the connection is gone.
 */
static int conn_send(int ci, const u8 *data, u64 len)
{
    u32 gen = conns[ci].gen;
    int asked = 0;
    u64 end = deadline_ms(5000);
    while (len) {
        if (!alive(ci, gen))
            return -1;
        struct conn *c = &conns[ci];
        u32 in_flight = c->tx_cnt - c->peer_fwd_cnt;
        u32 credit = in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
        if (!credit) {
            if (!asked) {
                conn_ctrl(c, OP_CREDIT_REQUEST, 0);
                asked = 1;
            }
            if (past(end)) {
                say("service: no credit from the peer; connection reset\n");
                conn_ctrl(c, OP_RST, 0);
                drop_conn(ci);
                return -1;
            }
            rx_poll();
            cpu_relax();
            continue;
        }
        u32 n = credit < BUFSZ ? credit : BUFSZ;
        if (n > len)
            n = (u32)len;
        c->fwd_cnt_sent = c->fwd_cnt;
        send_pkt(c->local_port, c->peer_port, OP_RW, 0, adv_buf_alloc(c), c->fwd_cnt, data, n);
        c->tx_cnt += n;
        data += n;
        len -= n;
        asked = 0;
        end = deadline_ms(5000);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The service.
 */
static int log_write(u64 slot, u64 seq, u64 value, u64 ck)
{
    memset(sector_buf, 0, 512);
    memcpy(sector_buf, LOG_MAGIC, 8);
    wr64(sector_buf + 8, seq);
    wr64(sector_buf + 16, value);
    wr64(sector_buf + 24, ck);
    return blk_write_flush(LOG_FIRST_SECTOR + slot, sector_buf, 1);
}

static void serve_conn(int ci)
{
    u32 gen = conns[ci].gen;
    while (mode == MODE_SERVING && !disk_failed && alive(ci, gen) && !conns[ci].unconfirmed &&
           conns[ci].len >= 16) {
        struct conn *c = &conns[ci];
        u64 seq = rd64(c->buf + c->head);
        u64 value = rd64(c->buf + c->head + 8);
        u8 reply[16];
        wr64(reply, seq);
        if (seq != last_seq + 1) {
            wr64(reply + 8, ~0ul);
        } else {
            /* A clone learns of itself from the event queue: look before touching the log. */
            poll_events();
            if (mode != MODE_SERVING || !alive(ci, gen))
                return;
            if (next_slot >= log_slots) {
                say("service: log full; no longer serving\n");
                disk_failed = 1;
                return;
            }
            u64 ck = next_checksum(checksum, seq, value);
            if (log_write(next_slot, seq, value, ck) != 0) {
                say("service: disk error; no longer serving\n");
                disk_failed = 1;
                return;
            }
            last_seq = seq;
            checksum = ck;
            next_slot++;
            shared_seq = seq;
            shared_requests++;
            wr64(reply + 8, ck);
        }
        conn_consume(c, 16);
        if (conn_send(ci, reply, 16) != 0)
            return;
    }
    if (alive(ci, gen))
        conn_maybe_credit(&conns[ci]);
}

/* Reopens the window of every service connection (after a freeze). */
static void reopen_windows(void)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].kind == K_SERVICE && !conns[i].unconfirmed)
            conn_ctrl(&conns[i], OP_CREDIT_UPDATE, 0);
}

/* ---------------------------------------------------------------------------------------------
 * Checkpoint image (little-endian; see ServiceImage in upgrade/src/service_guest.rs):
 *   0  "MVSVCST1"          8  u32 format (1)     12 u32 connection count
 *   16 u64 seq             24 u64 checksum       32 u64 next log slot    40 u64 OS version
 *   48 per connection: u32 guest port, host port, peer buf_alloc, peer fwd_cnt, our fwd_cnt,
 *      our fwd_cnt last told to the peer, our tx_cnt, pending length; the pending bytes
 *   end: u32 CRC32C of everything before it.
 */
#define IMAGE_MAGIC "MVSVCST1"
#define IMAGE_FORMAT 1
#define IMAGE_HEAD 48
#define IMAGE_CONN 32
#define IMAGE_MAX (IMAGE_HEAD + MAX_SERVICE_CONNS * (IMAGE_CONN + SERVICE_CAP) + 4)

static u8 image[IMAGE_MAX];

static u64 checkpoint_image(void)
{
    u8 *p = image;
    memcpy(p, IMAGE_MAGIC, 8);
    wr32(p + 8, IMAGE_FORMAT);
    wr32(p + 12, (u32)count_kind(K_SERVICE));
    wr64(p + 16, last_seq);
    wr64(p + 24, checksum);
    wr64(p + 32, next_slot);
    wr64(p + 40, os_version);
    p += IMAGE_HEAD;
    for (int i = 0; i < MAX_CONNS; i++) {
        struct conn *c = &conns[i];
        if (c->kind != K_SERVICE)
            continue;
        u32 f[8] = { c->local_port,   c->peer_port, c->peer_buf_alloc, c->peer_fwd_cnt,
                     c->fwd_cnt,      c->fwd_cnt_sent, c->tx_cnt,      c->len };
        for (int k = 0; k < 8; k++)
            wr32(p + 4 * k, f[k]);
        memcpy(p + IMAGE_CONN, c->buf + c->head, c->len);
        p += IMAGE_CONN + c->len;
    }
    u64 n = (u64)(p - image);
    wr32(p, crc32c(image, n));
    return n + 4;
}

/* Checks an image of `n` bytes; 0 if well-formed and fits the free connection slots. */
static int image_check(u64 n)
{
    if (n < IMAGE_HEAD + 4 || n > IMAGE_MAX || !bytes_eq(image, IMAGE_MAGIC, 8) ||
        rd32(image + 8) != IMAGE_FORMAT)
        return -1;
    if (rd32(image + n - 4) != crc32c(image, n - 4))
        return -1;
    u32 count = rd32(image + 12);
    if (count > MAX_SERVICE_CONNS)
        return -1;
    u64 off = IMAGE_HEAD;
    for (u32 i = 0; i < count; i++) {
        if (off + IMAGE_CONN > n - 4)
            return -1;
        u32 pending = rd32(image + off + 28);
        if (pending > SERVICE_CAP || off + IMAGE_CONN + pending > n - 4)
            return -1;
        u32 gp = rd32(image + off), hp = rd32(image + off + 4);
        if (find_conn(gp, hp) >= 0)
            return -1;
        for (u64 o = IMAGE_HEAD; o < off; o += IMAGE_CONN + rd32(image + o + 28))
            if (rd32(image + o) == gp && rd32(image + o + 4) == hp)
                return -1;
        off += IMAGE_CONN + pending;
    }
    if (off != n - 4 || rd64(image + 32) > log_slots)
        return -1;
    int free = 0;
    for (int i = 0; i < MAX_CONNS; i++)
        free += conns[i].kind == K_FREE;
    return (int)count <= free ? 0 : -1;
}

/* Adopts a checked image. */
static void image_restore(void)
{
    last_seq = rd64(image + 16);
    checksum = rd64(image + 24);
    next_slot = rd64(image + 32);
    shared_seq = last_seq;
    shared_requests = 0;
    u32 count = rd32(image + 12);
    u64 off = IMAGE_HEAD;
    for (u32 i = 0; i < count; i++) {
        const u8 *p = image + off;
        int ci = new_conn(free_slot(), K_SERVICE, rd32(p), rd32(p + 4));
        struct conn *c = &conns[ci];
        c->peer_buf_alloc = rd32(p + 8);
        c->peer_fwd_cnt = rd32(p + 12);
        c->fwd_cnt = rd32(p + 16);
        c->fwd_cnt_sent = rd32(p + 20);
        c->tx_cnt = rd32(p + 24);
        c->len = rd32(p + 28);
        memcpy(c->buf, p + IMAGE_CONN, c->len);
        c->unconfirmed = 1;
        c->probe_at = rdtsc();
        c->give_up_at = deadline_ms(30000);
        off += IMAGE_CONN + c->len;
    }
}

/* Probes restored connections until the device shows it has them. */
static void probe_restored(void)
{
    for (int i = 0; i < MAX_CONNS; i++) {
        struct conn *c = &conns[i];
        if (c->kind != K_SERVICE || !c->unconfirmed)
            continue;
        if (past(c->give_up_at)) {
            say("service: a restored connection never reached this device; dropped\n");
            drop_conn(i);
        } else if (past(c->probe_at)) {
            conn_ctrl(c, OP_CREDIT_REQUEST, 0);
            c->probe_at = deadline_ms(5);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * The agent.
 */
static char line[AGENT_CAP + 1];
static char out_buf[2 * IMAGE_MAX + 64];

static void agent_reply(int ci, const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    if (conn_send(ci, (const u8 *)s, n) == 0)
        conn_send(ci, (const u8 *)"\n", 1);
}

static int os_stamp_write(u64 version)
{
    if (blk_request(BLK_T_IN, 0, sector_buf, 512) != 0)
        return -1;
    memcpy(sector_buf, OS_MAGIC, 8);
    wr64(sector_buf + 8, version);
    return blk_write_flush(0, sector_buf, 1);
}

/* When nonzero, the TSC deadline at which the guest powers off (exec poweroff). */
static u64 poweroff_at;

static void cmd_exec(int ci, char **argv, int argc)
{
    struct text t = { out_buf, 0, sizeof(out_buf) };
    if (argc == 0) {
        agent_reply(ci, "err usage: exec <argv...>");
        return;
    }
    if (streq(argv[0], "upgrade")) {
        if (disk_failed || os_stamp_write(os_version + 1) != 0) {
            disk_failed = 1;
            agent_reply(ci, "err disk error");
            return;
        }
        os_version++;
        say("service: upgraded to version ");
        say_dec(os_version);
        say("\n");
        t_str(&t, "ok exit=0 version=");
        t_dec(&t, os_version);
        t.p[t.n] = 0;
        agent_reply(ci, t.p);
    } else if (streq(argv[0], "true")) {
        agent_reply(ci, "ok exit=0");
    } else if (streq(argv[0], "false")) {
        agent_reply(ci, "ok exit=1");
    } else if (streq(argv[0], "poweroff")) {
        /* Test hook: the guest powers itself off once this answer is out (a backup that dies
         * during its upgrade). */
        agent_reply(ci, "ok exit=0");
        poweroff_at = deadline_ms(200);
    } else if (streq(argv[0], "crash")) {
        /* Test hook: the guest powers itself off without answering (a backup that dies in the
         * middle of a command: the host must not wait out the command's timeout). */
        poweroff_at = deadline_ms(100);
    } else if (streq(argv[0], "sleep")) {
        u64 ms;
        if (argc != 2 || parse_u64(argv[1], &ms) != 0 || ms > 3600000) {
            agent_reply(ci, "ok exit=1");
            return;
        }
        /* Runs while the service and other agent connections go on; answered when done. */
        conns[ci].busy = 1;
        conns[ci].busy_until = deadline_ms(ms);
    } else {
        agent_reply(ci, "ok exit=127");
    }
}

static void cmd_restore(int ci, char **argv, int argc)
{
    struct text t = { out_buf, 0, sizeof(out_buf) };
    /* A standby clone, or a copy freshly booted (e.g. a backup restarted into its new kernel)
     * that has served nothing and holds no service connection. */
    int fresh = mode == MODE_SERVING && shared_requests == 0 && count_kind(K_SERVICE) == 0;
    if (mode != MODE_STANDBY && !fresh) {
        agent_reply(ci, "err not standby");
        return;
    }
    if (argc != 1) {
        agent_reply(ci, "err bad image");
        return;
    }
    const char *hex = argv[0];
    u64 n = 0;
    while (hex[n])
        n++;
    if (n % 2 || n / 2 > IMAGE_MAX) {
        agent_reply(ci, "err bad image");
        return;
    }
    for (u64 i = 0; i < n / 2; i++) {
        int hi = hexval((u8)hex[2 * i]), lo = hexval((u8)hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            agent_reply(ci, "err bad image");
            return;
        }
        image[i] = (u8)(hi << 4 | lo);
    }
    if (image_check(n / 2) != 0) {
        agent_reply(ci, "err bad image");
        return;
    }
    image_restore();
    set_mode(MODE_SERVING);
    say("service: restored seq=");
    say_dec(last_seq);
    say("\n");
    t_str(&t, "ok seq=");
    t_dec(&t, last_seq);
    t.p[t.n] = 0;
    agent_reply(ci, t.p);
}

static void agent_command(int ci, char *s, u64 n)
{
    for (u64 i = 0; i < n; i++)
        if ((u8)s[i] < 0x20 || (u8)s[i] > 0x7e) {
            agent_reply(ci, "err bad characters");
            return;
        }
    char *argv[8];
    int argc = 0;
    for (u64 i = 0; i < n;) {
        while (i < n && s[i] == ' ')
            s[i++] = 0;
        if (i == n)
            break;
        if (argc == 8) {
            agent_reply(ci, "err too many arguments");
            return;
        }
        argv[argc++] = s + i;
        while (i < n && s[i] != ' ')
            i++;
    }
    s[n] = 0;
    if (argc == 0) {
        agent_reply(ci, "err empty command");
        return;
    }
    struct text t = { out_buf, 0, sizeof(out_buf) };
    const char *cmd = argv[0];
    if (streq(cmd, "status") && argc == 1) {
        t_str(&t, "ok mode=");
        t_str(&t, mode_name(mode));
        t_str(&t, " version=");
        t_dec(&t, os_version);
        t_str(&t, " seq=");
        t_dec(&t, last_seq);
        t_str(&t, " checksum=");
        t_hex64(&t, checksum);
        t_str(&t, " conns=");
        t_dec(&t, (u64)count_kind(K_SERVICE));
        t.p[t.n] = 0;
        agent_reply(ci, t.p);
    } else if (streq(cmd, "exec")) {
        cmd_exec(ci, argv + 1, argc - 1);
    } else if (streq(cmd, "freeze") && argc == 1) {
        if (mode == MODE_SERVING) {
            set_mode(MODE_FROZEN);
            /* Close the windows before answering: whatever the host side sent before this
             * arrives ahead of the next agent command, so a checkpoint holds all of it. */
            for (int i = 0; i < MAX_CONNS; i++)
                if (conns[i].kind == K_SERVICE && !conns[i].unconfirmed)
                    conn_ctrl(&conns[i], OP_CREDIT_UPDATE, 0);
            say("service: frozen\n");
        }
        agent_reply(ci, mode == MODE_FROZEN ? "ok" : "err not serving");
    } else if (streq(cmd, "checkpoint") && argc == 1) {
        if (mode != MODE_FROZEN) {
            agent_reply(ci, "err not frozen");
            return;
        }
        u64 len = checkpoint_image();
        t_str(&t, "ok ");
        for (u64 i = 0; i < len; i++)
            t_hex_byte(&t, image[i]);
        t.p[t.n] = 0;
        agent_reply(ci, t.p);
    } else if (streq(cmd, "restore")) {
        cmd_restore(ci, argv + 1, argc - 1);
    } else if (streq(cmd, "release") && argc == 1) {
        /* The connections continue elsewhere: forget them without a word. */
        for (int i = 0; i < MAX_CONNS; i++)
            if (conns[i].kind == K_SERVICE)
                drop_conn(i);
        set_mode(MODE_RELEASED);
        say("service: released\n");
        agent_reply(ci, "ok");
    } else if (streq(cmd, "rollback") && argc == 1) {
        if (mode != MODE_FROZEN) {
            agent_reply(ci, "err not frozen");
            return;
        }
        set_mode(MODE_SERVING);
        reopen_windows();
        say("service: rolled back\n");
        agent_reply(ci, "ok");
    } else if (streq(cmd, "status") || streq(cmd, "freeze") || streq(cmd, "checkpoint") ||
               streq(cmd, "release") || streq(cmd, "rollback")) {
        agent_reply(ci, "err usage");
    } else {
        agent_reply(ci, "err unknown command");
    }
}

static void agent_conn(int ci)
{
    u32 gen = conns[ci].gen;
    if (conns[ci].busy) {
        if (!past(conns[ci].busy_until))
            return;
        conns[ci].busy = 0;
        agent_reply(ci, "ok exit=0");
    }
    while (alive(ci, gen) && !conns[ci].busy) {
        struct conn *c = &conns[ci];
        const u8 *p = c->buf + c->head;
        u32 i = 0;
        while (i < c->len && p[i] != '\n')
            i++;
        if (c->discarding) {
            if (i == c->len) {
                conn_consume(c, c->len);
                break;
            }
            conn_consume(c, i + 1);
            c->discarding = 0;
            agent_reply(ci, "err too long");
            continue;
        }
        if (i == c->len) {
            if (c->len == c->cap) {
                conn_consume(c, c->len);
                c->discarding = 1;
                continue;
            }
            break;
        }
        u32 n = i;
        if (n && p[n - 1] == '\r')
            n--;
        memcpy(line, p, n);
        line[n] = 0;
        conn_consume(c, i + 1);
        agent_command(ci, line, n);
    }
    if (alive(ci, gen))
        conn_maybe_credit(&conns[ci]);
}

/* ---------------------------------------------------------------------------------------------
 * Boot.
 */
static void fail(u64 step) { driver_fail("service", FAIL_CODE, step); }

static void disk_boot(void)
{
    struct vq_addrs qa = { bq.desc, &bq.avail, &bq.used };
    /* Steps 1..4 as virtio_mmio_init numbers them; FLUSH is feature bit 9. */
    int step = virtio_mmio_init(blk_base, 2, 1u << 9, &qa, 1);
    if (step)
        fail((u64)step);
    disk_sectors = vmmio_rd(blk_base, 0x100) | ((u64)vmmio_rd(blk_base, 0x104) << 32);
    if (disk_sectors < 2 * LOG_FIRST_SECTOR)
        fail(20); /* under 2 MiB: no room for a log */
    log_slots = disk_sectors - LOG_FIRST_SECTOR;

    if (blk_request(BLK_T_IN, 0, sector_buf, 512) != 0)
        fail(21);
    if (bytes_eq(sector_buf, OS_MAGIC, 8)) {
        os_version = rd64(sector_buf + 8);
    } else {
        memset(sector_buf, 0, 512);
        memcpy(sector_buf, OS_MAGIC, 8);
        wr64(sector_buf + 8, 1);
        if (blk_write_flush(0, sector_buf, 1) != 0)
            fail(22);
        os_version = 1;
    }

    /* The log: records up to the first slot without the magic, read 8 slots at a time. */
    next_slot = 0;
    for (u64 slot = 0; slot < log_slots;) {
        u64 n = log_slots - slot < 8 ? log_slots - slot : 8;
        if (blk_request(BLK_T_IN, LOG_FIRST_SECTOR + slot, sector_buf, (u32)(n * 512)) != 0)
            fail(23);
        u64 k = 0;
        for (; k < n; k++) {
            const u8 *r = sector_buf + k * 512;
            if (!bytes_eq(r, LOG_MAGIC, 8))
                break;
            last_seq = rd64(r + 8);
            checksum = rd64(r + 24);
        }
        slot += k;
        next_slot = slot;
        if (k < n)
            break;
    }
    shared_seq = last_seq;
}

static void vsock_boot(void)
{
    struct vq_addrs qa[3];
    for (u32 i = 0; i < 3; i++)
        qa[i] = (struct vq_addrs){ vq[i].desc, &vq[i].avail, &vq[i].used };
    int step = virtio_mmio_init(vsock_base, 19, 0, qa, 3);
    if (step)
        fail(10 + (u64)step);
    cid = vmmio_rd(vsock_base, 0x100) | ((u64)vmmio_rd(vsock_base, 0x104) << 32);
    for (u16 i = 0; i < NRX; i++)
        vq_post(&vq[0], i, (u64)rxbuf[i], sizeof(rxbuf[0]), F_WRITE);
    for (u16 i = 0; i < NEV; i++) {
        evbuf[i][0] = ~0u;
        vq_post(&vq[2], i, (u64)evbuf[i], sizeof(evbuf[0]), F_WRITE);
    }
    vmmio_wr(vsock_base, 0x50, 0);
    vmmio_wr(vsock_base, 0x50, 2);
}

void guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu != 0) {
        for (;;)
            idle();
    }
    calibrate_tsc();
    blk_base = shared_blk_base;
    vsock_base = shared_vsock_base;
    /* Booted without the host placing it (a backup restarted into this guest, with NICs
     * between the disk and the vsock device): look for it. */
    if (vmmio_rd(vsock_base, 0x008) != 19) {
        u64 b = virtio_mmio_find(19, 8);
        if (b)
            vsock_base = b;
    }
    set_mode(MODE_SERVING);
    disk_boot();
    vsock_boot();
    say("service: ready version=");
    say_dec(os_version);
    say(" seq=");
    say_dec(last_seq);
    say("\n");
    for (;;) {
        u64 before = rx_handled;
        rx_poll();
        probe_restored();
        for (int i = 0; i < MAX_CONNS; i++)
            if (conns[i].kind == K_SERVICE)
                serve_conn(i);
        for (int i = 0; i < MAX_CONNS; i++)
            if (conns[i].kind == K_AGENT)
                agent_conn(i);
        if (poweroff_at && past(poweroff_at))
            poweroff();
        if (rx_handled == before)
            idle(); /* nothing arrived: give the host CPU away for a moment */
    }
}
