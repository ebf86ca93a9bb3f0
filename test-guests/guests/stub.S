/*
 * CPL0 stub of the test-guest kit. Entered in 64-bit mode the way a Linux kernel is (flat
 * segments, identity paging of low memory, interrupts off) with rdi = vCPU index and rdx = number
 * of vCPUs. It builds its own page tables (identity map of the first 1 GiB and of 3-4 GiB,
 * user-accessible, 2 MiB pages), GDT with user segments and one TSS per vCPU, an empty IDT (any exception is a
 * triple fault), enables SSE, and `iretq`s to guest_main(cpu, ncpus) at CPL3 with IOPL=3, so
 * the guest's work runs natively and its port I/O still reaches the VMM.
 *
 * Keep to plain moves, arithmetic and branches here: on an emulating KVM every CPL0 instruction
 * goes through the instruction emulator.
 */
    .intel_syntax noprefix
    .include "layout.inc"
    /* 104-byte TSS + 8 KiB I/O bitmap + terminator byte, rounded up. */
    .set TSS_LIMIT, 0x68 + 8192
    .set TSS_SIZE, 0x2100

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    mov r14, rdi                    /* cpu index */
    mov r15, rdx                    /* cpu count */
    cmp r14, MAX_CPUS
    jae stub_halt
    /* Every vCPU enters with the same boot stack: move to this vCPU's own kernel stack first. */
    mov rax, r14
    inc rax
    imul rax, rax, KERNEL_STACK_SIZE
    lea rsp, [rip + stub_kstacks]
    add rsp, rax

    test r14, r14
    jnz 2f
    /* vCPU 0: page directory: 512 x 2 MiB pages, Present|RW|User|PS. */
    lea rdi, [rip + stub_pd]
    mov eax, 0x87
    mov ecx, 512
1:
    mov [rdi], rax
    add rax, 0x200000
    add rdi, 8
    dec ecx
    jnz 1b
    lea rax, [rip + stub_pd]
    or rax, 7
    mov [rip + stub_pdpt], rax
    /* 3-4 GiB (virtio-mmio windows, IOAPIC, LAPIC): 2 MiB pages, uncached
     * (Present|RW|User|PWT|PCD|PS), so CPL3 drivers can reach device registers. */
    lea rdi, [rip + stub_pd_hi]
    mov eax, 0xc000009f
    mov ecx, 512
3:
    mov [rdi], rax
    add rax, 0x200000
    add rdi, 8
    dec ecx
    jnz 3b
    lea rax, [rip + stub_pd_hi]
    or rax, 7
    mov [rip + stub_pdpt + 24], rax
    lea rax, [rip + stub_pdpt]
    or rax, 7
    mov [rip + stub_pml4], rax
    mov dword ptr [rip + stub_tables_ready], 1
2:
    mov eax, [rip + stub_tables_ready]
    test eax, eax
    jz 2b

    lea rax, [rip + stub_pml4]
    mov cr3, rax
    mov rax, cr4
    or rax, 0x600                   /* OSFXSR | OSXMMEXCPT: SSE for the CPL3 code */
    mov cr4, rax

    /* This vCPU's TSS: rsp0 = top of its kernel stack, and an I/O permission bitmap that allows
     * every port (all zero bits, then the 0xff terminator). On kvm_pvm an emulated iretq/sysret
     * to CPL3 clears IOPL, so the bitmap is what lets CPL3 port I/O through to the VMM. */
    mov rax, r14
    imul rax, rax, TSS_SIZE
    lea rbx, [rip + stub_tss]
    add rbx, rax                    /* rbx = &tss[cpu] */
    mov rax, r14
    inc rax
    imul rax, rax, KERNEL_STACK_SIZE
    lea rcx, [rip + stub_kstacks]
    add rax, rcx
    mov [rbx + 4], rax
    mov word ptr [rbx + 0x66], 0x68
    mov byte ptr [rbx + 0x68 + 8192], 0xff

    /* Its TSS descriptor: GDT slot 5 + 2*cpu (16 bytes each). */
    mov rax, r14
    shl rax, 4
    lea rdi, [rip + stub_gdt + 40]
    add rdi, rax
    mov rax, rbx
    and rax, 0xffffff
    shl rax, 16
    or rax, TSS_LIMIT
    mov rcx, 0x89
    shl rcx, 40                     /* present, 64-bit available TSS */
    or rax, rcx
    mov rcx, rbx
    shr rcx, 24
    and rcx, 0xff
    shl rcx, 56
    or rax, rcx
    mov [rdi], rax
    mov rax, rbx
    shr rax, 32
    mov [rdi + 8], rax

    lgdt [rip + stub_gdt_ptr]
    lidt [rip + stub_idt_ptr]
    lea rax, [rip + 3f]
    push 0x08
    push rax
    lretq
3:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rax, r14
    shl rax, 4
    add rax, 40
    ltr ax

    /* Drop to CPL3: iretq frame SS, RSP, RFLAGS (IOPL=3, IF=0), CS, RIP. */
    mov rax, r14
    inc rax
    imul rax, rax, USER_STACK_SIZE
    lea rcx, [rip + stub_ustacks]
    add rax, rcx
    push 0x1b
    push rax
    push 0x3002
    push 0x23
    lea rax, [rip + stub_user_entry]
    push rax
    mov rdi, r14
    mov rsi, r15
    iretq

stub_halt:
    hlt
    jmp stub_halt

    .text
/* CPL3: call guest_main(cpu, ncpus); if it returns, power off. */
stub_user_entry:
    and rsp, -16
    call guest_main
    jmp poweroff

    .section .rodata
    .balign 8
stub_gdt_ptr:
    .word stub_gdt_end - stub_gdt - 1
    .quad stub_gdt
stub_idt_ptr:
    .word 0
    .quad 0

    .data
    .balign 16
stub_gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cff2000000ffff        /* 0x18 user data (selector 0x1b) */
    .quad 0x00affa000000ffff        /* 0x20 user code, 64-bit (selector 0x23) */
    .fill MAX_CPUS * 2, 8, 0        /* 0x28 + 16*cpu: TSS descriptors */
stub_gdt_end:
stub_tables_ready:
    .long 0

    .bss
    .balign 4096
stub_pml4:
    .fill 512, 8, 0
stub_pdpt:
    .fill 512, 8, 0
stub_pd:
    .fill 512, 8, 0
stub_pd_hi:
    .fill 512, 8, 0
    .balign 4096
stub_tss:
    .fill MAX_CPUS * TSS_SIZE, 1, 0
    .balign 4096
stub_kstacks:
    .fill MAX_CPUS * KERNEL_STACK_SIZE, 1, 0
stub_ustacks:
    .fill MAX_CPUS * USER_STACK_SIZE, 1, 0
