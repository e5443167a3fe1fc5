/* RISC-V (M-mode) entry: set gp, sp and mtvec, then jump to C. */
    .file "common/startup_riscv.S"
    .section .text.init,"ax",@progbits
    .globl _start
    .type _start, @function
_start:
    .option push
    .option norelax
    la gp, __global_pointer$
    .option pop
    la sp, _estack
    la t0, trap_entry
    csrw mtvec, t0          /* direct mode: trap_entry is 4-byte aligned */
    call c_start
1:  j 1b
    .size _start, . - _start
