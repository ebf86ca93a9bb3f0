/*
 * "emulation_failure": no stub, stays at CPL0. Writes a marker to COM1, then runs `popcnt`,
 * which an emulating KVM cannot execute (KVM_EXIT_INTERNAL_ERROR, emulation failure). Where the
 * CPU runs it natively (hardware KVM), it next jumps to guest-physical memory with no memory
 * slot behind it, which no KVM can fetch instructions from.
 */
    .intel_syntax noprefix
    .include "layout.inc"
    .section .text.entry, "ax"
    .globl _start
_start:
    mov dx, COM1
    mov al, '!'
    out dx, al
    popcnt rax, rbx
    mov rax, 0x30000000             /* 768 MiB: identity-mapped, above the test VMs' RAM */
    jmp rax
