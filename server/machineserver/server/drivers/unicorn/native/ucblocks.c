/* ucblocks: native Unicorn hooks for basic-block coverage (see ../collector.py).
 *
 * Built on first use with the host's C compiler (gcc -shared -fPIC -O2); it links
 * against nothing: Python passes the addresses of these functions to uc_hook_add.
 *
 * ucb_block  (UC_HOOK_BLOCK): counts each entry into a translated block in an
 *            open-addressing hash table (start -> size, count) and, when edges are on,
 *            counts the transition (previous block start -> this block start) in a
 *            second one. A per-block "last successor" cache (the successor and the
 *            index of its edge entry) makes a repeated transition (every loop
 *            iteration) one compare and one add.
 * ucb_stop   called by the driver after every emulation slice with the pc it stopped
 *            at: "the machine halted at pc has not executed pc". Unicorn fires the
 *            block hook before the block's exit-request check, so a slice that ends at
 *            a block's start has counted an entry that ran nothing, and a slice that
 *            ends in the middle of a block (an instruction count, a breakpoint, an
 *            MMIO access that is restarted, a fault, a semihosting exit) has counted the
 *            whole block. The stop is recorded as a *cut* (block, pc): that entry ran
 *            [start, pc) only; the rest, if it runs later, is a new block starting at
 *            pc. A pc outside the last block means the block ran to its end and control
 *            passed to pc before the next block's hook: that transition is counted
 *            here. Either way the next block does not follow the last one.
 * ucb_edge   (UC_HOOK_EDGE_GENERATED): first-hit mode, called once per translated
 *            block; records the block (count 0) and the edge that caused it (count 0).
 *
 * The trace tail: ucb_block (not ucb_block_untraced) also stores each entry's block start in a ring of the last
 * UCB_TRACE_MAX entries (one store and one masked add per block). ucb_stop takes back
 * an entry that ran nothing (the slice stopped at the block's start: it is entered
 * again, and recorded again, when the machine goes on); ucb_trace copies the ring out,
 * oldest first. First-hit mode keeps no trace (no per-entry hook).
 *
 * All table access happens on the emulating thread or while it is parked between
 * slices (the machine's lock): no locking here.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint64_t pc; uint16_t icount; uint16_t size; } uc_tb;

typedef struct {
    uint64_t key;        /* block start + 1 (0: free slot) */
    uint32_t size;
    uint32_t pad;
    uint64_t count;      /* entries */
    uint64_t succ;       /* key of the successor counted last from this block (0: none) */
    uint64_t succ_edge;  /* index of that edge's entry (valid while succ != 0) */
} ucb_block_t;

/* edges: (src block key, dst block key) -> count; cuts: (block key, pc + 1) -> count */
typedef struct { uint64_t src; uint64_t dst; uint64_t count; } ucb_pair_t;

typedef struct {
    ucb_pair_t *slots; uint64_t mask; uint64_t used;
} ucb_pairs_t;

#define UCB_TRACE_MAX 4096u /* drivers.base.TRACE_TAIL_MAX */
/* one slot more than is ever reported: an entry taken back at a slice end (ucb_stop)
 * leaves UCB_TRACE_MAX behind it once the ring has filled */
#define UCB_TRACE_SLOTS (UCB_TRACE_MAX + 1)

typedef struct {
    ucb_block_t *blocks; uint64_t bmask; uint64_t bused;
    ucb_pairs_t edges;
    ucb_pairs_t cuts;
    uint64_t last;           /* key of the block entered last; 0 = none */
    ucb_block_t *last_slot;  /* its entry (NULL after the table grew) */
    uint32_t edges_on;
    uint32_t oom;            /* an allocation failed: some entries are missing */
    uint32_t trace_head;     /* the ring's next slot */
    uint32_t trace_len;      /* entries held (<= UCB_TRACE_SLOTS) */
    uint64_t trace[UCB_TRACE_SLOTS];  /* block starts, the last entered before trace_head */
} ucb_table_t;

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; return x;
}

