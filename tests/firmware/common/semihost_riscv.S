/* RISC-V semihosting: the magic uncompressed sequence
 *   slli x0,x0,0x1f ; ebreak ; srai x0,x0,7
 * a0 = operation, a1 = argument (already in place per the calling convention).
 * The three instructions must be 32-bit and must not cross a page: align 16. */
    .file "common/semihost_riscv.S"
    .section .text.semihost_call,"ax",@progbits
    .globl semihost_call
    .type semihost_call, @function
    .balign 16
    .option push
    .option norvc
semihost_call:
    slli x0, x0, 0x1f
    ebreak
    srai x0, x0, 7
    ret
    .option pop
    .size semihost_call, . - semihost_call
