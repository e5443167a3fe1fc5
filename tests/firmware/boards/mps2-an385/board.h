#ifndef BOARD_H
#define BOARD_H
#define BOARD_NAME "mps2-an385"
#define UART0_BASE 0x40004000u /* CMSDK APB UART0 */
#ifndef FAULT_ADDR
#define FAULT_ADDR 0xF0000000u /* unmapped in QEMU: BusFault -> HardFault */
#endif
#ifndef SYSTICK_RELOAD
#define SYSTICK_RELOAD 10000u
#endif
#endif
