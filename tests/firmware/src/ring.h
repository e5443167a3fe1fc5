/* One node of the 3-node token ring (ring0.c, ring1.c, ring2.c define NODE
 * and include this; see cosim.h for the links). Node k writes the token to
 * its OUT region (0x20200000: {token, hops}) and rings its doorbell; the
 * co-simulation links node k's OUT to node k+1's IN region (0x20210000) and
 * node k's doorbell to node k+1's IRQ 30 (node 2's to node 0).
 * Each node prints "ring<k> ready\n" at start; node 0 then passes token 1
 * (hops 1). On IRQ 30 a node reads IN, prints "ring<k>: token <t>\n" and
 * passes token t + 1 (hops + 1). Node k only ever gets tokens t with
 * t % 3 == k and hops == t; anything else prints "ring<k>: bad token <t>,
 * hops <h>\n" and exits 1. Node 0 counts laps: at the COSIM_LAPS-th (5th)
 * token it prints "ring0: 5 laps, token 15\n" and exits 0 instead of passing
 * it on. Nodes 1 and 2 never exit by themselves (they sleep in WFI). */
#ifndef RING_H
#define RING_H

#include "cosim.h"

#ifndef NODE
#error "define NODE (0, 1 or 2) before including ring.h"
#endif

#define RING_NODES 3u

static struct ring_region *const ring_out = (struct ring_region *)COSIM_OUT_REGION;
static const struct ring_region *const ring_in = (const struct ring_region *)COSIM_IN_REGION;

static void ring_say(const char *what, uint32_t value)
{
    fw_puts("ring");
    fw_put_dec(NODE);
    fw_puts(what);
    fw_put_dec((int32_t)value);
}

static void pass_token(uint32_t token, uint32_t hops)
{
    ring_out->token = token;
    ring_out->hops = hops;
    cosim_ring_doorbell();
}

/* The previous node rang: the token is in IN. */
void IRQ30_Handler(void)
{
    uint32_t token = ring_in->token;
    uint32_t hops = ring_in->hops;
    ring_say(": token ", token);
    fw_puts("\n");
    if (hops != token || token % RING_NODES != (uint32_t)NODE) {
        ring_say(": bad token ", token);
        fw_puts(", hops ");
        fw_put_dec((int32_t)hops);
        fw_puts("\n");
        fw_exit(1);
    }
#if NODE == 0
    static uint32_t laps;
    if (++laps == COSIM_LAPS) {
        ring_say(": ", laps);
        fw_puts(" laps, token ");
        fw_put_dec((int32_t)token);
        fw_puts("\n");
        fw_exit(0);
    }
#endif
    pass_token(token + 1u, hops + 1u);
}

int main(void)
{
    fw_puts("ring");
    fw_put_dec(NODE);
    fw_puts(" ready\n");
    cosim_enable_doorbell_irq();
#if NODE == 0
    pass_token(1u, 1u);
#endif
    cosim_sleep_forever();
}

#endif