static int pairs_init(ucb_pairs_t *p) {
    p->mask = 1023; p->used = 0;
    p->slots = calloc(p->mask + 1, sizeof *p->slots);
    return p->slots != NULL;
}

ucb_table_t *ucb_new(void) {
    ucb_table_t *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->bmask = 1023;
    t->blocks = calloc(t->bmask + 1, sizeof *t->blocks);
    int ok = t->blocks != NULL;
    ok = pairs_init(&t->edges) && ok;
    ok = pairs_init(&t->cuts) && ok;
    if (!ok) {
        free(t->blocks); free(t->edges.slots); free(t->cuts.slots); free(t);
        return NULL;
    }
    t->edges_on = 1;
    return t;
}

void ucb_free(ucb_table_t *t) {
    if (!t) return;
    free(t->blocks); free(t->edges.slots); free(t->cuts.slots); free(t);
}

void ucb_clear(ucb_table_t *t) {
    memset(t->blocks, 0, (t->bmask + 1) * sizeof *t->blocks);
    memset(t->edges.slots, 0, (t->edges.mask + 1) * sizeof *t->edges.slots);
    memset(t->cuts.slots, 0, (t->cuts.mask + 1) * sizeof *t->cuts.slots);
    t->bused = t->edges.used = t->cuts.used = 0;
    t->last = 0; t->last_slot = NULL; t->oom = 0;
    t->trace_head = t->trace_len = 0;
}

void ucb_forget_last(ucb_table_t *t) { t->last = 0; t->last_slot = NULL; }
void ucb_set_edges(ucb_table_t *t, uint32_t on) { t->edges_on = on; }

static ucb_block_t *bslot(ucb_block_t *tab, uint64_t mask, uint64_t key) {
    uint64_t i = mix(key) & mask;
    while (tab[i].key && tab[i].key != key) i = (i + 1) & mask;
    return &tab[i];
}

static ucb_pair_t *pslot(ucb_pair_t *tab, uint64_t mask, uint64_t src, uint64_t dst) {
    uint64_t i = mix(src * 31 + dst) & mask;
    while (tab[i].src && (tab[i].src != src || tab[i].dst != dst)) i = (i + 1) & mask;
    return &tab[i];
}

static int bgrow(ucb_table_t *t) {
    uint64_t nmask = t->bmask * 2 + 1;
    ucb_block_t *n = calloc(nmask + 1, sizeof *n);
    if (!n) return 0;
    for (uint64_t i = 0; i <= t->bmask; i++)
        if (t->blocks[i].key) *bslot(n, nmask, t->blocks[i].key) = t->blocks[i];
    free(t->blocks); t->blocks = n; t->bmask = nmask; t->last_slot = NULL;
    return 1;
}

static int pgrow(ucb_pairs_t *p) {
    uint64_t nmask = p->mask * 2 + 1;
    ucb_pair_t *n = calloc(nmask + 1, sizeof *n);
    if (!n) return 0;
    for (uint64_t i = 0; i <= p->mask; i++)
        if (p->slots[i].src) *pslot(n, nmask, p->slots[i].src, p->slots[i].dst) = p->slots[i];
    free(p->slots); p->slots = n; p->mask = nmask;
    return 1;
}

static inline ucb_block_t *add_block(ucb_table_t *t, uint64_t key, uint32_t size, uint64_t inc) {
    ucb_block_t *b = bslot(t->blocks, t->bmask, key);
    if (__builtin_expect(b->key == key, 1)) {
        b->count += inc;
        if (size > b->size) b->size = size;
        return b;
    }
    if ((t->bused + 1) * 4 > (t->bmask + 1) * 3) {  /* keep the load under 3/4 */
        if (!bgrow(t)) { t->oom = 1; return NULL; }
        b = bslot(t->blocks, t->bmask, key);
    }
    b->key = key; b->size = size; b->count = inc; b->succ = 0; b->succ_edge = 0; t->bused++;
    return b;
}

