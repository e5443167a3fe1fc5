#ifndef BOARD_H
#define BOARD_H
#define BOARD_NAME "mps2-an385"
#define UART0_BASE 0x40004000u /* CMSDK APB UART0 */
#define FAULT_ADDR 0xF0000000u /* unmapped in QEMU: BusFault -> HardFault */
#define SYSTICK_RELOAD 10000u
#endif
