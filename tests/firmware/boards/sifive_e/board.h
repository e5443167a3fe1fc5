#ifndef BOARD_H
#define BOARD_H
#define BOARD_NAME "sifive_e"
#define UART0_BASE 0x10013000u   /* SiFive UART0 */
#define CLINT_BASE 0x02000000u
#define CLINT_MTIMECMP (CLINT_BASE + 0x4000u)
#define CLINT_MTIME (CLINT_BASE + 0xBFF8u)
#ifndef TIMER_INTERVAL
#define TIMER_INTERVAL 1000u     /* mtime ticks (QEMU: 10 MHz) between interrupts */
#endif
#ifndef FAULT_ADDR
#define FAULT_ADDR 0x40000000u   /* unmapped in QEMU: load access fault, mcause 5 */
#endif
#endif
