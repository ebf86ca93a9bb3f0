/*
 * "virtio_blk" (C): a minimal virtio 1.x driver at CPL3 for the first virtio-mmio device.
 * Negotiates VERSION_1 + FLUSH, sets up queue 0 (8 entries, polled; no interrupts), writes
 * `shared_blocks` 4 KiB blocks of a pattern at sector `shared_sector`, flushes, reads them back
 * and compares. Prints "virtio-blk: ok <n>" or "virtio-blk: FAIL <step>" and reports
 * 0xb10c0000 + step (0 on success) before powering off.
 * With `shared_loop` set it then keeps writing, for clone tests: write number g = 1, 2, ...
 * goes to block (g - 1) % shared_blocks; every u64 of the block holds g | shared_tag << 48;
 * `shared_written` is g once the device completed it. Setting `shared_stop` ends the loop:
 * the guest reports `shared_written` and powers off.
 */
#include "virtio_mmio.h"

SHARED volatile u64 shared_mmio_base = 0xd0000000ul;
SHARED volatile u64 shared_sector = 64;
SHARED volatile u64 shared_blocks = 4;
SHARED volatile u64 shared_loop;
SHARED volatile u64 shared_tag;
SHARED volatile u64 shared_written;
SHARED volatile u64 shared_stop;

struct req_hdr { u32 type; u32 reserved; u64 sector; };

static struct desc descs[QSIZE] __attribute__((aligned(16)));
static struct avail avail __attribute__((aligned(2)));
static struct used used __attribute__((aligned(4)));
static struct req_hdr hdr;
static volatile u8 status;
static u8 wbuf[4096] __attribute__((aligned(4096)));
static u8 rbuf[4096] __attribute__((aligned(4096)));
static u16 next_avail;

static u64 base;
static void wr(u64 off, u32 v) { mmio_write32(base + off, v); }

static void fail(u64 step) { driver_fail("virtio-blk", 0xb10c0000ul, step); }

/* Submits one request (header, optional 4 KiB data, status) and polls for its completion. */
static u8 submit(u32 type, u64 sector, u8 *data, int device_writes)
{
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    status = 0xff;
    int n = 0;
    descs[n] = (struct desc){ (u64)&hdr, sizeof(hdr), F_NEXT, (u16)(n + 1) }; n++;
    if (data) {
        descs[n] = (struct desc){ (u64)data, 4096, (u16)(F_NEXT | (device_writes ? F_WRITE : 0)), (u16)(n + 1) };
        n++;
    }
    descs[n] = (struct desc){ (u64)&status, 1, F_WRITE, 0 };
    avail.ring[next_avail % QSIZE] = 0;
    barrier();
    next_avail++;
    avail.idx = next_avail;
    barrier();
    wr(0x50, 0);
    for (u64 spins = 0; *(volatile u16 *)&used.idx != next_avail; spins++) {
        if (spins > 2000000000ul)
            fail(90);
        cpu_relax();
    }
    barrier();
    return status;
}

void guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu != 0) {
        for (;;)
            cpu_relax();
    }
    base = shared_mmio_base;
    struct vq_addrs q = { descs, &avail, &used };
    /* Steps 1..4 as virtio_mmio_init numbers them; FLUSH is feature bit 9. */
    int step = virtio_mmio_init(base, 2, 1u << 9, &q, 1);
    if (step)
        fail((u64)step);

    u64 sector = shared_sector;
    u64 blocks = shared_blocks;
    for (u64 b = 0; b < blocks; b++) {
        for (u64 i = 0; i < 4096; i++)
            wbuf[i] = (u8)(i * 7 + b * 13 + 1);
        if (submit(1, sector + b * 8, wbuf, 0) != 0)
            fail(10);
    }
    if (submit(4, 0, 0, 0) != 0)
        fail(11);
    for (u64 b = 0; b < blocks; b++) {
        if (submit(0, sector + b * 8, rbuf, 1) != 0)
            fail(12);
        for (u64 i = 0; i < 4096; i++)
            if (rbuf[i] != (u8)(i * 7 + b * 13 + 1))
                fail(13);
    }
    serial_puts("virtio-blk: ok ");
    serial_put_dec(blocks);
    serial_putc('\n');
    if (!shared_loop) {
        report(0xb10c0000ul);
        return;
    }
    while (!shared_stop) {
        u64 g = shared_written + 1;
        u64 stamp = g | shared_tag << 48;
        for (u64 i = 0; i < 4096 / 8; i++)
            ((u64 *)wbuf)[i] = stamp;
        if (submit(1, sector + ((g - 1) % blocks) * 8, wbuf, 0) != 0)
            fail(20);
        shared_written = g;
    }
    report(shared_written);
}
