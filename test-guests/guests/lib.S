/* CPL3 helpers of the test-guest kit (System V calling convention). */
    .intel_syntax noprefix
    .include "layout.inc"
    .text

/* serial_putc(dil = byte): wait for the transmitter, write COM1. */
    .globl serial_putc
serial_putc:
    mov dx, COM1 + 5
1:
    in al, dx
    test al, 0x20
    jz 1b
    mov dx, COM1
    mov eax, edi
    out dx, al
    ret

/* serial_puts(rdi = NUL-terminated string). */
    .globl serial_puts
serial_puts:
    push rbx
    mov rbx, rdi
1:
    movzx edi, byte ptr [rbx]
    test edi, edi
    jz 2f
    call serial_putc
    inc rbx
    jmp 1b
2:
    pop rbx
    ret

/* serial_put_dec(rdi = unsigned value): decimal digits. */
    .globl serial_put_dec
serial_put_dec:
    push rbx
    sub rsp, 32
    mov rax, rdi
    lea rbx, [rsp + 31]
    mov byte ptr [rbx], 0
    mov rcx, 10
1:
    xor edx, edx
    div rcx
    add dl, '0'
    dec rbx
    mov [rbx], dl
    test rax, rax
    jnz 1b
    mov rdi, rbx
    call serial_puts
    add rsp, 32
    pop rbx
    ret

/* report(rdi = u64): one value to the host's report port. */
    .globl report
report:
    mov dx, REPORT_PORT
    mov rax, rdi
    out dx, eax
    add dx, 4
    shr rax, 32
    out dx, eax
    ret

/* poweroff(): ACPI S5; never returns. */
    .globl poweroff
poweroff:
    mov dx, ACPI_PM
    mov al, SLEEP_POWEROFF
    out dx, al
1:
    pause
    jmp 1b
