/*
 * Shared part of the kit's polled virtio 1.x drivers (virtio-mmio, modern, no interrupts):
 * split-ring layout with QSIZE entries per queue and the device bring-up sequence.
 */
#ifndef MICROVMM_VIRTIO_MMIO_H
#define MICROVMM_VIRTIO_MMIO_H

#include "kit.h"

#define QSIZE 8
#define F_NEXT 1
#define F_WRITE 2

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QSIZE]; u16 avail_event; };

/* Where one queue's three parts are. */
struct vq_addrs { struct desc *desc; struct avail *avail; struct used *used; };

/* A driver-side queue: the three parts and the driver's positions. */
struct vq {
    struct desc desc[QSIZE] __attribute__((aligned(16)));
    struct avail avail __attribute__((aligned(2)));
    struct used used __attribute__((aligned(4)));
    u16 next_avail, seen_used;
};

/* Makes descriptor `d` (one buffer) available. */
static inline void vq_post(struct vq *v, u16 d, u64 addr, u32 len, u16 flags)
{
    v->desc[d] = (struct desc){ addr, len, flags, 0 };
    v->avail.ring[v->next_avail % QSIZE] = d;
    barrier();
    v->next_avail++;
    v->avail.idx = v->next_avail;
    barrier();
}

/* The device's used index, read fresh. */
static inline u16 vq_used_idx(struct vq *v) { return *(volatile u16 *)&v->used.idx; }

/* Prints "<name>: FAIL <step>", reports `code + step` and powers off. */
static inline __attribute__((noreturn)) void driver_fail(const char *name, u64 code, u64 step)
{
    serial_puts(name);
    serial_puts(": FAIL ");
    serial_put_dec(step);
    serial_putc('\n');
    report(code + step);
    poweroff();
}

static inline u32 vmmio_rd(u64 base, u64 off) { return mmio_read32(base + off); }
static inline void vmmio_wr(u64 base, u64 off, u32 v) { mmio_write32(base + off, v); }

/* The VMM's virtio-mmio windows: one page each from here, in device order. */
#define VIRTIO_MMIO_WINDOWS 0xd0000000ul

/* The window of the first virtio-mmio device `device_id` among the first `count`, or 0. */
static inline u64 virtio_mmio_find(u32 device_id, u32 count)
{
    for (u32 i = 0; i < count; i++) {
        u64 b = VIRTIO_MMIO_WINDOWS + (u64)i * 0x1000;
        if (vmmio_rd(b, 0x000) == 0x74726976 && vmmio_rd(b, 0x008) == device_id)
            return b;
    }
    return 0;
}

/*
 * Brings up the virtio-mmio device at `base`: checks magic, version 2 and `device_id`,
 * acknowledges, checks that VERSION_1 is offered, accepts it plus the low feature bits
 * `features`, sets FEATURES_OK, sets up `nq` queues of QSIZE entries at `q`, and sets
 * DRIVER_OK. Returns 0, or the failing step: 1 identity, 2 no VERSION_1 or features refused,
 * 3 queue too small, 4 the device wants a reset.
 */
static inline int virtio_mmio_init(u64 base, u32 device_id, u32 features,
                                   const struct vq_addrs *q, u32 nq)
{
    if (vmmio_rd(base, 0x000) != 0x74726976 || vmmio_rd(base, 0x004) != 2 ||
        vmmio_rd(base, 0x008) != device_id)
        return 1;
    vmmio_wr(base, 0x070, 0);
    vmmio_wr(base, 0x070, 1 | 2);
    vmmio_wr(base, 0x014, 1);
    if (!(vmmio_rd(base, 0x010) & 1)) /* the device must offer VERSION_1 */
        return 2;
    vmmio_wr(base, 0x024, 1);
    vmmio_wr(base, 0x020, 1); /* VERSION_1 is bit 32 */
    vmmio_wr(base, 0x024, 0);
    vmmio_wr(base, 0x020, features);
    vmmio_wr(base, 0x070, 1 | 2 | 8);
    if (!(vmmio_rd(base, 0x070) & 8))
        return 2;
    for (u32 i = 0; i < nq; i++) {
        vmmio_wr(base, 0x030, i);
        if (vmmio_rd(base, 0x034) < QSIZE)
            return 3;
        vmmio_wr(base, 0x038, QSIZE);
        vmmio_wr(base, 0x080, (u32)(u64)q[i].desc);
        vmmio_wr(base, 0x084, (u32)((u64)q[i].desc >> 32));
        vmmio_wr(base, 0x090, (u32)(u64)q[i].avail);
        vmmio_wr(base, 0x094, (u32)((u64)q[i].avail >> 32));
        vmmio_wr(base, 0x0a0, (u32)(u64)q[i].used);
        vmmio_wr(base, 0x0a4, (u32)((u64)q[i].used >> 32));
        vmmio_wr(base, 0x044, 1);
    }
    vmmio_wr(base, 0x070, 1 | 2 | 8 | 4);
    if (vmmio_rd(base, 0x070) & 0x40)
        return 4;
    return 0;
}

#endif
