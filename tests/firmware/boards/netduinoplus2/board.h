#ifndef BOARD_H
#define BOARD_H
#define BOARD_NAME "netduinoplus2"
#define UART0_BASE 0x40011000u /* USART1: QEMU wires serial 0 (-serial stdio) to it */
#ifndef FAULT_ADDR
#define FAULT_ADDR 0xF0000000u /* unmapped in QEMU: BusFault -> HardFault */
#endif
#ifndef SYSTICK_RELOAD
#define SYSTICK_RELOAD 10000u
#endif
#endif