/* the entry for (src, dst), created with count 0; NULL when out of memory */
static ucb_pair_t *add_pair(ucb_table_t *t, ucb_pairs_t *p, uint64_t src, uint64_t dst, int *grew) {
    ucb_pair_t *e = pslot(p->slots, p->mask, src, dst);
    if (__builtin_expect(e->src == src, 1)) return e;
    if ((p->used + 1) * 4 > (p->mask + 1) * 3) {
        if (!pgrow(p)) { t->oom = 1; return NULL; }
        *grew = 1;
        e = pslot(p->slots, p->mask, src, dst);
    }
    e->src = src; e->dst = dst; e->count = 0; p->used++;
    return e;
}

/* count one transition src -> dst; `from` is src's block entry when known (its cache) */
static inline void count_edge(ucb_table_t *t, ucb_block_t *from, uint64_t src, uint64_t dst) {
    if (from && from->succ == dst) {
        t->edges.slots[from->succ_edge].count++;
        return;
    }
    int grew = 0;
    ucb_pair_t *e = add_pair(t, &t->edges, src, dst, &grew);
    if (!e) return;
    e->count++;
    if (grew) {  /* every cached edge index moved */
        for (uint64_t i = 0; i <= t->bmask; i++) t->blocks[i].succ = 0;
    }
    if (from) { from->succ = dst; from->succ_edge = (uint64_t)(e - t->edges.slots); }
}

static inline void block_entered(ucb_table_t *t, uint64_t address, uint32_t size, int trace) {
    uint64_t key = address + 1;
    ucb_block_t *prev = t->last_slot;
    ucb_block_t *b = add_block(t, key, size, 1);
    if (trace) {
        t->trace[t->trace_head] = address;
        if (++t->trace_head == UCB_TRACE_SLOTS) t->trace_head = 0;
        t->trace_len += t->trace_len < UCB_TRACE_SLOTS;
    }
    if (t->edges_on && t->last) {
        if (t->last_slot != prev) prev = NULL;  /* the table grew: stale pointer */
        count_edge(t, prev, t->last, key);
    }
    t->last = key;
    t->last_slot = b;
}

/* uc_cb_hookcode_t: counts and the trace ring */
void ucb_block(void *uc, uint64_t address, uint32_t size, void *user_data) {
    (void)uc;
    block_entered(user_data, address, size, 1);
}

/* uc_cb_hookcode_t: counts only (no trace: MachineOptions.extra coverage_trace=off) */
void ucb_block_untraced(void *uc, uint64_t address, uint32_t size, void *user_data) {
    (void)uc;
    block_entered(user_data, address, size, 0);
}

/* after every slice: the machine stopped at pc, which has not run (see the top) */
void ucb_stop(ucb_table_t *t, uint64_t pc) {
    uint64_t last = t->last;
    t->last = 0;
    t->last_slot = NULL;
    if (!last) return;
    ucb_block_t *b = bslot(t->blocks, t->bmask, last);
    if (b->key != last) return;  /* lost to an allocation failure */
    uint64_t start = last - 1;
    if (pc == start && t->trace_len) {
        /* the entry ran nothing: not in the trace (it is recorded when it runs) */
        uint32_t prev = t->trace_head ? t->trace_head - 1 : UCB_TRACE_SLOTS - 1;
        if (t->trace[prev] == start) {
            t->trace_head = prev;
            t->trace_len--;
        }
    }
    if (pc >= start && pc < start + b->size) {
        int grew = 0;
        ucb_pair_t *c = add_pair(t, &t->cuts, last, pc + 1, &grew);
        if (c) c->count++;
    } else if (t->edges_on) {
        count_edge(t, NULL, last, pc + 1);
    }
}

/* uc_hook_edge_gen_t */
void ucb_edge(void *uc, uc_tb *cur, uc_tb *prev, void *user_data) {
    (void)uc;
    ucb_table_t *t = user_data;
    add_block(t, cur->pc + 1, cur->size, 0);
    if (prev && prev->size) {
        add_block(t, prev->pc + 1, prev->size, 0);
        if (t->edges_on) {
            int grew = 0;
            ucb_pair_t *e = add_pair(t, &t->edges, prev->pc + 1, cur->pc + 1, &grew);
            if (e && grew) {
                for (uint64_t i = 0; i <= t->bmask; i++) t->blocks[i].succ = 0;
            }
        }
    }
}

