/* boot_heavy: a firmware whose boot costs about a million instructions (a busy mixing
 * loop standing in for a slow init: self tests, tables), then prints "ready\n" and
 * waits for a command on UART0. Built with BOOT_POLL_EVERY=N (boot_poll.c), every Nth
 * round also reads a peripheral status register, as a boot waiting on clock or flash
 * ready flags does. On 'g' it prints "result=<the boot's checksum>\n"
 * and exits 0; on 'f' it prints "bad\n" and exits 1.
 * A run forked from a snapshot taken at "ready" skips the boot: scripts/bench compares
 * its start latency with a cold boot. */
#include "fw.h"

#ifndef BOOT_ROUNDS
#define BOOT_ROUNDS 110000u
#endif
#ifndef BOOT_POLL_EVERY
#define BOOT_POLL_EVERY 0u
#endif

static uint32_t boot(void)
{
    volatile uint32_t state = 0x12345678u;
    for (uint32_t i = 0; i < BOOT_ROUNDS; i++) {
        uint32_t x = state;
        x ^= x << 13;
        x ^= x >> 17;
        state = x ^ (x << 5) ^ i;
        if (BOOT_POLL_EVERY && i % BOOT_POLL_EVERY == 0)
            (void)uart_rx_ready(); /* a status read; what it says leaves the checksum alone */
    }
    return state;
}

int main(void)
{
    uint32_t sum = boot();
    fw_puts("ready\n");
    for (;;) {
        int c = uart_getc();
        if (c == 'g') {
            fw_puts("result=");
            fw_put_hex32(sum);
            fw_puts("\n");
            return 0;
        }
        if (c == 'f') {
            fw_puts("bad\n");
            return 1;
        }
    }
}
