/* sifive_e UART0 at 0x10013000. */
#include "fw.h"

#define UART_TXDATA REG32(UART0_BASE + 0x00)
#define UART_RXDATA REG32(UART0_BASE + 0x04)
#define UART_TXCTRL REG32(UART0_BASE + 0x08)
#define UART_RXCTRL REG32(UART0_BASE + 0x0C)
#define UART_IP REG32(UART0_BASE + 0x14)
#define DATA_FULL_EMPTY (1u << 31) /* txdata: FIFO full; rxdata: FIFO empty */

void uart_init(void)
{
    UART_TXCTRL = 1; /* txen */
    UART_RXCTRL = 1; /* rxen */
}

void uart_putc(char c)
{
    while (UART_TXDATA & DATA_FULL_EMPTY) {
    }
    UART_TXDATA = (uint8_t)c;
}

int uart_getc(void)
{
    for (;;) {
        uint32_t r = UART_RXDATA; /* reading pops the FIFO */
        if (!(r & DATA_FULL_EMPTY))
            return (int)(r & 0xff);
    }
}

int uart_rx_ready(void)
{
    return (int)(UART_IP & 2u) ? 1 : 0; /* ip.rxwm: the RX FIFO holds more than rxcnt (0) bytes */
}
