/* "hello": greets on COM1 and powers off. */
    .intel_syntax noprefix
    .text
    .globl guest_main
guest_main:
    lea rdi, [rip + msg]
    call serial_puts
    jmp poweroff

    .section .rodata
msg:
    .asciz "Hello from the microvmm test guest\n"
