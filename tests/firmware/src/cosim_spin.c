/* cosim_spin: a compute-bound co-simulation node, for the co-simulation figures
 * in scripts/bench (scripts/lib/bench_cosim.py); two of them run side by side
 * (see cosim.h for the links).
 * Bitwise CRC-32 (as crc32.c) over a 1 KiB LCG-filled buffer, round after
 * round. After every block of SPIN_BLOCK_BYTES (64) bytes (~3,000
 * instructions) it publishes {blocks, crc} in its OUT region (0x20200000),
 * and after every SPIN_BELL_EVERY-th (4th) block it rings its doorbell. Its
 * IRQ 30 handler (the peer's doorbell) counts the bells and reads the peer's
 * progress from its IN region (0x20210000), where it must never go backwards
 * (else "spin: peer went back from <a> to <b>\n", exit 1).
 * Every spin_mark_every blocks (a variable in RAM, 1024 unless a debugger
 * writes another value before the run; 0: never) it calls spin_mark(), a
 * function that does nothing: a breakpoint on it is hit mid-quantum after a
 * chosen stretch of virtual time.
 * Prints "spin ready\n" at start and, after SPIN_BLOCKS (131072) blocks (about
 * 400 million instructions), "spin: 131072 blocks, crc <hex>, bells <n>\n",
 * then exits 0. Alone (nothing linked) it prints "bells 0". */
#include "cosim.h"

#define SPIN_BUF_LEN 1024u
#define SPIN_BLOCK_BYTES 64u
#define SPIN_BELL_EVERY 4u
#define SPIN_BLOCKS 131072u

struct spin_region {
    volatile uint32_t blocks; /* blocks done */
    volatile uint32_t crc; /* the running CRC after them */
};

static struct spin_region *const spin_out = (struct spin_region *)COSIM_OUT_REGION;
static const struct spin_region *const spin_in = (const struct spin_region *)COSIM_IN_REGION;

static uint8_t buf[SPIN_BUF_LEN];
static volatile uint32_t bells;
static volatile uint32_t peer_blocks;
volatile uint32_t spin_mark_every = 1024u;
static volatile uint32_t marks;

/* A place for a breakpoint (see above). */
void __attribute__((noinline)) spin_mark(void)
{
    marks++;
}

static void fill(void)
{
    uint32_t x = 1;
    for (uint32_t i = 0; i < SPIN_BUF_LEN; i++) {
        x = x * 1103515245u + 12345u;
        buf[i] = (uint8_t)(x >> 16);
    }
}

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, uint32_t n)
{
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return crc;
}

/* The peer rang: its progress is in IN. */
void IRQ30_Handler(void)
{
    uint32_t seen = spin_in->blocks;
    if (seen < peer_blocks) {
        fw_puts("spin: peer went back from ");
        fw_put_dec((int32_t)peer_blocks);
        fw_puts(" to ");
        fw_put_dec((int32_t)seen);
        fw_puts("\n");
        fw_exit(1);
    }
    peer_blocks = seen;
    bells++;
}

int main(void)
{
    fw_puts("spin ready\n");
    fill();
    cosim_enable_doorbell_irq();
    uint32_t crc = 0xFFFFFFFFu;
    for (uint32_t block = 1; block <= SPIN_BLOCKS; block++) {
        uint32_t at = ((block - 1u) * SPIN_BLOCK_BYTES) % SPIN_BUF_LEN;
        crc = crc32_update(crc, buf + at, SPIN_BLOCK_BYTES);
        spin_out->crc = crc;
        spin_out->blocks = block;
        if (block % SPIN_BELL_EVERY == 0u)
            cosim_ring_doorbell();
        uint32_t every = spin_mark_every;
        if (every != 0u && block % every == 0u)
            spin_mark();
    }
    fw_puts("spin: ");
    fw_put_dec((int32_t)SPIN_BLOCKS);
    fw_puts(" blocks, crc ");
    fw_put_hex32(crc ^ 0xFFFFFFFFu);
    fw_puts(", bells ");
    fw_put_dec((int32_t)bells);
    fw_puts("\n");
    return 0;
}
