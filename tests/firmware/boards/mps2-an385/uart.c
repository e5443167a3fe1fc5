/* mps2-an385 UART0: CMSDK APB UART at 0x40004000. Needs BAUDDIV and CTRL TX/RX enable. */
#include "fw.h"

#define UART_DATA REG32(UART0_BASE + 0x00)
#define UART_STATE REG32(UART0_BASE + 0x04)
#define UART_CTRL REG32(UART0_BASE + 0x08)
#define UART_BAUDDIV REG32(UART0_BASE + 0x10)
#define STATE_TXFULL (1u << 0)
#define STATE_RXFULL (1u << 1)
#define CTRL_TXEN (1u << 0)
#define CTRL_RXEN (1u << 1)

void uart_init(void)
{
    UART_BAUDDIV = 16;
    UART_CTRL = CTRL_TXEN | CTRL_RXEN;
}

void uart_putc(char c)
{
    while (UART_STATE & STATE_TXFULL) {
    }
    UART_DATA = (uint8_t)c;
}

int uart_getc(void)
{
    while (!(UART_STATE & STATE_RXFULL)) {
    }
    return (int)(UART_DATA & 0xff);
}

int uart_rx_ready(void)
{
    return (UART_STATE & STATE_RXFULL) ? 1 : 0;
}
