/* Cortex-M startup: vector table, reset handler, default exception handlers.
 * Exception numbers: 1 Reset, 2 NMI, 3 HardFault, 4 MemManage, 5 BusFault,
 * 6 UsageFault, 11 SVCall, 12 DebugMonitor, 14 PendSV, 15 SysTick, 16+ IRQs.
 * External interrupt n (0..31, exception 16 + n) calls IRQn_Handler: weak,
 * Default_Handler unless a program defines it (e.g. IRQ30_Handler). */
#include "fw.h"

extern uint32_t _estack, _sidata, _sdata, _edata, _sbss, _ebss;
int main(void);

void Reset_Handler(void) __attribute__((noreturn));
void Default_Handler(void);
void NMI_Handler(void) __attribute__((weak, alias("Default_Handler")));
void HardFault_Handler(void) __attribute__((weak, alias("Default_Handler")));
void MemManage_Handler(void) __attribute__((weak, alias("Default_Handler")));
void BusFault_Handler(void) __attribute__((weak, alias("Default_Handler")));
void UsageFault_Handler(void) __attribute__((weak, alias("Default_Handler")));
void SVC_Handler(void) __attribute__((weak, alias("Default_Handler")));
void DebugMon_Handler(void) __attribute__((weak, alias("Default_Handler")));
void PendSV_Handler(void) __attribute__((weak, alias("Default_Handler")));
void SysTick_Handler(void) __attribute__((weak, alias("Default_Handler")));

#define N_IRQS 32

#define WEAK_IRQ(n) void IRQ##n##_Handler(void) __attribute__((weak, alias("Default_Handler")));
WEAK_IRQ(0) WEAK_IRQ(1) WEAK_IRQ(2) WEAK_IRQ(3) WEAK_IRQ(4) WEAK_IRQ(5) WEAK_IRQ(6) WEAK_IRQ(7)
WEAK_IRQ(8) WEAK_IRQ(9) WEAK_IRQ(10) WEAK_IRQ(11) WEAK_IRQ(12) WEAK_IRQ(13) WEAK_IRQ(14) WEAK_IRQ(15)
WEAK_IRQ(16) WEAK_IRQ(17) WEAK_IRQ(18) WEAK_IRQ(19) WEAK_IRQ(20) WEAK_IRQ(21) WEAK_IRQ(22) WEAK_IRQ(23)
WEAK_IRQ(24) WEAK_IRQ(25) WEAK_IRQ(26) WEAK_IRQ(27) WEAK_IRQ(28) WEAK_IRQ(29) WEAK_IRQ(30) WEAK_IRQ(31)

typedef void (*vector_t)(void);

__attribute__((section(".isr_vector"), used))
const vector_t vector_table[16 + N_IRQS] = {
    [0] = (vector_t)&_estack,
    [1] = Reset_Handler,
    [2] = NMI_Handler,
    [3] = HardFault_Handler,
    [4] = MemManage_Handler,
    [5] = BusFault_Handler,
    [6] = UsageFault_Handler,
    [11] = SVC_Handler,
    [12] = DebugMon_Handler,
    [14] = PendSV_Handler,
    [15] = SysTick_Handler,
    [16 + 0] = IRQ0_Handler, [16 + 1] = IRQ1_Handler, [16 + 2] = IRQ2_Handler, [16 + 3] = IRQ3_Handler,
    [16 + 4] = IRQ4_Handler, [16 + 5] = IRQ5_Handler, [16 + 6] = IRQ6_Handler, [16 + 7] = IRQ7_Handler,
    [16 + 8] = IRQ8_Handler, [16 + 9] = IRQ9_Handler, [16 + 10] = IRQ10_Handler, [16 + 11] = IRQ11_Handler,
    [16 + 12] = IRQ12_Handler, [16 + 13] = IRQ13_Handler, [16 + 14] = IRQ14_Handler, [16 + 15] = IRQ15_Handler,
    [16 + 16] = IRQ16_Handler, [16 + 17] = IRQ17_Handler, [16 + 18] = IRQ18_Handler, [16 + 19] = IRQ19_Handler,
    [16 + 20] = IRQ20_Handler, [16 + 21] = IRQ21_Handler, [16 + 22] = IRQ22_Handler, [16 + 23] = IRQ23_Handler,
    [16 + 24] = IRQ24_Handler, [16 + 25] = IRQ25_Handler, [16 + 26] = IRQ26_Handler, [16 + 27] = IRQ27_Handler,
    [16 + 28] = IRQ28_Handler, [16 + 29] = IRQ29_Handler, [16 + 30] = IRQ30_Handler, [16 + 31] = IRQ31_Handler,
};

void Reset_Handler(void)
{
    uint32_t *src = &_sidata;
    for (uint32_t *dst = &_sdata; dst < &_edata;)
        *dst++ = *src++;
    for (uint32_t *dst = &_sbss; dst < &_ebss;)
        *dst++ = 0;
    uart_init();
    fw_exit(main());
}

/* Any exception nobody handles: report its number and exit with code 2. */
void Default_Handler(void)
{
    uint32_t ipsr;
    __asm__ volatile("mrs %0, ipsr" : "=r"(ipsr));
    fw_puts("unhandled exception ");
    fw_put_dec((int32_t)(ipsr & 0x1ff));
    fw_puts("\n");
    fw_exit(2);
}
