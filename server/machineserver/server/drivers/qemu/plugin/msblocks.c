/*
 * msblocks: a QEMU TCG plugin that counts basic-block executions into a
 * memory-mapped file, for MachineServer's coverage.
 *
 *   qemu-system-arm ... -plugin file=msblocks.so,out=/path/blocks.bin[,entries=N]
 *
 * The file is a fixed-size table, readable at any time by another process
 * (MAP_SHARED: the reader sees the live counts through the page cache):
 *
 *   header (64 bytes, little-endian):
 *     char     magic[8]    "MSBLKS\0\1"
 *     uint32   version     1
 *     uint32   entry_size  24
 *     uint32   capacity    number of entry slots
 *     uint32   flags       bit 0: table full (later blocks are not counted)
 *                          bit 1: QEMU exited cleanly (atexit ran)
 *     uint64   used        entries filled; stored with release semantics
 *                          *after* the entry is complete
 *     uint64   reserved[4]
 *   entries[capacity], 24 bytes each:
 *     uint64   vaddr       guest address of the block's first instruction
 *     uint32   size        bytes from the first instruction to the end of the last
 *     uint32   pad
 *     uint64   count       executions, bumped by an inline TCG add (no callback)
 *
 * One entry per *translation*: a block translated again (after a TB flush, a
 * breakpoint change, a single step...) gets a new entry with the same vaddr,
 * and the reader sums them.
 *
 * QEMU (Debian's 7.2) ships no qemu-plugin.h, so the few API functions used
 * here are declared below, matching QEMU 7.2's include/qemu/qemu-plugin.h
 * (QEMU_PLUGIN_VERSION 1).
 *
 * Build: gcc -shared -fPIC -O2 -o msblocks.so msblocks.c
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---------------------------------------------------------------- QEMU 7.2 plugin API */
#define QEMU_PLUGIN_EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t; /* only passed through by pointer */
struct qemu_plugin_tb;
struct qemu_plugin_insn;

enum qemu_plugin_op {
    QEMU_PLUGIN_INLINE_ADD_U64, /* = 0, the only op in 7.2 */
};

typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);

QEMU_PLUGIN_EXPORT int qemu_plugin_version = 1;

/* ---------------------------------------------------------------- the table */
#define MS_MAGIC "MSBLKS\0\1"
#define MS_VERSION 1
#define MS_FLAG_FULL 1u
#define MS_FLAG_EXITED 2u
#define MS_DEFAULT_ENTRIES 262144u /* 6 MiB, sparse until used */
#define MS_MAX_ENTRIES (1u << 24)

struct ms_header {
    char magic[8];
    uint32_t version;
    uint32_t entry_size;
    uint32_t capacity;
    uint32_t flags;
    uint64_t used;
    uint64_t reserved[4];
};

struct ms_entry {
    uint64_t vaddr;
    uint32_t size;
    uint32_t pad;
    uint64_t count;
};

_Static_assert(sizeof(struct ms_header) == 64, "header layout");
_Static_assert(sizeof(struct ms_entry) == 24, "entry layout");

static struct ms_header *hdr;
static struct ms_entry *entries;
static uint32_t capacity;
static size_t map_size;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    uint64_t start = qemu_plugin_tb_vaddr(tb);
    uint64_t end = start;
    if (n > 0) {
        struct qemu_plugin_insn *last = qemu_plugin_tb_get_insn(tb, n - 1);
        end = qemu_plugin_insn_vaddr(last) + qemu_plugin_insn_size(last);
    }
    uint64_t size = end > start ? end - start : 0;

    pthread_mutex_lock(&lock);
    uint64_t used = hdr->used;
    if (used >= capacity) {
        __atomic_or_fetch(&hdr->flags, MS_FLAG_FULL, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&lock);
        return;
    }
    struct ms_entry *e = &entries[used];
    e->vaddr = start;
    e->size = size > UINT32_MAX ? UINT32_MAX : (uint32_t)size;
    e->pad = 0;
    e->count = 0;
    /* publish: a reader that sees used+1 sees the whole entry */
    __atomic_store_n(&hdr->used, used + 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lock);

    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &e->count, 1);
}

static void at_exit(qemu_plugin_id_t id, void *userdata)
{
    (void)id;
    (void)userdata;
    __atomic_or_fetch(&hdr->flags, MS_FLAG_EXITED, __ATOMIC_RELEASE);
    msync(hdr, map_size, MS_ASYNC);
    /* no munmap: translated code may still point into the table */
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    (void)info;
    const char *out = NULL;
    unsigned long n_entries = MS_DEFAULT_ENTRIES;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out = argv[i] + 4;
        } else if (strncmp(argv[i], "entries=", 8) == 0) {
            char *endp;
            n_entries = strtoul(argv[i] + 8, &endp, 0);
            if (*endp || n_entries == 0 || n_entries > MS_MAX_ENTRIES) {
                fprintf(stderr, "msblocks: bad entries=%s (1..%u)\n", argv[i] + 8,
                        MS_MAX_ENTRIES);
                return -1;
            }
        } else {
            fprintf(stderr, "msblocks: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    if (out == NULL || !*out) {
        fprintf(stderr, "msblocks: missing out=FILE\n");
        return -1;
    }
    capacity = (uint32_t)n_entries;
    map_size = sizeof(struct ms_header) + (size_t)capacity * sizeof(struct ms_entry);

    int fd = open(out, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "msblocks: cannot create %s: %s\n", out, strerror(errno));
        return -1;
    }
    if (ftruncate(fd, (off_t)map_size) != 0) {
        fprintf(stderr, "msblocks: cannot size %s: %s\n", out, strerror(errno));
        close(fd);
        return -1;
    }
    void *p = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        fprintf(stderr, "msblocks: cannot map %s: %s\n", out, strerror(errno));
        return -1;
    }
    hdr = p;
    entries = (struct ms_entry *)((char *)p + sizeof(struct ms_header));
    hdr->version = MS_VERSION;
    hdr->entry_size = sizeof(struct ms_entry);
    hdr->capacity = capacity;
    hdr->flags = 0;
    hdr->used = 0;
    /* the magic last: a reader that sees it sees a valid header */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(hdr->magic, MS_MAGIC, 8);

    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
