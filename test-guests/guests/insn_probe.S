/*
 * "insn_probe": runs a list of single-instruction probes at CPL0, starting at index
 * shared_probe_start (set by the host before boot). Before each probe it reports the probe's
 * index on the report port; after the last it powers off. A probe that KVM cannot execute ends
 * the VM with an emulation failure (or a triple fault if the instruction faulted), and the host
 * restarts the VM at the next index. probe_table holds (function, name) pairs and probe_count
 * their number, for the host to read.
 */
    .intel_syntax noprefix
    .include "layout.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    mov rax, cr4
    or rax, 0x600                   /* OSFXSR | OSXMMEXCPT, for the SSE probes */
    mov cr4, rax
    lea rsp, [rip + probe_stack_top]
    mov rbx, [rip + shared_probe_start]
1:
    cmp rbx, [rip + probe_count]
    jae 2f
    mov dx, REPORT_PORT
    mov eax, ebx
    out dx, eax
    add dx, 4
    xor eax, eax
    out dx, eax
    lea rax, [rip + probe_table]
    mov rcx, rbx
    shl rcx, 4
    call [rax + rcx]
    inc rbx
    jmp 1b
2:
    mov dx, ACPI_PM
    mov al, SLEEP_POWEROFF
    out dx, al
3:
    jmp 3b

    .text
.macro PROBE name:req, i1, i2, i3, i4, i5, i6, i7, i8
    .text
probe_\name:
    \i1
    \i2
    \i3
    \i4
    \i5
    \i6
    \i7
    \i8
    ret
    .section .rodata
name_\name:
    .asciz "\name"
    .section .data.table, "aw"
    .quad probe_\name, name_\name
.endm

    .section .data.table, "aw"
    .balign 8
    .globl probe_table
probe_table:

PROBE mov_add, "mov rax, 1", "add rax, rcx"
PROBE imul_div, "mov rax, 100", "mov ecx, 7", "imul rax, rcx", "xor edx, edx", "div rcx"
PROBE cmov_bt, "xor eax, eax", "cmp eax, 1", "cmovne rax, rcx", "bt rax, 3"
PROBE bswap_shld, "mov rax, 0x1122334455667788", "bswap rax", "shld rax, rcx, 4"
PROBE lahf_sahf, "lahf", "sahf"
PROBE pushf_popf, "pushfq", "popfq"
PROBE rep_movsb, "lea rsi, [rip + probe_buf]", "lea rdi, [rip + probe_buf + 64]", "mov ecx, 32", "rep movsb"
PROBE rep_stosq, "lea rdi, [rip + probe_buf]", "xor eax, eax", "mov ecx, 8", "rep stosq"
PROBE xchg_mem, "xchg [rip + probe_buf], rax"
PROBE lock_xadd, "mov eax, 1", "lock xadd [rip + probe_buf], rax"
PROBE cmpxchg8b, "push rbx", "xor eax, eax", "xor edx, edx", "xor ebx, ebx", "xor ecx, ecx", "lock cmpxchg8b [rip + probe_buf]", "pop rbx"
PROBE cmpxchg16b, "push rbx", "xor eax, eax", "xor edx, edx", "xor ebx, ebx", "xor ecx, ecx", "lock cmpxchg16b [rip + probe_buf]", "pop rbx"
PROBE cpuid, "push rbx", "xor eax, eax", "xor ecx, ecx", "cpuid", "pop rbx"
PROBE rdtsc, "rdtsc"
PROBE rdtscp, "rdtscp"
PROBE rdmsr_efer, "mov ecx, 0xc0000080", "rdmsr"
PROBE mov_cr0, "mov rax, cr0", "mov cr0, rax"
PROBE sgdt, "sgdt [rip + probe_buf]"
PROBE invlpg, "invlpg [rip + probe_buf]"
PROBE wbinvd, "wbinvd"
PROBE clflush, "clflush [rip + probe_buf]"
PROBE fences, "mfence", "lfence", "sfence"
PROBE pause, "pause"
PROBE popcnt, "popcnt rax, rcx"
PROBE lzcnt, "lzcnt rax, rcx"
PROBE tzcnt, "tzcnt rax, rcx"
PROBE movbe, "movbe rax, [rip + probe_buf]"
PROBE crc32, "crc32 rax, rcx"
PROBE rdrand, "rdrand rax"
PROBE sse_movaps, "movaps xmm0, [rip + probe_buf]", "movaps [rip + probe_buf + 16], xmm0"
PROBE sse_addps, "addps xmm0, xmm1"
PROBE sse2_paddq, "paddq xmm0, xmm1"
PROBE fxsave, "fxsave [rip + probe_fx]", "fxrstor [rip + probe_fx]"
PROBE x87_fld, "fninit", "fld1", "fstp qword ptr [rip + probe_buf]"
PROBE fwait, "fwait"
PROBE clac_stac, "clac", "stac", "clac"
PROBE int3, "int3"
PROBE ud2, "ud2"

    .section .data.table, "aw"
probe_table_end:
    .data
    .balign 8
    .globl probe_count
probe_count:
    .quad (probe_table_end - probe_table) / 16

    .section .shared, "aw"
    .balign 8
    .globl shared_probe_start
shared_probe_start:
    .quad 0

    .bss
    .balign 64
probe_buf:
    .fill 256, 1, 0
    .balign 16
probe_fx:
    .fill 512, 1, 0
    .balign 16
probe_stack:
    .fill 4096, 1, 0
probe_stack_top:

