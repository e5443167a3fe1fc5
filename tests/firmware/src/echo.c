/* echo: prints "echo ready\n", then echoes every byte received on UART0.
 * On 'q' (not echoed) it prints "bye\n" and exits 0. */
#include "fw.h"

int main(void)
{
    fw_puts("echo ready\n");
    for (;;) {
        int c = uart_getc();
        if (c == 'q')
            break;
        uart_putc((char)c);
    }
    fw_puts("bye\n");
    return 0;
}
