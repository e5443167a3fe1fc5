/* cosim_pong: the other side of cosim_ping (see cosim.h for the links). Its
 * view of ping's shared region is at 0x20280000 (ping has it at 0x20200000).
 * Prints "pong ready\n"; on each IRQ 30 (ping's doorbell): reads ping, writes
 * pong = ping, adds ping to its sum and rings its own doorbell. When ping is
 * COSIM_ROUNDS (100) it first prints "pong: 100 pings, sum 5050\n". It never
 * exits by itself: between pings it sleeps (WFI). */
#include "cosim.h"

static struct ping_region *const shared = (struct ping_region *)COSIM_PONG_REGION;

static uint32_t pings;
static uint32_t ping_sum;

/* Ping rang: answer the ping it wrote. */
void IRQ30_Handler(void)
{
    uint32_t ping = shared->ping;
    pings++;
    ping_sum += ping;
    shared->pong = ping;
    if (ping == COSIM_ROUNDS) {
        /* printed before ringing: the line is complete before ping can end the run */
        fw_puts("pong: ");
        fw_put_dec((int32_t)pings);
        fw_puts(" pings, sum ");
        fw_put_dec((int32_t)ping_sum);
        fw_puts("\n");
    }
    cosim_ring_doorbell();
}

int main(void)
{
    fw_puts("pong ready\n");
    cosim_enable_doorbell_irq();
    cosim_sleep_forever();
}