/* Copy out: blocks as (start, size, count), edges as (src, dst, count), cuts as
 * (block start, pc, count) triples. */
uint64_t ucb_nblocks(ucb_table_t *t) { return t->bused; }
uint64_t ucb_nedges(ucb_table_t *t) { return t->edges.used; }
uint64_t ucb_ncuts(ucb_table_t *t) { return t->cuts.used; }
uint32_t ucb_oom(ucb_table_t *t) { return t->oom; }

uint64_t ucb_dump_blocks(ucb_table_t *t, uint64_t *out, uint64_t max) {
    uint64_t n = 0;
    for (uint64_t i = 0; i <= t->bmask && n < max; i++) {
        if (!t->blocks[i].key) continue;
        out[3 * n] = t->blocks[i].key - 1;
        out[3 * n + 1] = t->blocks[i].size;
        out[3 * n + 2] = t->blocks[i].count;
        n++;
    }
    return n;
}

static uint64_t dump_pairs(const ucb_pairs_t *p, uint64_t *out, uint64_t max) {
    uint64_t n = 0;
    for (uint64_t i = 0; i <= p->mask && n < max; i++) {
        if (!p->slots[i].src) continue;
        out[3 * n] = p->slots[i].src - 1;
        out[3 * n + 1] = p->slots[i].dst - 1;
        out[3 * n + 2] = p->slots[i].count;
        n++;
    }
    return n;
}

uint64_t ucb_dump_edges(ucb_table_t *t, uint64_t *out, uint64_t max) {
    return dump_pairs(&t->edges, out, max);
}

uint64_t ucb_dump_cuts(ucb_table_t *t, uint64_t *out, uint64_t max) {
    return dump_pairs(&t->cuts, out, max);
}

/* the last min(max, held) block starts of the trace ring, oldest first */
uint64_t ucb_trace(ucb_table_t *t, uint64_t *out, uint64_t max) {
    if (max > UCB_TRACE_MAX) max = UCB_TRACE_MAX;
    uint64_t n = t->trace_len < max ? t->trace_len : max;
    uint64_t at = (t->trace_head + UCB_TRACE_SLOTS - n) % UCB_TRACE_SLOTS;
    for (uint64_t i = 0; i < n; i++) {
        out[i] = t->trace[at];
        if (++at == UCB_TRACE_SLOTS) at = 0;
    }
    return n;
}

/* ---------------------------------------------------------------------------------
 * ucb_count: the exact instruction counter of a machine (see ../blockcount.py).
 *
 * One UC_HOOK_BLOCK callback per engine, always on. Each entry into a translated
 * block adds the block's instruction count, decoded once from guest code (read with
 * the engine's own uc_mem_read, passed in as a pointer) and kept in a small
 * direct-mapped cache keyed by (start, size); the cache is dropped at every slice end
 * (a generation number), so code written between slices is decoded again. Thumb: a
 * halfword whose top five bits are 0b11101, 0b11110 or 0b11111 starts a 32-bit
 * instruction; RISC-V: low two bits 0b11 is 32-bit, anything else a 16-bit one.
 *
 * Slice ends (ucbc_stop, with the pc the machine stopped at, not executed): a pc inside
 * the block entered last means that entry ran [start, pc) only, so the instructions
 * from pc to the block's end are taken back. Every stop must be synchronous for that
 * to be exact (a stop requested from another thread between a block's hook and its
 * start would leave a block that looped to itself indistinguishable from one that ran
 * nothing), so the watchdog does not call uc_emu_stop: it sets stop_wanted, and the
 * next block entry's hook stops the engine itself, before that block runs anything.
 *
 * When coverage collects in counting mode its table rides on this hook (cov): one
 * block hook serves both.
 */
typedef int (*ucb_mem_read_t)(void *uc, uint64_t address, void *bytes, uint64_t size);
typedef int (*ucb_emu_stop_t)(void *uc);

#define UCBC_CACHE 1024u

