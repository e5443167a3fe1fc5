/* ucblocks: native Unicorn hooks for basic-block coverage (see ../coverage.py).
 *
 * Built on first use with the host's C compiler (gcc -shared -fPIC -O2); it links
 * against nothing: Python passes the addresses of these functions to uc_hook_add.
 *
 * ucb_block  (UC_HOOK_BLOCK): counts each executed block in an open-addressing hash
 *            table (start -> size, count) and, when edges are on, records the
 *            transition (previous block start -> this block start) in a hash set.
 * ucb_edge   (UC_HOOK_EDGE_GENERATED): first-hit mode, called once per translated
 *            block; records the block (count 0) and the edge that caused it.
 *
 * All table access happens on the emulating thread or while it is parked between
 * slices (the machine's lock): no locking here.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint64_t pc; uint16_t icount; uint16_t size; } uc_tb;

typedef struct { uint64_t key; uint32_t size; uint32_t pad; uint64_t count; uint64_t succ; } ucb_block_t;
/* succ: the successor recorded last from this block (skips the edge set when a block
 * keeps going to the same place, as in every loop iteration) */
typedef struct { uint64_t src; uint64_t dst; } ucb_edge_t;  /* src = block start + 1 */

typedef struct {
    ucb_block_t *blocks; uint64_t bmask; uint64_t bused;
    ucb_edge_t *edges; uint64_t emask; uint64_t eused;
    uint64_t last;       /* start + 1 of the block executed last; 0 = none */
    ucb_block_t *last_slot;  /* its entry (NULL after the table grew) */
    uint32_t edges_on;
    uint32_t oom;        /* an allocation failed: some entries are missing */
} ucb_table_t;

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; return x;
}

ucb_table_t *ucb_new(void) {
    ucb_table_t *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->bmask = 1023; t->emask = 1023;
    t->blocks = calloc(t->bmask + 1, sizeof *t->blocks);
    t->edges = calloc(t->emask + 1, sizeof *t->edges);
    if (!t->blocks || !t->edges) { free(t->blocks); free(t->edges); free(t); return NULL; }
    t->edges_on = 1;
    return t;
}

void ucb_free(ucb_table_t *t) {
    if (!t) return;
    free(t->blocks); free(t->edges); free(t);
}

void ucb_clear(ucb_table_t *t) {
    memset(t->blocks, 0, (t->bmask + 1) * sizeof *t->blocks);
    memset(t->edges, 0, (t->emask + 1) * sizeof *t->edges);
    t->bused = t->eused = 0; t->last = 0; t->last_slot = NULL; t->oom = 0;
}

void ucb_forget_last(ucb_table_t *t) { t->last = 0; t->last_slot = NULL; }
void ucb_set_edges(ucb_table_t *t, uint32_t on) { t->edges_on = on; }

static ucb_block_t *bslot(ucb_block_t *tab, uint64_t mask, uint64_t key) {
    uint64_t i = mix(key) & mask;
    while (tab[i].key && tab[i].key != key) i = (i + 1) & mask;
    return &tab[i];
}

static ucb_edge_t *eslot(ucb_edge_t *tab, uint64_t mask, uint64_t src, uint64_t dst) {
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

static int egrow(ucb_table_t *t) {
    uint64_t nmask = t->emask * 2 + 1;
    ucb_edge_t *n = calloc(nmask + 1, sizeof *n);
    if (!n) return 0;
    for (uint64_t i = 0; i <= t->emask; i++)
        if (t->edges[i].src) *eslot(n, nmask, t->edges[i].src, t->edges[i].dst) = t->edges[i];
    free(t->edges); t->edges = n; t->emask = nmask;
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
    b->key = key; b->size = size; b->count = inc; b->succ = 0; t->bused++;
    return b;
}

static inline void add_edge(ucb_table_t *t, uint64_t src, uint64_t dst) {
    ucb_edge_t *e = eslot(t->edges, t->emask, src, dst);
    if (__builtin_expect(e->src == src, 1)) return;
    if ((t->eused + 1) * 4 > (t->emask + 1) * 3) {
        if (!egrow(t)) { t->oom = 1; return; }
        e = eslot(t->edges, t->emask, src, dst);
    }
    e->src = src; e->dst = dst; t->eused++;
}

/* uc_cb_hookcode_t */
void ucb_block(void *uc, uint64_t address, uint32_t size, void *user_data) {
    ucb_table_t *t = user_data;
    uint64_t key = address + 1;
    ucb_block_t *prev = t->last_slot;
    ucb_block_t *b = add_block(t, key, size, 1);
    if (t->edges_on && t->last) {
        if (t->last_slot != prev) prev = NULL;  /* the table grew: stale pointer */
        if (!prev || prev->succ != key) {
            add_edge(t, t->last, key);
            if (prev) prev->succ = key;
        }
    }
    t->last = key;
    t->last_slot = b;
}

/* uc_hook_edge_gen_t */
void ucb_edge(void *uc, uc_tb *cur, uc_tb *prev, void *user_data) {
    ucb_table_t *t = user_data;
    add_block(t, cur->pc + 1, cur->size, 0);
    if (prev && prev->size) {
        add_block(t, prev->pc + 1, prev->size, 0);
        if (t->edges_on) add_edge(t, prev->pc + 1, cur->pc + 1);
    }
}

/* Copy out: blocks as (start, size, count) triples, edges as (src, dst) pairs. */
uint64_t ucb_nblocks(ucb_table_t *t) { return t->bused; }
uint64_t ucb_nedges(ucb_table_t *t) { return t->eused; }
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

uint64_t ucb_dump_edges(ucb_table_t *t, uint64_t *out, uint64_t max) {
    uint64_t n = 0;
    for (uint64_t i = 0; i <= t->emask && n < max; i++) {
        if (!t->edges[i].src) continue;
        out[2 * n] = t->edges[i].src - 1;
        out[2 * n + 1] = t->edges[i].dst - 1;
        n++;
    }
    return n;
}
