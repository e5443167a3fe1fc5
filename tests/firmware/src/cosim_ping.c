/* cosim_ping: one side of a ping/pong over shared memory and doorbells (with
 * cosim_pong on a second node; see cosim.h for the links).
 * Shared region at 0x20200000 {ping, pong, rounds, done}. For round i in
 * 1..COSIM_ROUNDS (100): write ping = i, ring the doorbell, sleep (WFI) until
 * the peer's doorbell raises IRQ 30; then pong must be i (else "ping: protocol
 * error: round <i>, pong <p>\n", exit 1). Prints "ping ready\n" at start,
 * "ping: round <i>\n" every 10 rounds and, at the end (done = 1),
 * "ping: 100 round trips, pong sum 5050\n", then exits 0.
 * Each round completes in the IRQ 30 handler, which starts the next one;
 * main only sleeps (no check-then-WFI window to lose an interrupt in). */
#include "cosim.h"

static struct ping_region *const shared = (struct ping_region *)COSIM_OUT_REGION;

static volatile uint32_t round_in_flight; /* the round whose pong we wait for */
static uint32_t pong_sum;

static void send_ping(uint32_t round)
{
    round_in_flight = round;
    shared->ping = round;
    cosim_ring_doorbell();
}

/* The peer rang: its pong for the round in flight is in the shared region. */
void IRQ30_Handler(void)
{
    uint32_t round = round_in_flight;
    uint32_t pong = shared->pong;
    if (pong != round) {
        fw_puts("ping: protocol error: round ");
        fw_put_dec((int32_t)round);
        fw_puts(", pong ");
        fw_put_dec((int32_t)pong);
        fw_puts("\n");
        fw_exit(1);
    }
    pong_sum += pong;
    if (round % 10u == 0u) {
        fw_puts("ping: round ");
        fw_put_dec((int32_t)round);
        fw_puts("\n");
    }
    if (round == COSIM_ROUNDS) {
        shared->done = 1u;
        fw_puts("ping: ");
        fw_put_dec((int32_t)round);
        fw_puts(" round trips, pong sum ");
        fw_put_dec((int32_t)pong_sum);
        fw_puts("\n");
        fw_exit(0);
    }
    send_ping(round + 1u);
}

int main(void)
{
    fw_puts("ping ready\n");
    shared->rounds = COSIM_ROUNDS;
    cosim_enable_doorbell_irq();
    send_ping(1u);
    cosim_sleep_forever();
}
