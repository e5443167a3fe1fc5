/* hello: prints "Hello from <board>!\n" on UART0 and exits with code 0. */
#include "fw.h"

int main(void)
{
    fw_puts("Hello from " BOARD_NAME "!\n");
    return 0;
}
