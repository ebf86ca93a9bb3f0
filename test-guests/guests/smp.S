/*
 * "smp": every vCPU increments its own slot of shared_cpu_counter ITERATIONS times, then checks
 * in; vCPU 0 waits for all of them, prints "smp: <n> of <n> cpus done" and powers off.
 */
    .intel_syntax noprefix
    .set ITERATIONS, 1000000
    .text
    .globl guest_main
guest_main:
    mov r12, rdi                    /* cpu */
    mov r13, rsi                    /* ncpus */
    lea rbx, [rip + shared_cpu_counter]
    mov ecx, ITERATIONS
1:
    inc qword ptr [rbx + r12 * 8]
    dec ecx
    jnz 1b
    lock inc qword ptr [rip + shared_cpus_done]
    test r12, r12
    jz 2f
3:
    pause
    jmp 3b
2:
    mov rax, [rip + shared_cpus_done]
    cmp rax, r13
    jb 2b
    lea rdi, [rip + msg1]
    call serial_puts
    mov rdi, [rip + shared_cpus_done]
    call serial_put_dec
    lea rdi, [rip + msg2]
    call serial_puts
    mov rdi, r13
    call serial_put_dec
    lea rdi, [rip + msg3]
    call serial_puts
    jmp poweroff

    .section .rodata
msg1:
    .asciz "smp: "
msg2:
    .asciz " of "
msg3:
    .asciz " cpus done\n"

    .section .shared, "aw"
    .balign 64
    .globl shared_cpu_counter, shared_cpus_done
shared_cpu_counter:
    .fill 8, 8, 0
shared_cpus_done:
    .quad 0
