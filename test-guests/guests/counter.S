/*
 * "counter": increments shared_counter as fast as it can (natively, at CPL3). Each time the host
 * changes shared_request, the guest reports the counter's current value on the report port.
 * If shared_stop is set when a request arrives, the guest reports and then powers off.
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
    /* Read the stop flag before reporting: the host may set it as soon as it has the report. */
    mov r14, [rip + shared_stop]
    mov rdi, [r12]
    call report
    test r14, r14
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
