/* fault: prints "about to fault\n", then loads from FAULT_ADDR (unmapped on
 * the board in QEMU).
 *  - Cortex-M: precise BusFault, escalated to HardFault (BusFault is not
 *    enabled in SHCSR); HardFault_Handler prints "hardfault\n", exits 3.
 *    On lm3s6965evb QEMU 7.2 does not fault unmapped reads (they read 0),
 *    so the program goes on to an unaligned LDRD (UsageFault -> HardFault):
 *    same output, same exit code, different faulting instruction.
 *  - RISC-V: load access fault; the trap handler prints
 *    "trap mcause=5\n" and exits 3. */
#include "fw.h"

#if defined(__riscv)
void handle_trap(uint32_t mcause, uint32_t mepc)
{
    (void)mepc;
    fw_puts("trap mcause=");
    fw_put_dec((int32_t)mcause);
    fw_puts("\n");
    fw_exit(3);
}
#else
void HardFault_Handler(void)
{
    fw_puts("hardfault\n");
    fw_exit(3);
}
#endif

int main(void)
{
    fw_puts("about to fault\n");
    uint32_t v = REG32(FAULT_ADDR);
#if !defined(__riscv)
    /* Only reached where QEMU ignores bus errors: lm3s6965evb is a "legacy"
     * board (ignore_memory_transaction_failures), so the read above returns 0.
     * An LDRD from a non-word-aligned address is a UsageFault (UNALIGNED) on
     * every ARMv7-M core whatever CCR says; escalated to HardFault. */
    uint32_t lo, hi;
    __asm__ volatile("ldrd %0, %1, [%2]" : "=r"(lo), "=r"(hi) : "r"(0x20000002u) : "memory");
    v ^= lo ^ hi;
#endif
    fw_puts("no fault, read 0x"); /* only if the address turned out to be mapped */
    fw_put_hex32(v);
    fw_puts("\n");
    return 1;
}