typedef struct { uint64_t start; uint16_t size; uint16_t n; uint32_t gen; } ucbc_entry_t;

typedef struct {
    uint64_t insns;          /* instructions executed, all slices */
    uint64_t cur_start;      /* the block entered last in this slice */
    uint32_t cur_size;
    uint32_t cur_n;          /* its instructions, 0: none entered since the last stop */
    uint32_t gen;            /* cache generation (0 is never valid) */
    uint32_t thumb;
    volatile uint32_t stop_wanted;  /* set by the watchdog thread */
    uint32_t undecoded;      /* blocks whose code could not be read (counted as size / 2) */
    ucb_mem_read_t mem_read;
    ucb_emu_stop_t emu_stop;
    ucb_table_t *cov;        /* coverage table fed by this hook, NULL: none */
    uint32_t cov_traced;
    uint32_t pad;
    ucbc_entry_t cache[UCBC_CACHE];
} ucbc_t;

ucbc_t *ucbc_new(uint32_t thumb, void *mem_read, void *emu_stop) {
    ucbc_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->thumb = thumb; c->gen = 1;
    c->mem_read = (ucb_mem_read_t)mem_read;
    c->emu_stop = (ucb_emu_stop_t)emu_stop;
    return c;
}

void ucbc_free(ucbc_t *c) { free(c); }

static uint32_t decode_count(const uint8_t *code, uint64_t len, uint32_t thumb) {
    uint32_t n = 0;
    for (uint64_t pos = 0; pos < len; n++) {
        uint32_t h = code[pos] | (pos + 1 < len ? (uint32_t)code[pos + 1] << 8 : 0u);
        int wide = thumb ? (h >> 11) >= 0x1D : (h & 3) == 3;
        pos += wide ? 4 : 2;
    }
    return n;
}

/* instructions starting in [start, start + len) */
static uint32_t insns_in(ucbc_t *c, void *uc, uint64_t start, uint64_t len) {
    uint8_t buf[4096];
    if (len == 0) return 0;
    if (len <= sizeof buf && c->mem_read(uc, start, buf, len) == 0)
        return decode_count(buf, len, c->thumb);
    c->undecoded++;
    return (uint32_t)((len + 1) / 2);
}

void ucbc_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    ucbc_t *c = user_data;
    if (__builtin_expect(c->stop_wanted, 0)) {
        c->stop_wanted = 0;
        c->emu_stop(uc);  /* this entry runs nothing: ucbc_stop sees pc == its start */
    }
    ucbc_entry_t *e = &c->cache[((address >> 1) ^ (address >> 11)) & (UCBC_CACHE - 1)];
    uint32_t n;
    if (__builtin_expect(e->start == address && e->size == size && e->gen == c->gen, 1)) {
        n = e->n;
    } else {
        n = insns_in(c, uc, address, size);
        e->start = address; e->size = (uint16_t)size; e->n = (uint16_t)n; e->gen = c->gen;
    }
    c->insns += n;
    c->cur_start = address; c->cur_size = size; c->cur_n = n;
    if (c->cov) block_entered(c->cov, address, size, (int)c->cov_traced);
}

/* after every emu_start: the machine stopped at pc, which has not run */
void ucbc_stop(ucbc_t *c, void *uc, uint64_t pc) {
    if (c->cur_n && pc >= c->cur_start && pc < c->cur_start + c->cur_size)
        c->insns -= c->cur_n - insns_in(c, uc, c->cur_start, pc - c->cur_start);
    c->cur_n = 0;
    c->stop_wanted = 0;
    if (++c->gen == 0) c->gen = 1;
}

void ucbc_want_stop(ucbc_t *c) { c->stop_wanted = 1; }
void ucbc_forget(ucbc_t *c) { c->cur_n = 0; c->stop_wanted = 0; }
uint64_t ucbc_insns(ucbc_t *c) { return c->insns; }
uint32_t ucbc_undecoded(ucbc_t *c) { return c->undecoded; }
void ucbc_set_coverage(ucbc_t *c, ucb_table_t *t, uint32_t traced) { c->cov = t; c->cov_traced = traced; }
