#ifndef BOARD_H
#define BOARD_H
#define BOARD_NAME "lm3s6965evb"
#define UART0_BASE 0x4000C000u /* PL011, IRQ 5 */
#ifndef FAULT_ADDR
#define FAULT_ADDR 0xF0000000u /* unmapped, but QEMU reads it as 0 (legacy board): see src/fault.c */
#endif
#ifndef SYSTICK_RELOAD
#define SYSTICK_RELOAD 10000u  /* SysTick period in CPU cycles */
#endif
#endif
