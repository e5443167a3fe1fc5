/* lm3s6965evb UART0: ARM PL011 at 0x4000C000. QEMU needs no initialisation. */
#include "fw.h"

#define UART_DR REG32(UART0_BASE + 0x00)
#define UART_FR REG32(UART0_BASE + 0x18)
#define FR_RXFE (1u << 4)
#define FR_TXFF (1u << 5)

void uart_init(void)
{
}

void uart_putc(char c)
{
    while (UART_FR & FR_TXFF) {
    }
    UART_DR = (uint8_t)c;
}

int uart_getc(void)
{
    while (UART_FR & FR_RXFE) {
    }
    return (int)(UART_DR & 0xff);
}

int uart_rx_ready(void)
{
    return (UART_FR & FR_RXFE) ? 0 : 1;
}
