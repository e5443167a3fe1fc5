/* netduinoplus2 (STM32F405) USART1 at 0x40011000: QEMU's serial 0.
 * QEMU drops received bytes unless CR1.UE and CR1.RE are set. */
#include "fw.h"

#define USART_SR REG32(UART0_BASE + 0x00)
#define USART_DR REG32(UART0_BASE + 0x04)
#define USART_CR1 REG32(UART0_BASE + 0x0C)
#define SR_RXNE (1u << 5)
#define SR_TXE (1u << 7)
#define CR1_UE (1u << 13)
#define CR1_TE (1u << 3)
#define CR1_RE (1u << 2)

void uart_init(void)
{
    USART_CR1 = CR1_UE | CR1_TE | CR1_RE;
}

void uart_putc(char c)
{
    while (!(USART_SR & SR_TXE)) {
    }
    USART_DR = (uint8_t)c;
}

int uart_getc(void)
{
    while (!(USART_SR & SR_RXNE)) {
    }
    return (int)(USART_DR & 0xff);
}

int uart_rx_ready(void)
{
    return (USART_SR & SR_RXNE) ? 1 : 0;
}
