/* Link conventions of the co-simulation test firmware (cosim_*.c, ring*.c).
 *
 * Several nodes run in lock-step quanta of virtual time; the co-simulation
 * exchanges their links at each barrier:
 *   - a doorbell: the 32-bit word COSIM_DOORBELL in the node's own RAM. The
 *     firmware rings it by writing 1; the co-simulation samples it at each
 *     barrier, clears the bits and raises IRQ COSIM_IRQ on the peer (after a
 *     latency). Every write made before ringing is visible to the peer when
 *     its IRQ fires.
 *   - shared memory: 4 KiB regions, mapped on each node at its own address
 *     (COSIM_OUT_REGION, COSIM_IN_REGION, or COSIM_PONG_REGION on pong).
 *     Writes reach the peer at the next barrier. Each word has one writer.
 *   - a serial link: the console UART's TX on one node is the peer's RX.
 *
 * Interrupt-driven programs do their protocol work in the IRQ30 handler and
 * main only sleeps (cosim_sleep_forever): with nothing for main to check
 * there is no window between a check and WFI in which an interrupt could be
 * taken and then slept through. The handler is the "woken" point.
 *
 * mps2-an385 only: RAM is 4 MiB at 0x20000000 there (lm3s6965evb has 64 KiB
 * and netduinoplus2 128 KiB, too small for these addresses). */
#ifndef COSIM_H
#define COSIM_H

#include "fw.h"

#define COSIM_OUT_REGION 0x20200000u /* written by this node, read by the peer */
#define COSIM_IN_REGION 0x20210000u /* written by the peer (ring) */
#define COSIM_PONG_REGION 0x20280000u /* pong's view of ping's region */
#define COSIM_REGION_SIZE 0x1000u
#define COSIM_DOORBELL 0x20220000u
#define COSIM_IRQ 30u
#define COSIM_IRQ_PRIORITY 0x80u

#define COSIM_ROUNDS 100u /* cosim_ping / cosim_pong */
#define COSIM_MESSAGES 10u /* cosim_chatter / cosim_responder */
#define COSIM_LAPS 5u /* ring0 */
#define COSIM_LINE_MAX 32u

#define NVIC_ISER0 REG32(0xE000E100u)
#define NVIC_IPR_BYTE(n) (*(volatile uint8_t *)(uintptr_t)(0xE000E400u + (n)))

/* ping/pong: one region, ping's at COSIM_OUT_REGION, pong's at COSIM_PONG_REGION. */
struct ping_region {
    volatile uint32_t ping; /* written by ping: the round number */
    volatile uint32_t pong; /* written by pong: the ping it answers */
    volatile uint32_t rounds; /* written by ping: COSIM_ROUNDS */
    volatile uint32_t done; /* written by ping: 1 once every round is answered */
};

/* ring: each node's OUT region is the next node's IN region. */
struct ring_region {
    volatile uint32_t token;
    volatile uint32_t hops;
};

/* Ring this node's doorbell; the barrier makes it IRQ 30 on the peer. The
 * dmb orders the shared-memory writes before it (on hardware; an emulator's
 * barrier sees them all anyway). */
static inline void cosim_ring_doorbell(void)
{
    __asm__ volatile("dmb" ::: "memory");
    REG32(COSIM_DOORBELL) = 1u;
}

/* Enable IRQ 30 in the NVIC at COSIM_IRQ_PRIORITY and unmask interrupts. An
 * IRQ already pending (raised before this) is taken right after. */
static inline void cosim_enable_doorbell_irq(void)
{
    NVIC_IPR_BYTE(COSIM_IRQ) = (uint8_t)COSIM_IRQ_PRIORITY;
    NVIC_ISER0 = 1u << COSIM_IRQ;
    __asm__ volatile("cpsie i" ::: "memory");
}

/* Sleep for good; the IRQ handlers do the work (and exit when done). */
static inline void __attribute__((noreturn)) cosim_sleep_forever(void)
{
    for (;;)
        __asm__ volatile("wfi" ::: "memory");
}

/* One line from UART RX (polling), without its '\n', NUL-terminated; bytes
 * past COSIM_LINE_MAX - 1 are dropped (the line still ends at '\n'). */
static inline void cosim_read_line(char line[COSIM_LINE_MAX])
{
    uint32_t n = 0;
    for (;;) {
        int c = uart_getc();
        if (c == '\n')
            break;
        if (n < COSIM_LINE_MAX - 1u)
            line[n++] = (char)c;
    }
    line[n] = '\0';
}

/* 1 when line is exactly text. */
static inline int cosim_line_is(const char *line, const char *text)
{
    while (*text && *line == *text) {
        line++;
        text++;
    }
    return *line == '\0' && *text == '\0';
}

/* 1 when line is prefix followed by 1..9 decimal digits (nothing else); the
 * number goes to *value. */
static inline int cosim_line_number(const char *line, const char *prefix, uint32_t *value)
{
    while (*prefix) {
        if (*line++ != *prefix++)
            return 0;
    }
    uint32_t v = 0, digits = 0;
    for (; *line >= '0' && *line <= '9'; line++, digits++) {
        if (digits == 9)
            return 0;
        v = v * 10u + (uint32_t)(*line - '0');
    }
    if (digits == 0 || *line != '\0')
        return 0;
    *value = v;
    return 1;
}

#endif
