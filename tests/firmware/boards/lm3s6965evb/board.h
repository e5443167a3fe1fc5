#ifndef BOARD_H
#define BOARD_H
#define BOARD_NAME "lm3s6965evb"
#define UART0_BASE 0x4000C000u /* PL011, IRQ 5 */
#define FAULT_ADDR 0xF0000000u /* unmapped in QEMU: BusFault -> HardFault */
#define SYSTICK_RELOAD 10000u  /* SysTick period in CPU cycles */
#endif
