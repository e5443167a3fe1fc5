/* systick (Cortex-M): SysTick interrupts every SYSTICK_RELOAD CPU cycles
 * (CSR.CLKSOURCE=1 processor clock, TICKINT=1, ENABLE=1); exception 15
 * increments a counter (saturating at 10); main sleeps with WFI until the
 * counter reaches 10, stops SysTick, prints "ticks=10\n" and exits 0. */
#include "fw.h"

#define SYST_CSR REG32(0xE000E010u)
#define SYST_RVR REG32(0xE000E014u)
#define SYST_CVR REG32(0xE000E018u)
#define CSR_ENABLE (1u << 0)
#define CSR_TICKINT (1u << 1)
#define CSR_CLKSOURCE (1u << 2)

static volatile uint32_t ticks;

void SysTick_Handler(void)
{
    /* Saturate at 10 and keep SysTick running: a late tick cannot make it 11,
     * and a tick landing between main's check and its WFI still wakes it. */
    if (ticks < 10)
        ticks++;
}

int main(void)
{
    SYST_RVR = SYSTICK_RELOAD - 1;
    SYST_CVR = 0;
    SYST_CSR = CSR_CLKSOURCE | CSR_TICKINT | CSR_ENABLE;
    while (ticks < 10)
        __asm__ volatile("wfi");
    SYST_CSR = 0;
    fw_puts("ticks=");
    fw_put_dec((int32_t)ticks);
    fw_puts("\n");
    return 0;
}
