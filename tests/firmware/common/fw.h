/* Shared helpers for the MachineServer test firmware (freestanding, no libc). */
#ifndef FW_H
#define FW_H

#include <stdint.h>
#include <stddef.h>

#include "board.h" /* per board: BOARD_NAME, FAULT_ADDR, ... */

#define REG32(addr) (*(volatile uint32_t *)(uintptr_t)(addr))

/* Board UART (boards/<board>/uart.c). */
void uart_init(void);
void uart_putc(char c);
int uart_getc(void); /* blocks until a byte arrives */
int uart_rx_ready(void); /* 1 when a byte waits (one status read, no side effect) */

/* Console helpers (common/fw.c). */
void fw_puts(const char *s); /* no newline added */
void fw_put_hex32(uint32_t v); /* exactly 8 lowercase hex digits */
void fw_put_dec(int32_t v);

/* Semihosting (common/semihost_*.c / .S). */
#define SYS_WRITEC 0x03
#define SYS_WRITE0 0x04
#define SYS_EXIT 0x18
#define SYS_EXIT_EXTENDED 0x20
#define ADP_STOPPED_APPLICATION_EXIT 0x20026u

uintptr_t semihost_call(uintptr_t op, uintptr_t arg);
/* Exit the simulation: code 0 -> SYS_EXIT(0x20026); otherwise
 * SYS_EXIT_EXTENDED with r1/a1 -> {0x20026, code}. */
void fw_exit(int code) __attribute__((noreturn));

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

#endif
