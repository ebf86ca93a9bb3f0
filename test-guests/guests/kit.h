/*
 * C interface of the test-guest kit for freestanding CPL3 guests (`test-guests/guests/<name>.c`, built by
 * test-guests/build.rs with gcc -ffreestanding -mgeneral-regs-only and linked with stub.S and lib.S).
 * Define `void guest_main(unsigned long cpu, unsigned long ncpus)`; returning powers off.
 * Put host-visible variables in `SHARED` (section .shared) with external linkage: their
 * addresses appear in `vmm_test_guests::<NAME>.symbols`.
 */
#ifndef MICROVMM_KIT_H
#define MICROVMM_KIT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define SHARED __attribute__((section(".shared"), aligned(64)))

/* From lib.S. */
void serial_putc(int c);
void serial_puts(const char *s);
void serial_put_dec(u64 v);
void report(u64 v);
void poweroff(void) __attribute__((noreturn));

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
/* Idle hint (port 0x518, `vmm::vcpu::IDLE_PORT`): nothing to do right now; the vCPU thread
 * gives its host CPU away for a moment (CPL3 cannot `hlt`). Use in polling loops that found
 * no work, so that idle guests do not take a host CPU each. */
static inline void idle(void) { outb(0x518, 0); }

#endif
