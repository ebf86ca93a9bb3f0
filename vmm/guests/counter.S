/*
 * "counter": increments shared_counter as fast as it can (natively, at CPL3). Each time the host
 * changes shared_request, the guest reports the counter's current value on the report port.
 * shared_stop != 0 makes it power off after reporting.
 */
    .intel_syntax noprefix
    .text
    .globl guest_main
guest_main:
    lea rdi, [rip + ready]
    call serial_puts
    xor ebx, ebx                    /* last request seen */
    lea r12, [rip + shared_counter]
    lea r13, [rip + shared_request]
1:
    inc qword ptr [r12]
    mov rax, [r13]
    cmp rax, rbx
    je 1b
    mov rbx, rax
    mov rdi, [r12]
    call report
    mov rax, [rip + shared_stop]
    test rax, rax
    jz 1b
    jmp poweroff

    .section .rodata
ready:
    .asciz "counter: ready\n"

    .section .shared, "aw"
    .balign 64
    .globl shared_counter, shared_request, shared_stop
shared_counter:
    .quad 0
    .balign 64
shared_request:
    .quad 0
shared_stop:
    .quad 0
