/* timer (RISC-V): CLINT machine timer interrupt every TIMER_INTERVAL mtime
 * ticks (mtvec direct mode, mie.MTIE, mstatus.MIE); the trap handler
 * increments a counter (saturating at 10) and re-arms mtimecmp; main sleeps
 * with WFI until the counter reaches 10, clears mie.MTIE, prints
 * "ticks=10\n" and exits 0. */
#include "fw.h"

#define MCAUSE_MTI 0x80000007u
#define MIE_MTIE (1u << 7)
#define MSTATUS_MIE (1u << 3)

static volatile uint32_t ticks;

static uint64_t mtime(void)
{
    uint32_t hi, lo;
    do {
        hi = REG32(CLINT_MTIME + 4);
        lo = REG32(CLINT_MTIME);
    } while (hi != REG32(CLINT_MTIME + 4));
    return ((uint64_t)hi << 32) | lo;
}

static void set_mtimecmp(uint64_t t)
{
    REG32(CLINT_MTIMECMP + 4) = 0xFFFFFFFFu; /* no spurious match while updating */
    REG32(CLINT_MTIMECMP) = (uint32_t)t;
    REG32(CLINT_MTIMECMP + 4) = (uint32_t)(t >> 32);
}

void handle_trap(uint32_t mcause, uint32_t mepc)
{
    (void)mepc;
    if (mcause == MCAUSE_MTI) {
        /* Saturate at 10 and keep re-arming: a late tick cannot make it 11,
         * and a tick landing between main's check and its WFI still wakes it. */
        if (ticks < 10)
            ticks++;
        set_mtimecmp(mtime() + TIMER_INTERVAL);
        return;
    }
    fw_puts("unexpected trap mcause=");
    fw_put_dec((int32_t)mcause);
    fw_puts("\n");
    fw_exit(2);
}

int main(void)
{
    set_mtimecmp(mtime() + TIMER_INTERVAL);
    __asm__ volatile("csrs mie, %0" ::"r"(MIE_MTIE));
    __asm__ volatile("csrs mstatus, %0" ::"r"(MSTATUS_MIE));
    while (ticks < 10)
        __asm__ volatile("wfi");
    __asm__ volatile("csrc mie, %0" ::"r"(MIE_MTIE));
    fw_puts("ticks=");
    fw_put_dec((int32_t)ticks);
    fw_puts("\n");
    return 0;
}
