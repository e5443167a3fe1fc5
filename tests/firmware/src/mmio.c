/* mmio: peripheral-heavy work for speed figures: polls the UART status register 200000
 * times (one MMIO read each, no input ever arrives), mixing the answers into a
 * checksum, prints it and exits 0.
 *
 * Expected output (every board): mmio=0x656c62a1 (none of the polls sees a byte)
 */
#include "fw.h"

#define POLLS 200000

int main(void)
{
    uint32_t acc = 1;
    for (uint32_t i = 0; i < POLLS; i++)
        acc = acc * 3u + (uint32_t)uart_rx_ready() + i;
    fw_puts("mmio=0x");
    fw_put_hex32(acc);
    fw_puts("\n");
    return 0;
}
