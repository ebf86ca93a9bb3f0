/* "reset": vCPU 0 says so, then pulses the reset line through the i8042 (command 0xfe on port 0x64),
 * as Linux does with reboot=k. */
    .intel_syntax noprefix
    .text
    .globl guest_main
guest_main:
    test rdi, rdi                   /* other vCPUs just spin */
    jnz 1f
    lea rdi, [rip + msg]
    call serial_puts
    mov dx, 0x64
    mov al, 0xfe
    out dx, al
1:
    pause
    jmp 1b

    .section .rodata
msg:
    .asciz "reset: via i8042\n"
