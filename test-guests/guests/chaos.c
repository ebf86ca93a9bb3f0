/*
 * "chaos" (C): an untrusted guest poking the VMM. Does `shared_rounds` (default 2000) rounds of
 * pseudo-random 1/2/4-byte port reads and writes over ports 0..0xfff (except the power and reset
 * registers and the report port) and MMIO reads and writes to unbacked guest-physical addresses
 * between 64 MiB and 1 GiB, then says "chaos: survived" and powers off. The VMM must neither
 * panic nor stop the VM.
 */
#include "kit.h"

SHARED volatile u64 shared_rounds = 2000;
SHARED volatile u64 shared_seed = 0x9e3779b97f4a7c15ul;

static u64 next(u64 *s)
{
    /* xorshift64 */
    u64 x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static int forbidden(u16 port)
{
    return (port >= 0x600 && port < 0x608) || port == 0x64 || (port >= 0x510 && port < 0x518);
}

void guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu != 0) {
        for (;;)
            cpu_relax();
    }
    u64 s = shared_seed;
    u64 sink = 0;
    for (u64 i = 0; i < shared_rounds; i++) {
        u64 r = next(&s);
        u16 port = (u16)(r & 0xffc) | (u16)((r >> 12) & 3);
        u32 v = (u32)(r >> 32);
        if (!forbidden(port) && !forbidden(port + 3)) {
            switch ((r >> 16) & 7) {
            case 0: outb(port, (u8)v); break;
            case 1: sink += inb(port); break;
            case 2: outl(port & ~3, v); break;
            case 3: sink += inl(port & ~3); break;
            default: break;
            }
        }
        u64 addr = (64ul << 20) + ((r >> 20) % ((1ul << 30) - (64ul << 20) - 8));
        addr &= ~7ul;
        if ((r >> 19) & 1)
            mmio_write32(addr, v);
        else
            sink += mmio_read32(addr);
    }
    report(sink);
    /* The serial line may have been reprogrammed (DLAB, loopback): restore LCR and MCR. */
    outb(0x3f8 + 3, 0x03);
    outb(0x3f8 + 4, 0x00);
    outb(0x3f8 + 1, 0x00);
    serial_puts("chaos: survived\n");
    poweroff();
}
