/*
 * "dirtier" (C): keeps writing guest memory, for dirty-tracking and live-clone tests. Each pass
 * writes one u64 into each of `shared_dirty_pages` 4 KiB pages starting at 16 MiB (the pass
 * number, so a copy shows which pass it saw), then increments `shared_passes`. The host sets
 * `shared_dirty_pages` (default 256 = 1 MiB) and may change it at any time; setting
 * `shared_stop` makes the guest report `shared_passes` and power off.
 */
#include "kit.h"

#define DIRTY_BASE (16ul << 20)
#define PAGE 4096ul

SHARED volatile u64 shared_dirty_pages = 256;
SHARED volatile u64 shared_passes;
SHARED volatile u64 shared_stop;

void guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu != 0) {
        for (;;)
            cpu_relax();
    }
    serial_puts("dirtier: ready\n");
    while (!shared_stop) {
        u64 pass = shared_passes + 1;
        u64 n = shared_dirty_pages;
        for (u64 i = 0; i < n; i++)
            *(volatile u64 *)(DIRTY_BASE + i * PAGE) = pass;
        shared_passes = pass;
    }
    report(shared_passes);
    poweroff();
}
