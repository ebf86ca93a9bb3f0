/* "triple_fault": says so, then executes ud2 at CPL3; with no IDT the fault escalates to a
 * triple fault (KVM_EXIT_SHUTDOWN). */
    .intel_syntax noprefix
    .text
    .globl guest_main
guest_main:
    lea rdi, [rip + msg]
    call serial_puts
    ud2

    .section .rodata
msg:
    .asciz "triple_fault: faulting now\n"
