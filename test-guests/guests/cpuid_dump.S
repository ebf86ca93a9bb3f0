/*
 * "cpuid_dump": no stub, stays at CPL0, where CPUID is answered by KVM from the table the VMM
 * set. Every vCPU stores CPUID leaf 1 (ebx, ecx, edx) and leaf 0xb subleaf 1 (eax, ebx, ecx,
 * edx) into its 32-byte slot of shared_cpuid, then checks in; vCPU 0 waits for all and powers off.
 */
    .intel_syntax noprefix
    .include "layout.inc"
    .section .text.entry, "ax"
    .globl _start
_start:
    mov r14, rdi                    /* cpu */
    mov r15, rdx                    /* ncpus */
    lea rsi, [rip + shared_cpuid]
    mov rax, r14
    shl rax, 5
    add rsi, rax
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov [rsi], ebx
    mov [rsi + 4], ecx
    mov [rsi + 8], edx
    mov eax, 0xb
    mov ecx, 1
    cpuid
    mov [rsi + 12], eax
    mov [rsi + 16], ebx
    mov [rsi + 20], ecx
    mov [rsi + 24], edx
    lock inc qword ptr [rip + shared_cpuid_done]
    test r14, r14
    jz 2f
1:
    pause
    jmp 1b
2:
    cmp [rip + shared_cpuid_done], r15
    jb 2b
    mov dx, ACPI_PM
    mov al, SLEEP_POWEROFF
    out dx, al
3:
    jmp 3b

    .section .shared, "aw"
    .balign 64
    .globl shared_cpuid, shared_cpuid_done
shared_cpuid:
    .fill MAX_CPUS * 32, 1, 0
shared_cpuid_done:
    .quad 0
