/*
 * msplugin: the QEMU TCG plugin that every QEMU of MachineServer's QEMU driver
 * loads. Two independent parts, each enabled by its arguments:
 *
 *   qemu-system-arm ... -plugin file=msplugin.so[,out=BLOCKS][,entries=N][,trace=RING]
 *                                  [,gate=CTL,notify=FIFO,release=FIFO][,always=on]
 *                                  [,command=FIFO][,watched=FILE][,count=block|insn|off]
 *
 * 1. Coverage (out=BLOCKS): a table of translated blocks with execution counts
 *    in a memory-mapped file, readable at any time by another process.
 *
 *      header (64 bytes, little-endian):
 *        char     magic[8]    "MSBLKS\0\1"
 *        uint32   version     1
 *        uint32   entry_size  24
 *        uint32   capacity    number of entry slots
 *        uint32   flags       bit 0: table full (later blocks are not counted)
 *                             bit 1: QEMU exited cleanly (atexit ran)
 *        uint64   used        entries filled; stored with release semantics
 *                             *after* the entry is complete
 *        uint64   reserved[4]
 *      entries[capacity], 24 bytes each:
 *        uint64   vaddr       guest address of the block's first instruction
 *        uint32   size        bytes from the first instruction to the end of the last
 *        uint32   pad
 *        uint64   count       executions, bumped by an inline TCG add (no callback)
 *
 *    One entry per *translation*: a block translated again (after a flush, a
 *    single step, as single instructions on a page with a breakpoint...) gets a new
 *    entry with the same vaddr, and its size may differ; the reader sums entries of
 *    the same vaddr and size (blocktable.py). The inline add runs after the block's
 *    exit-request check (QEMU emits that first), so a block left before it runs (a
 *    pause, a gate hold) is not counted; one left in its middle (a fault, a
 *    watchpoint hit, an MMIO access under icount) is counted whole.
 *
 *    The trace tail (trace=RING, with out=): the start address of every block
 *    executed, in a ring of the last TRACE_CAPACITY in a memory-mapped file. A
 *    callback at each block's start (it sits where the inline add does, so the
 *    same blocks are recorded as counted) stores the address and then bumps
 *    `written` with release semantics: the slot of entry n is ring[n % capacity].
 *
 *      header (64 bytes, little-endian):
 *        char     magic[8]    "MSTRACE\1"
 *        uint32   version     1
 *        uint32   capacity    TRACE_CAPACITY (4096; a power of two)
 *        uint64   written     entries written so far
 *        uint64   reserved[5]
 *      uint64     ring[capacity]
 *
 * 2. The instruction gate (gate=CTL): counts executed instructions and holds
 *    the vCPU at a count, for counted runs ("step 10^9 instructions" as one
 *    continue) and, later, co-simulation barriers; and holds it at semihosting
 *    trap sites. CTL is a memory-mapped control page shared with the driver:
 *
 *      offset  field      written by  meaning
 *        0     magic[8]   plugin      "MSGATE\0\1"
 *        8     version    plugin      uint32, 1
 *       12     flags      plugin      uint32, bit 0: GATE_EXACT_STOP (see below)
 *                                             bit 1: GATE_ALWAYS (always=on)
 *       16     executed   plugin      uint64, instructions executed while counting
 *       24     limit      driver      uint64, hold once `executed` passes it
 *                                     (UINT64_MAX: never)
 *       32     request    driver      uint64, bumped to ask for a new `armed`
 *       40     applied    plugin      uint64, the last request applied
 *       48     armed      driver      uint32, 1: count (register the callbacks)
 *       52     holding    plugin      uint32, 1 while the vCPU is held
 *       56     holds      plugin      uint64, holds so far (counts and traps)
 *       64     ntraps     driver      uint32, trap sites in use (<= 496)
 *       72     pending    plugin      uint64, the trap site of the last trap hold
 *                                     (UINT64_MAX: none; the driver clears it)
 *       80     pass       driver      uint64, a trap site not to hold at (the
 *                                     driver steps over it; UINT64_MAX: none)
 *       88     deadline   driver      uint64, lock-step: stop the VM when the
 *                                     virtual clock reaches it, ns (UINT64_MAX: none)
 *       96     vclock     plugin      uint64, the virtual clock (ns) at the last
 *                                     VM stop
 *      104     stops      plugin      uint64, VM stops so far (bumped after vclock)
 *      112     reached    plugin      uint64, deadlines reached so far
 *      120     idle       plugin      uint32, 1: the vCPU slept (WFI, nothing
 *                                     pending) when the last deadline was reached
 *      124     nbreaks    driver      uint32, breakpoint sites after the trap sites
 *      128     traps[]    driver      uint64 each, the trap sites' addresses, then
 *                                     the breakpoint sites' (lock-step)
 *     3840     irqs[16]   driver      uint32 each, interrupt lines to set pending
 *     3904     commands   plugin      uint64, barrier commands carried out
 *     3912     command_error plugin   uint32, 1: no NVIC for the interrupts
 *     3916     nwatch     driver      uint32, lock-step watchpoints in use (<= 8)
 *     3920     hit_*      plugin      watched address, pc, access; hit (uint32 at 3940)
 *     3944     watch[8]   driver      address (uint64), size, access bits (uint32)
 *     4072     stop_icount plugin     uint64, QEMU's instruction count (icount) at the
 *                                     last VM stop (flag GATE_STOP_RECORD)
 *     4080     stop_pc    plugin      uint64, the pc at the last VM stop (same flag)
 *     4088     total      plugin      uint64, instructions executed since QEMU started
 *                                     (flag GATE_TOTAL; count=, see below)
 *
 *    The total (count=block, the default; flag GATE_TOTAL): every translated block
 *    adds its instruction count to `total` when it starts, an inline add (no
 *    callback), always, whether the gate is armed or not, so the driver reads an
 *    instruction count at any moment, also while QEMU runs. Like the coverage
 *    table's count, the add runs after the block's exit-request check: a block left
 *    before it runs is not counted; one that an exception leaves mid-way (a fault, a
 *    watchpoint hit) is counted whole. count=insn adds 1 before each instruction
 *    instead: exact there too (the faulting instruction is counted), but it costs
 *    ~+30-80 % run time on a tight loop where count=block costs ~0 (scripts/bench
 *    counts); count=off: no total.
 *
 *    Counting: while armed, each translated block gets a callback at its start
 *    (which counts its first instruction and checks the limit) and an inline
 *    add of 1 before each further instruction, so `executed` is exact even when
 *    a block is left early (a fault, an I/O recompile under icount).
 *
 *    Holding at a count: when a block starts with executed + its size > limit,
 *    the plugin asks QEMU to leave the execution loop after that block
 *    (qemu_plugin_reset, which also flushes the translations) and, in the reset
 *    callback, i.e. outside translated code at a block boundary, holds the vCPU:
 *    it writes one byte to the notify FIFO and waits. It goes on when
 *      - the driver writes 'g' to the release FIFO (go on running), or
 *      - the VM is no longer running: the driver sent the gdbstub a ^C, whose
 *        vm_stop has set the run state before it waits for the vCPU. Once
 *        released, the vCPU thread sees the stopped run state and stops without
 *        running another block, so the VM stops exactly at the hold.
 *    The plugin API has no way to see the run state; this needs QEMU's own
 *    runstate_is_running() (bool(void), exported by Debian's QEMU, looked up
 *    with dlsym). Without it there is no gate (the page never gets its magic:
 *    releasing on the driver's word alone could let the vCPU run on before the
 *    main loop has taken the ^C).
 *
 *    Holding before a trap site: the driver lists the semihosting trap sites of
 *    the loaded image. When QEMU translates a block whose instruction at a
 *    listed site is a trap instruction (so it is code, about to run; a trap
 *    ends its block), the plugin asks QEMU to leave the execution loop
 *    (qemu_plugin_reset: the request is set at once, on this vCPU), records the
 *    site in `pending`, and holds the vCPU right there, in the translation,
 *    until the driver's ^C has stopped the VM. The block then starts, sees the
 *    exit request in its prologue and leaves without running an instruction:
 *    the VM stops at the block's start, before the trap, and the driver steps
 *    up to the site. Translations are flushed by the reset, so the next call
 *    translates the block again and is caught again. (A gdbstub breakpoint at
 *    the site would do the same, but QEMU 7.2 runs every block on a
 *    breakpoint's page one instruction at a time: 30-70x slower code there.)
 *
 *    Lock-step deadlines (flag GATE_LOCKSTEP; with -icount, for co-simulation):
 *    the plugin owns one QEMU_CLOCK_VIRTUAL timer. A VM change-state handler
 *    sets it to `deadline` each time the VM starts running (before the vCPU
 *    runs) and records the virtual clock in `vclock` each time the VM stops.
 *    Under icount QEMU runs the vCPU exactly up to the earliest timer deadline
 *    and, when the vCPU sleeps (WFI) with sleep=off, warps the clock straight to
 *    it; so the timer fires at exactly `deadline`, whether the vCPU runs or
 *    sleeps. Its callback notes whether the vCPU sleeps (all_cpu_threads_idle,
 *    read before anything else is queued) and stops the VM with
 *    vm_stop(RUN_STATE_PAUSED): from the main loop (a warp) that stops the VM
 *    there and then; from the vCPU thread (icount runs due virtual timers
 *    there) it asks the main loop to stop the VM (a vmstop request), and the
 *    vCPU waits in queued work, before it runs another instruction, until the
 *    VM is stopping (with a second item queued, so that it never looks idle
 *    meanwhile: the main loop warps the clock of an idle, running VM). Either
 *    way the driver sends nothing: the gdbstub sends its stop reply (T02) as
 *    for a ^C. These are QEMU's own functions, not the plugin API
 *    (exported by Debian's QEMU; looked up with dlsym): without every one of
 *    them there is no GATE_LOCKSTEP.
 *
 *    Stop records (flag GATE_STOP_RECORD; with -icount): at every VM stop,
 *    before the gdbstub's stop reply, the plugin records QEMU's instruction
 *    count (what QMP query-replay reports) and the pc (read as the gdbstub reads
 *    it), so the driver needs no round trip for either after a stop.
 *
 *    Watched copies (watched=FILE; flag GATE_WATCH_COPY): at every VM stop,
 *    before the stop reply, the plugin copies the guest memory ranges the driver
 *    lists in FILE (lock-step's watched ranges) into FILE, read as the gdbstub's
 *    `m` reads them (cpu_memory_rw_debug), so the driver reads shared memory
 *    instead of sending `m` packets. FILE (little-endian):
 *
 *      offset  field      written by  meaning
 *        0     magic[8]   plugin      "MSWATCH\1"
 *        8     nranges    driver      uint32, ranges in use (<= 16; 0: none)
 *       12     capacity   plugin      uint32, data bytes after the header
 *       16     copied     plugin      uint64, the `stops` count the copies are of
 *                                     (written after the data, before `stops`)
 *       24     failed     plugin      uint32, 1: a range could not be read then
 *       64     ranges[16] driver      address (uint64), size and offset (uint32
 *                                     each; offset into the data)
 *     4096     data       plugin      the copies
 *
 *    Lock-step barriers and stops (also GATE_LOCKSTEP): a command FIFO (command=,
 *    read in QEMU's main loop) carries barrier commands: set the interrupts marked in
 *    `irqs` pending in the NVIC, or flush the translations. `nbreaks` breakpoint sites
 *    follow the trap sites in traps[] and are held like them whatever the instruction;
 *    `nwatch` watchpoints are checked after each memory access (a hit is recorded in
 *    hit_* and held after its block). See the comments at apply_irqs, watch_access and
 *    guarded_warp.
 *
 *    Arming: the counting callbacks exist only while armed, so an unarmed gate
 *    costs nothing at run time (translations check for trap sites). Switching
 *    flushes the translations, which only QEMU's own vCPU thread may ask for:
 *    the plugin does it in the vCPU resume callback when `request` != `applied`
 *    (the driver changes `armed` while the VM is stopped, then resumes it).
 *    QEMU's single-threaded TCG loop (used with -icount) has no resume callback:
 *    there `always=on` keeps the counting callbacks registered from the start
 *    (their cost is small next to icount's).
 *
 * QEMU (Debian's 7.2) ships no qemu-plugin.h, so the API functions used here
 * are declared below, matching QEMU 7.2's include/qemu/qemu-plugin.h
 * (QEMU_PLUGIN_VERSION 1).
 *
 * Build: gcc -shared -fPIC -O2 -o msplugin.so msplugin.c
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
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

enum qemu_plugin_cb_flags {
    QEMU_PLUGIN_CB_NO_REGS, /* = 0 */
    QEMU_PLUGIN_CB_R_REGS,
    QEMU_PLUGIN_CB_RW_REGS,
};

typedef void (*qemu_plugin_simple_cb_t)(qemu_plugin_id_t id);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_simple_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn,
                                                enum qemu_plugin_op op, void *ptr, uint64_t imm);
void qemu_plugin_register_vcpu_resume_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_simple_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
void qemu_plugin_reset(qemu_plugin_id_t id, qemu_plugin_simple_cb_t cb);
enum qemu_plugin_mem_rw {
    QEMU_PLUGIN_MEM_R = 1,
    QEMU_PLUGIN_MEM_W,
    QEMU_PLUGIN_MEM_RW,
};
typedef void (*qemu_plugin_vcpu_mem_cb_t)(unsigned int vcpu_index, uint32_t info, uint64_t vaddr,
                                          void *userdata);
void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_mem_cb_t cb,
                                      enum qemu_plugin_cb_flags flags, enum qemu_plugin_mem_rw rw,
                                      void *userdata);
unsigned int qemu_plugin_mem_size_shift(uint32_t info);
bool qemu_plugin_mem_is_store(uint32_t info);
void qemu_plugin_register_vcpu_init_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_simple_cb_t cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);

QEMU_PLUGIN_EXPORT int qemu_plugin_version = 1;

/* ---------------------------------------------------------------- coverage table */
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

/* the trace tail ring (trace=RING) */
#define TRACE_MAGIC "MSTRACE\1"
#define TRACE_VERSION 1
#define TRACE_CAPACITY 4096u

struct trace_header {
    char magic[8];
    uint32_t version;
    uint32_t capacity;
    uint64_t written;
    uint64_t reserved[5];
};

_Static_assert(sizeof(struct trace_header) == 64, "trace header layout");

static struct trace_header *trace_hdr;
static uint64_t *trace_ring;

static struct ms_header *hdr;
static struct ms_entry *entries;
static uint32_t capacity;
static size_t map_size;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* ---------------------------------------------------------------- gate control page */
#define GATE_MAGIC "MSGATE\0\1"
#define GATE_VERSION 1
#define GATE_EXACT_STOP 1u
#define GATE_ALWAYS 2u
#define GATE_LOCKSTEP 4u
#define GATE_STOP_RECORD 8u /* stop_icount and stop_pc are recorded at every VM stop */
#define GATE_WATCH_COPY 16u /* the watched ranges are copied at every VM stop */
#define GATE_TOTAL 32u      /* `total` counts every instruction executed (count=) */
#define GATE_SIZE 4096
#define GATE_TAIL 3840 /* lock-step inputs and watchpoints, after the sites */
#define GATE_MAX_TRAPS ((GATE_TAIL - 128) / 8)
#define GATE_IRQ_WORDS 16 /* 512 external interrupt lines */
#define GATE_MAX_WATCH 8
#define WATCH_WRITE 1u
#define WATCH_READ 2u

struct gate_ctl {
    char magic[8];
    uint32_t version;
    uint32_t flags;
    uint64_t executed;
    uint64_t limit;
    uint64_t request;
    uint64_t applied;
    uint32_t armed;
    uint32_t holding;
    uint64_t holds;
    uint32_t ntraps;
    uint32_t reserved0;
    uint64_t pending;
    uint64_t pass;
    uint64_t deadline;
    uint64_t vclock;
    uint64_t stops;
    uint64_t reached;
    uint32_t idle;
    uint32_t nbreaks;
    uint64_t traps[GATE_MAX_TRAPS]; /* ntraps trap sites, then nbreaks breakpoint sites */
    uint32_t irqs[GATE_IRQ_WORDS];
    uint64_t commands;
    uint32_t command_error;
    uint32_t nwatch;
    uint64_t hit_address;
    uint64_t hit_pc;
    uint32_t hit_access;
    uint32_t hit;
    struct {
        uint64_t address;
        uint32_t size;
        uint32_t access;
    } watch[GATE_MAX_WATCH];
    uint64_t stop_icount;
    uint64_t stop_pc;
    uint64_t total;
};

_Static_assert(offsetof(struct gate_ctl, executed) == 16, "gate layout");
_Static_assert(offsetof(struct gate_ctl, armed) == 48, "gate layout");
_Static_assert(offsetof(struct gate_ctl, holds) == 56, "gate layout");
_Static_assert(offsetof(struct gate_ctl, ntraps) == 64, "gate layout");
_Static_assert(offsetof(struct gate_ctl, pending) == 72, "gate layout");
_Static_assert(offsetof(struct gate_ctl, pass) == 80, "gate layout");
_Static_assert(offsetof(struct gate_ctl, deadline) == 88, "gate layout");
_Static_assert(offsetof(struct gate_ctl, idle) == 120, "gate layout");
_Static_assert(offsetof(struct gate_ctl, traps) == 128, "gate layout");
_Static_assert(offsetof(struct gate_ctl, irqs) == GATE_TAIL, "gate layout");
_Static_assert(offsetof(struct gate_ctl, commands) == GATE_TAIL + 64, "gate layout");
_Static_assert(offsetof(struct gate_ctl, nwatch) == GATE_TAIL + 76, "gate layout");
_Static_assert(offsetof(struct gate_ctl, hit_address) == GATE_TAIL + 80, "gate layout");
_Static_assert(offsetof(struct gate_ctl, watch) == GATE_TAIL + 104, "gate layout");
_Static_assert(offsetof(struct gate_ctl, stop_icount) == GATE_TAIL + 232, "gate layout");
_Static_assert(offsetof(struct gate_ctl, stop_pc) == GATE_TAIL + 240, "gate layout");
_Static_assert(offsetof(struct gate_ctl, total) == GATE_TAIL + 248, "gate layout");
_Static_assert(sizeof(struct gate_ctl) <= GATE_SIZE, "gate layout");

static qemu_plugin_id_t plugin_id;
static struct gate_ctl *gate;
static bool gate_always;
enum count_mode { COUNT_OFF, COUNT_BLOCK, COUNT_INSN };
static enum count_mode count_mode = COUNT_BLOCK; /* how `total` counts (count=) */
static bool counting; /* the counting callbacks are registered (changed in resets only) */
static bool hold_wanted; /* a block passed the limit: hold at the next reset */
static int notify_fd = -1;
static int release_fd = -1;
static bool (*vm_running)(void); /* QEMU's runstate_is_running, when exported */

static void register_callbacks(qemu_plugin_id_t id);

/* ---------------------------------------------------------------- translation */
static void block_start(unsigned int vcpu_index, void *userdata)
{
    (void)vcpu_index;
    uint64_t size = (uintptr_t)userdata;
    uint64_t before = gate->executed;
    gate->executed = before + 1; /* the block's first instruction; the others add inline */
    uint64_t limit = __atomic_load_n(&gate->limit, __ATOMIC_ACQUIRE);
    if (limit != UINT64_MAX && before + size > limit && !hold_wanted) {
        hold_wanted = true;
        /* leave the execution loop after this block: the reset's work item runs at
         * the next block boundary, outside translated code */
        qemu_plugin_reset(plugin_id, register_callbacks);
    }
}

static void add_table_entry(struct qemu_plugin_tb *tb, size_t n)
{
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

/* at every execution of a block (one vCPU: no other writer) */
static void trace_block(unsigned int vcpu_index, void *userdata)
{
    (void)vcpu_index;
    uint64_t n = trace_hdr->written;
    trace_ring[n & (TRACE_CAPACITY - 1)] = (uintptr_t)userdata;
    __atomic_store_n(&trace_hdr->written, n + 1, __ATOMIC_RELEASE);
}

static bool is_trap(uint64_t vaddr)
{
    uint32_t n = __atomic_load_n(&gate->ntraps, __ATOMIC_ACQUIRE);
    if (n > GATE_MAX_TRAPS) {
        n = GATE_MAX_TRAPS;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (gate->traps[i] == vaddr) {
            return true;
        }
    }
    return false;
}

/* a breakpoint site held like a trap site, whatever the instruction (lock-step) */
static bool is_break(uint64_t vaddr)
{
    uint32_t first = __atomic_load_n(&gate->ntraps, __ATOMIC_ACQUIRE);
    uint32_t n = __atomic_load_n(&gate->nbreaks, __ATOMIC_ACQUIRE);
    if (first > GATE_MAX_TRAPS) {
        first = GATE_MAX_TRAPS;
    }
    if (n > GATE_MAX_TRAPS - first) {
        n = GATE_MAX_TRAPS - first;
    }
    for (uint32_t i = first; i < first + n; i++) {
        if (gate->traps[i] == vaddr) {
            return true;
        }
    }
    return false;
}

static void register_callbacks(qemu_plugin_id_t id);

/* lock-step watchpoints: after each memory access of an instruction (the translations
 * are one instruction each while any is set, so the hold comes right after it) */
static void watch_access(unsigned int vcpu_index, uint32_t info, uint64_t vaddr, void *userdata)
{
    (void)vcpu_index;
    if (__atomic_load_n(&gate->hit, __ATOMIC_ACQUIRE) || hold_wanted) {
        return;
    }
    uint64_t size = 1ull << (qemu_plugin_mem_size_shift(info) & 0xf);
    uint32_t access = qemu_plugin_mem_is_store(info) ? WATCH_WRITE : WATCH_READ;
    uint32_t n = __atomic_load_n(&gate->nwatch, __ATOMIC_ACQUIRE);
    if (n > GATE_MAX_WATCH) {
        n = GATE_MAX_WATCH;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint64_t start = gate->watch[i].address;
        if ((gate->watch[i].access & access) && vaddr < start + gate->watch[i].size &&
            start < vaddr + size) {
            gate->hit_address = start;
            gate->hit_pc = (uintptr_t)userdata;
            gate->hit_access = access;
            __atomic_store_n(&gate->hit, 1, __ATOMIC_RELEASE);
            hold_wanted = true;
            qemu_plugin_reset(plugin_id, register_callbacks); /* hold after this block */
            return;
        }
    }
}

/* the trap instructions: Thumb bkpt 0xab; RISC-V ebreak (its slli/srai neighbours
 * were checked by the driver's scan) */
static bool is_trap_instruction(const struct qemu_plugin_insn *insn)
{
    static const uint8_t bkpt_ab[2] = {0xab, 0xbe};
    static const uint8_t ebreak[4] = {0x73, 0x00, 0x10, 0x00};
    size_t size = qemu_plugin_insn_size(insn);
    const void *data = qemu_plugin_insn_data(insn);
    return (size == 2 && memcmp(data, bkpt_ab, 2) == 0) ||
           (size == 4 && memcmp(data, ebreak, 4) == 0);
}

static void hold_before_trap(uint64_t site);

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (hdr != NULL) {
        add_table_entry(tb, n);
    }
    if (trace_hdr != NULL) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, trace_block, QEMU_PLUGIN_CB_NO_REGS,
                                             (void *)(uintptr_t)qemu_plugin_tb_vaddr(tb));
    }
    if (gate == NULL || n == 0) {
        return;
    }
    uint64_t pass = __atomic_load_n(&gate->pass, __ATOMIC_ACQUIRE);
    bool watching = __atomic_load_n(&gate->nwatch, __ATOMIC_ACQUIRE) != 0;
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t vaddr = qemu_plugin_insn_vaddr(insn);
        if (vaddr != pass &&
            ((is_trap(vaddr) && is_trap_instruction(insn)) || is_break(vaddr))) {
            hold_before_trap(vaddr); /* this block will not run */
            return;
        }
        if (watching) {
            qemu_plugin_register_vcpu_mem_cb(insn, watch_access, QEMU_PLUGIN_CB_NO_REGS,
                                             QEMU_PLUGIN_MEM_RW, (void *)(uintptr_t)vaddr);
        }
    }
    if (count_mode == COUNT_BLOCK) {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &gate->total,
                                                 (uint64_t)n);
    } else if (count_mode == COUNT_INSN) {
        for (size_t i = 0; i < n; i++) {
            qemu_plugin_register_vcpu_insn_exec_inline(qemu_plugin_tb_get_insn(tb, i),
                                                       QEMU_PLUGIN_INLINE_ADD_U64,
                                                       &gate->total, 1);
        }
    }
    if (counting) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, block_start, QEMU_PLUGIN_CB_NO_REGS,
                                             (void *)(uintptr_t)n);
        for (size_t i = 1; i < n; i++) {
            qemu_plugin_register_vcpu_insn_exec_inline(qemu_plugin_tb_get_insn(tb, i),
                                                       QEMU_PLUGIN_INLINE_ADD_U64,
                                                       &gate->executed, 1);
        }
    }
}

/* ---------------------------------------------------------------- holding */
static void notify_hold(void)
{
    __atomic_store_n(&gate->holding, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&gate->holds, 1, __ATOMIC_RELEASE);
    if (notify_fd >= 0) {
        char byte = 'h';
        if (write(notify_fd, &byte, 1) < 0 && errno != EAGAIN) {
            fprintf(stderr, "msplugin: cannot notify the driver: %s\n", strerror(errno));
        }
    }
}

/* the calling thread's sleeps end within a few us of their time (Linux's default
 * slack for a normal thread is 50 us): holds look for the VM's stop every 20 us */
static void fine_timer_slack(void)
{
    static __thread bool done;
    if (!done) {
        prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
        done = true;
    }
}

/* the wait between two looks at the run state in a hold: 20 us for the first 2 ms
 * (the driver's ^C or our own stop request arrives within that), then 1 ms */
static struct timespec hold_interval(unsigned *looks)
{
    struct timespec ts = {0, *looks < 100 ? 20000L : 1000000L};
    if (*looks < 100) {
        (*looks)++;
    }
    return ts;
}

/* wait for 'g' on the release FIFO (when `releasable`) or a VM that stops */
static void wait_release(bool releasable)
{
    unsigned looks = 0;
    fine_timer_slack();
    for (;;) {
        struct pollfd pfd = {.fd = release_fd, .events = POLLIN};
        struct timespec interval = hold_interval(&looks);
        if (ppoll(&pfd, 1, &interval, NULL) > 0) {
            char buf[64];
            ssize_t got = read(release_fd, buf, sizeof(buf));
            if (releasable && got > 0 && memchr(buf, 'g', (size_t)got) != NULL) {
                break; /* go on running */
            }
        }
        if (!vm_running()) {
            break; /* the VM is stopping: the vCPU stops at this boundary */
        }
    }
    __atomic_store_n(&gate->holding, 0, __ATOMIC_RELEASE);
}

/* at a block boundary, outside translated code (a reset's callback) */
static void hold(void)
{
    notify_hold();
    wait_release(true);
}

/* in the translation of a block that holds a trap (see the top of this file) */
static void hold_before_trap(uint64_t site)
{
    __atomic_store_n(&gate->pending, site, __ATOMIC_RELEASE);
    qemu_plugin_reset(plugin_id, register_callbacks); /* the exit request, set now */
    notify_hold();
    wait_release(false);
}

/* ---------------------------------------------------------------- arming */
static void vcpu_resume(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    (void)vcpu_index;
    if (__atomic_load_n(&gate->request, __ATOMIC_ACQUIRE) != gate->applied) {
        qemu_plugin_reset(id, register_callbacks); /* runs before any block does */
    }
}

static void at_exit(qemu_plugin_id_t id, void *userdata)
{
    (void)id;
    (void)userdata;
    if (hdr != NULL) {
        __atomic_or_fetch(&hdr->flags, MS_FLAG_EXITED, __ATOMIC_RELEASE);
        msync(hdr, map_size, MS_ASYNC);
    }
    /* no munmap: translated code may still point into the maps */
}

/* At install, and as the callback of every reset (on the vCPU thread, with every
 * translation flushed, outside translated code). */
static void register_callbacks(qemu_plugin_id_t id)
{
    (void)id;
    if (gate != NULL) {
        uint64_t request = __atomic_load_n(&gate->request, __ATOMIC_ACQUIRE);
        counting = gate_always || __atomic_load_n(&gate->armed, __ATOMIC_ACQUIRE) != 0;
        __atomic_store_n(&gate->applied, request, __ATOMIC_RELEASE);
    }
    if (hdr != NULL || gate != NULL) {
        qemu_plugin_register_vcpu_tb_trans_cb(plugin_id, tb_trans);
    }
    if (gate != NULL && !gate_always) {
        qemu_plugin_register_vcpu_resume_cb(plugin_id, vcpu_resume);
    }
    qemu_plugin_register_atexit_cb(plugin_id, at_exit, NULL);
    if (hold_wanted) {
        hold_wanted = false;
        hold();
    }
}

/* ---------------------------------------------------------------- lock-step deadlines */
/* QEMU's own (include/qemu/timer.h, sysemu/runstate.h, sysemu/cpus.h in 7.2) */
#define QEMU_CLOCK_VIRTUAL 1
#define SCALE_NS 1
#define RUN_STATE_PAUSED 4 /* qapi RunState: debug, inmigrate, internal-error, io-error, paused */
#define QEMU_TIMER_SIZE 256 /* QEMUTimer is 56 bytes in 7.2; room to spare */

static void (*q_timer_init_full)(void *ts, void *group, int type, int scale, int attributes,
                                 void (*cb)(void *), void *opaque);
static void (*q_timer_mod_ns)(void *ts, int64_t expire);
static void (*q_timer_del)(void *ts);
static int64_t (*q_clock_get_ns)(int type);
static void (*q_clock_enable)(int type, bool enabled);
static bool (*q_all_cpu_threads_idle)(void);
static int (*q_vm_stop)(int state);
static void (*q_vmstop_request_prepare)(void);
static void (*q_vmstop_request)(int state);
static void *(*q_add_vm_change_state_handler_prio)(void (*cb)(void *, bool, int), void *opaque,
                                                   int priority);
typedef union {
    int host_int;
    unsigned long host_ulong;
    void *host_ptr;
    uint64_t target_ptr;
} run_on_cpu_data;
static bool (*q_in_vcpu_thread)(void);
static void (*q_async_safe_run_on_cpu)(void *cpu, void (*func)(void *cpu, run_on_cpu_data data),
                                       run_on_cpu_data data);
static void **q_cpus; /* QTAILQ head of every CPUState: its first field is the first CPU */
static void (*q_set_fd_handler)(int fd, void (*read)(void *), void (*write)(void *), void *opaque);
static void *(*q_object_resolve_path_type)(const char *path, const char *type, bool *ambiguous);
static void (*q_nvic_set_pending)(void *nvic, int irq, bool secure);
static void (*q_tb_flush)(void *cpu);
static int command_fd = -1;
static bool *q_qtest_allowed;
static void (*q_icount_start_warp_timer)(void);
static void (*q_main_loop_poll_add_notifier)(void *notifier);
static void *poll_notifier; /* QEMU's Notifier: the callback first, then a list entry */
static bool warp_guard; /* a lock-step quantum runs: QEMU warps only through us */
static void *deadline_timer;
static bool timer_ready;

/* stop records: QEMU's icount_get_raw, and its gdbstub's register reader for the pc */
typedef struct {
    uint8_t *data;
    unsigned len;
} byte_array; /* glib's GByteArray */
static int64_t (*q_icount_get_raw)(void);
static int (*q_gdb_read_register)(void *cpu, byte_array *buf, int n);
static byte_array *(*q_byte_array_new)(void);
static byte_array *(*q_byte_array_set_size)(byte_array *array, unsigned length);
static byte_array *pc_buffer;
static int pc_register; /* the gdbstub's number of the pc */

/* watched copies (see the top of this file) */
#define WATCH_FILE_MAGIC "MSWATCH\1"
#define WATCH_FILE_HEADER 4096
#define WATCH_FILE_DATA (1u << 20)
#define WATCH_FILE_RANGES 16
struct watch_file {
    char magic[8];
    uint32_t nranges;
    uint32_t capacity;
    uint64_t copied;
    uint32_t failed;
    uint32_t reserved[9];
    struct {
        uint64_t address;
        uint32_t size;
        uint32_t offset;
    } ranges[WATCH_FILE_RANGES];
};
_Static_assert(offsetof(struct watch_file, ranges) == 64, "watch file layout");
_Static_assert(sizeof(struct watch_file) <= WATCH_FILE_HEADER, "watch file layout");
static struct watch_file *watched;
static int (*q_memory_rw_debug)(void *cpu, uint64_t addr, void *buf, size_t len, bool is_write);

/* safe work on the vCPU (outside translated code, without the BQL): hold until the
 * main loop has carried out the stop deadline_reached asked for */
static void hold_at_deadline(void *cpu, run_on_cpu_data data)
{
    (void)cpu;
    (void)data;
    unsigned looks = 0;
    fine_timer_slack();
    while (vm_running()) {
        struct timespec interval = hold_interval(&looks);
        nanosleep(&interval, NULL);
    }
}

static void nothing(void *cpu, run_on_cpu_data data)
{
    (void)cpu;
    (void)data;
}

static void deadline_reached(void *opaque)
{
    (void)opaque;
    /* before anything is queued: a vCPU with work queued never counts as idle */
    __atomic_store_n(&gate->idle, q_all_cpu_threads_idle() ? 1u : 0u, __ATOMIC_RELEASE);
    __atomic_add_fetch(&gate->reached, 1, __ATOMIC_RELEASE);
    if (!q_in_vcpu_thread()) {
        /* the main loop (a warp): the run state changes at once, the vCPU is paused */
        q_vm_stop(RUN_STATE_PAUSED);
        return;
    }
    /* the vCPU thread (icount runs due timers there): ask the main loop to stop the
     * VM (QEMU's vmstop request, as vm_stop makes from a vCPU, but without marking
     * this vCPU stopped: the main loop's pause then waits for it, so the stop reply
     * comes only once the hold below is over, never while it still waits for a VM
     * that has been resumed again). The vCPU holds, at its next safe point (before any
     * other instruction), until the run state says the VM is stopping. Until then the
     * vCPU must not look idle, or the main loop would warp the clock to the next
     * timer first: it holds in a first work item with a second one still queued (a
     * queue that is not empty: not idle). */
    q_vmstop_request_prepare();
    q_vmstop_request(RUN_STATE_PAUSED);
    run_on_cpu_data none = {.host_ptr = NULL};
    q_async_safe_run_on_cpu(*q_cpus, hold_at_deadline, none);
    q_async_safe_run_on_cpu(*q_cpus, nothing, none);
}

/* Barrier commands (lock-step), in the main loop with the VM stopped: the driver fills
 * the page, writes one byte per command to the command FIFO and waits for `commands`
 * to count it (woken by a byte on the notify FIFO: no hold comes while the VM is
 * stopped, and the driver tells the two apart by the counters). 'i': set the external interrupts in `irqs` pending in the NVIC (as a
 * rising edge on their lines would), so that the vCPU takes them before it runs an
 * instruction; `command_error` 1 when there is no NVIC. 'f': flush the translations
 * (the breakpoint sites or watchpoints changed; the vCPU does it before it runs). */
static void apply_irqs(void)
{
    void *nvic = NULL;
    for (int w = 0; w < GATE_IRQ_WORDS; w++) {
        uint32_t bits = __atomic_exchange_n(&gate->irqs[w], 0, __ATOMIC_ACQ_REL);
        for (int b = 0; bits != 0 && b < 32; b++) {
            if (!(bits & (1u << b))) {
                continue;
            }
            bits &= ~(1u << b);
            if (nvic == NULL) {
                nvic = q_object_resolve_path_type("", "armv7m_nvic", NULL);
            }
            if (nvic == NULL) {
                __atomic_store_n(&gate->command_error, 1, __ATOMIC_RELEASE);
                return;
            }
            q_nvic_set_pending(nvic, 16 + w * 32 + b, false);
        }
    }
}

static void on_command(void *opaque)
{
    (void)opaque;
    char buf[64];
    ssize_t got = read(command_fd, buf, sizeof(buf));
    for (ssize_t i = 0; i < got; i++) {
        if (buf[i] == 'i') {
            apply_irqs();
        } else if (buf[i] == 'f') {
            q_tb_flush(*q_cpus);
        }
        __atomic_add_fetch(&gate->commands, 1, __ATOMIC_RELEASE);
    }
    /* tell the driver (it waits on the notify FIFO; it reads `commands`, not the byte) */
    if (got > 0 && notify_fd >= 0) {
        char byte = 'c';
        if (write(notify_fd, &byte, 1) < 0 && errno != EAGAIN) {
            fprintf(stderr, "msplugin: cannot notify the driver: %s\n", strerror(errno));
        }
    }
}

/* The warp guard (lock-step quanta). QEMU 7.2 warps the virtual clock of an idle vCPU
 * (WFI, sleep=off) to the next timer whenever a virtual timer is changed while the
 * vCPU looks idle, also inside a timer's callback: a SysTick's ptimer re-arms itself
 * before it raises its interrupt, so a sleeping CPU's clock jumps a whole period more
 * (or to the quantum's deadline, when that comes first: results that depend on the
 * quantum). During a quantum QEMU's own warps are off (its qtest switch, which makes
 * icount_start_warp_timer return) and the main loop warps once per iteration, after
 * its poll and before it runs the timers: to the earliest deadline, when the vCPU is
 * idle then. */
static void guarded_warp(void *notifier, void *data)
{
    (void)notifier;
    (void)data;
    if (warp_guard && vm_running() && q_all_cpu_threads_idle()) {
        *q_qtest_allowed = false;
        q_icount_start_warp_timer();
        *q_qtest_allowed = true;
    }
}

/* the main loop's handlers exist once the machine is being made (not at install) */
static void vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    (void)id;
    if (vcpu_index == 0 && command_fd >= 0) {
        q_set_fd_handler(command_fd, on_command, NULL, NULL);
        q_main_loop_poll_add_notifier(poll_notifier);
    }
}

/* at a VM stop (main loop, every vCPU paused), before `stops` is bumped: the stop
 * records and the watched copies */
static void record_stop(void)
{
    void *cpu = *q_cpus;
    if ((gate->flags & GATE_STOP_RECORD) && cpu != NULL) {
        gate->stop_icount = (uint64_t)q_icount_get_raw();
        q_byte_array_set_size(pc_buffer, 0);
        uint32_t pc = 0;
        if (q_gdb_read_register(cpu, pc_buffer, pc_register) >= 4 && pc_buffer->len >= 4) {
            memcpy(&pc, pc_buffer->data, 4); /* little-endian hosts and targets */
        }
        gate->stop_pc = pc;
    }
    if (watched == NULL || cpu == NULL) {
        return;
    }
    uint32_t n = __atomic_load_n(&watched->nranges, __ATOMIC_ACQUIRE);
    if (n == 0) {
        return;
    }
    uint32_t failed = n > WATCH_FILE_RANGES;
    char *data = (char *)watched + WATCH_FILE_HEADER;
    for (uint32_t i = 0; i < n && !failed; i++) {
        uint64_t size = watched->ranges[i].size, offset = watched->ranges[i].offset;
        if (offset + size > WATCH_FILE_DATA ||
            q_memory_rw_debug(cpu, watched->ranges[i].address, data + offset, size, false) != 0) {
            failed = 1;
        }
    }
    watched->failed = failed;
    __atomic_store_n(&watched->copied, gate->stops + 1, __ATOMIC_RELEASE);
}

static void run_state_changed(void *opaque, bool running, int state)
{
    (void)opaque;
    (void)state;
    if (running) {
        if (!timer_ready) {
            /* here, not at install: QEMU's main-loop timer lists are set up later */
            q_timer_init_full(deadline_timer, NULL, QEMU_CLOCK_VIRTUAL, SCALE_NS, 0,
                              deadline_reached, NULL);
            timer_ready = true;
        }
        uint64_t deadline = __atomic_load_n(&gate->deadline, __ATOMIC_ACQUIRE);
        /* Changing a virtual timer makes QEMU check for a warp; the run state is already
         * "running" and the vCPU not resumed yet, so it looks idle and the clock would
         * jump to the deadline. With the clock disabled there is no warp; the vCPUs'
         * resume, right after the handlers, enables it again (pause disabled it too). */
        q_clock_enable(QEMU_CLOCK_VIRTUAL, false);
        if (deadline == UINT64_MAX) {
            q_timer_del(deadline_timer);
        } else {
            q_timer_mod_ns(deadline_timer, (int64_t)deadline);
        }
        warp_guard = deadline != UINT64_MAX && !*q_qtest_allowed;
        if (warp_guard) {
            *q_qtest_allowed = true;
        }
    } else if (warp_guard) {
        *q_qtest_allowed = false;
        warp_guard = false;
    }
}

/* at a VM stop, before the gdbstub's handler sends the stop reply */
static void vm_stopped(void *opaque, bool running, int state)
{
    (void)opaque;
    (void)state;
    if (!running) {
        record_stop();
        __atomic_store_n(&gate->vclock, (uint64_t)q_clock_get_ns(QEMU_CLOCK_VIRTUAL),
                         __ATOMIC_RELEASE);
        __atomic_add_fetch(&gate->stops, 1, __ATOMIC_RELEASE);
    }
}

/* the stop records, with -icount (always=on) and QEMU's functions for them */
static void setup_stop_records(void)
{
    q_icount_get_raw = dlsym(RTLD_DEFAULT, "icount_get_raw");
    q_byte_array_new = dlsym(RTLD_DEFAULT, "g_byte_array_new");
    q_byte_array_set_size = dlsym(RTLD_DEFAULT, "g_byte_array_set_size");
    q_gdb_read_register = dlsym(RTLD_DEFAULT, "arm_cpu_gdb_read_register");
    pc_register = 15;
    if (q_gdb_read_register == NULL) {
        q_gdb_read_register = dlsym(RTLD_DEFAULT, "riscv_cpu_gdb_read_register");
        pc_register = 32;
    }
    if (gate_always && q_icount_get_raw && q_byte_array_new && q_byte_array_set_size &&
        q_gdb_read_register && (pc_buffer = q_byte_array_new()) != NULL) {
        gate->flags |= GATE_STOP_RECORD;
    }
    q_memory_rw_debug = dlsym(RTLD_DEFAULT, "cpu_memory_rw_debug");
    if (watched != NULL && q_memory_rw_debug != NULL) {
        gate->flags |= GATE_WATCH_COPY;
    } else {
        watched = NULL;
    }
}

/* true when every QEMU function the deadlines need is there (then they are set up) */
static bool setup_lockstep(void)
{
    q_timer_init_full = dlsym(RTLD_DEFAULT, "timer_init_full");
    q_timer_mod_ns = dlsym(RTLD_DEFAULT, "timer_mod_ns");
    q_timer_del = dlsym(RTLD_DEFAULT, "timer_del");
    q_clock_get_ns = dlsym(RTLD_DEFAULT, "qemu_clock_get_ns");
    q_clock_enable = dlsym(RTLD_DEFAULT, "qemu_clock_enable");
    q_all_cpu_threads_idle = dlsym(RTLD_DEFAULT, "all_cpu_threads_idle");
    q_vm_stop = dlsym(RTLD_DEFAULT, "vm_stop");
    q_vmstop_request_prepare = dlsym(RTLD_DEFAULT, "qemu_system_vmstop_request_prepare");
    q_vmstop_request = dlsym(RTLD_DEFAULT, "qemu_system_vmstop_request");
    q_add_vm_change_state_handler_prio =
        dlsym(RTLD_DEFAULT, "qemu_add_vm_change_state_handler_prio");
    q_in_vcpu_thread = dlsym(RTLD_DEFAULT, "qemu_in_vcpu_thread");
    q_async_safe_run_on_cpu = dlsym(RTLD_DEFAULT, "async_safe_run_on_cpu");
    q_cpus = dlsym(RTLD_DEFAULT, "cpus");
    q_set_fd_handler = dlsym(RTLD_DEFAULT, "qemu_set_fd_handler");
    q_object_resolve_path_type = dlsym(RTLD_DEFAULT, "object_resolve_path_type");
    q_nvic_set_pending = dlsym(RTLD_DEFAULT, "armv7m_nvic_set_pending");
    q_tb_flush = dlsym(RTLD_DEFAULT, "tb_flush");
    q_qtest_allowed = dlsym(RTLD_DEFAULT, "qtest_allowed");
    q_icount_start_warp_timer = dlsym(RTLD_DEFAULT, "icount_start_warp_timer");
    q_main_loop_poll_add_notifier = dlsym(RTLD_DEFAULT, "main_loop_poll_add_notifier");
    poll_notifier = calloc(1, 64);
    if (poll_notifier == NULL || !q_qtest_allowed || !q_icount_start_warp_timer ||
        !q_main_loop_poll_add_notifier) {
        return false;
    }
    *(void (**)(void *, void *))poll_notifier = guarded_warp;
    if (command_fd < 0 || !q_set_fd_handler || !q_object_resolve_path_type ||
        !q_nvic_set_pending || !q_tb_flush) {
        return false;
    }
    if (!q_in_vcpu_thread || !q_async_safe_run_on_cpu || !q_cpus || vm_running == NULL ||
        !q_timer_init_full || !q_timer_mod_ns || !q_timer_del || !q_clock_get_ns ||
        !q_all_cpu_threads_idle || !q_vm_stop || !q_add_vm_change_state_handler_prio ||
        !q_vmstop_request_prepare || !q_vmstop_request) {
        return false;
    }
    deadline_timer = calloc(1, QEMU_TIMER_SIZE);
    if (deadline_timer == NULL) {
        return false;
    }
    setup_stop_records();
    /* QEMU runs these handlers from the lowest priority up when the VM starts (the
     * deadline is set before any device's handler, as ever) and from the highest
     * down when it stops: the stop records, `vclock` and `stops` are written before
     * the gdbstub's handler (priority 0) sends the stop reply */
    q_add_vm_change_state_handler_prio(run_state_changed, NULL, -1000);
    q_add_vm_change_state_handler_prio(vm_stopped, NULL, 1000);
    return true;
}

/* ---------------------------------------------------------------- install */
static void *map_file(const char *path, size_t size, const char *what)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "msplugin: cannot create the %s %s: %s\n", what, path, strerror(errno));
        return NULL;
    }
    if (ftruncate(fd, (off_t)size) != 0) {
        fprintf(stderr, "msplugin: cannot size the %s %s: %s\n", what, path, strerror(errno));
        close(fd);
        return NULL;
    }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        fprintf(stderr, "msplugin: cannot map the %s %s: %s\n", what, path, strerror(errno));
        return NULL;
    }
    return p;
}

static int open_fifo(const char *path, const char *what)
{
    /* O_RDWR: never blocks and never fails for want of a peer (Linux) */
    int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "msplugin: cannot open the %s FIFO %s: %s\n", what, path, strerror(errno));
    }
    return fd;
}

static int setup_table(const char *out, unsigned long n_entries)
{
    capacity = (uint32_t)n_entries;
    map_size = sizeof(struct ms_header) + (size_t)capacity * sizeof(struct ms_entry);
    void *p = map_file(out, map_size, "coverage table");
    if (p == NULL) {
        return -1;
    }
    struct ms_header *h = p;
    entries = (struct ms_entry *)((char *)p + sizeof(struct ms_header));
    h->version = MS_VERSION;
    h->entry_size = sizeof(struct ms_entry);
    h->capacity = capacity;
    h->flags = 0;
    h->used = 0;
    /* the magic last: a reader that sees it sees a valid header */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(h->magic, MS_MAGIC, 8);
    hdr = h;
    return 0;
}

static int setup_trace(const char *path)
{
    struct trace_header *t = map_file(path, sizeof(*t) + TRACE_CAPACITY * sizeof(uint64_t),
                                      "trace ring");
    if (t == NULL) {
        return -1;
    }
    trace_ring = (uint64_t *)(t + 1);
    t->version = TRACE_VERSION;
    t->capacity = TRACE_CAPACITY;
    t->written = 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(t->magic, TRACE_MAGIC, 8);
    trace_hdr = t;
    return 0;
}

static int setup_gate(const char *ctl, const char *notify, const char *release,
                      const char *command, const char *watch_path)
{
    struct gate_ctl *g = map_file(ctl, GATE_SIZE, "gate control page");
    if (g == NULL) {
        return -1;
    }
    if (watch_path != NULL) {
        struct watch_file *w = map_file(watch_path, WATCH_FILE_HEADER + WATCH_FILE_DATA,
                                        "watched copies file");
        if (w == NULL) {
            return -1;
        }
        w->nranges = 0;
        w->capacity = WATCH_FILE_DATA;
        w->copied = 0;
        w->failed = 0;
        __atomic_thread_fence(__ATOMIC_RELEASE);
        memcpy(w->magic, WATCH_FILE_MAGIC, 8);
        watched = w;
    }
    notify_fd = open_fifo(notify, "notify");
    release_fd = open_fifo(release, "release");
    if (notify_fd < 0 || release_fd < 0) {
        return -1;
    }
    if (command != NULL && (command_fd = open_fifo(command, "command")) < 0) {
        return -1;
    }
    vm_running = (bool (*)(void))dlsym(RTLD_DEFAULT, "runstate_is_running");
    if (vm_running == NULL) {
        /* nothing can be held safely: leave the page without its magic (not usable) */
        fprintf(stderr, "msplugin: QEMU does not export runstate_is_running: no gate\n");
        return 0;
    }
    g->version = GATE_VERSION;
    g->flags = GATE_EXACT_STOP | (gate_always ? GATE_ALWAYS : 0);
    g->executed = 0;
    g->limit = UINT64_MAX;
    g->request = 0;
    g->applied = 0;
    g->armed = 0;
    g->holding = 0;
    g->holds = 0;
    g->ntraps = 0;
    g->pending = UINT64_MAX;
    g->pass = UINT64_MAX;
    g->deadline = UINT64_MAX;
    g->vclock = 0;
    g->stops = 0;
    g->reached = 0;
    g->idle = 0;
    g->nbreaks = 0;
    memset(g->irqs, 0, sizeof(g->irqs));
    g->commands = 0;
    g->command_error = 0;
    g->nwatch = 0;
    g->hit = 0;
    g->stop_icount = 0;
    g->stop_pc = 0;
    g->total = 0;
    if (count_mode != COUNT_OFF) {
        g->flags |= GATE_TOTAL;
    }
    gate = g; /* the handlers read it */
    if (setup_lockstep()) {
        g->flags |= GATE_LOCKSTEP;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(g->magic, GATE_MAGIC, 8);
    return 0;
}

static const char *arg_value(const char *arg, const char *key)
{
    size_t n = strlen(key);
    return strncmp(arg, key, n) == 0 && arg[n] == '=' ? arg + n + 1 : NULL;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    (void)info;
    const char *out = NULL, *ctl = NULL, *notify = NULL, *release = NULL, *command = NULL, *v;
    const char *watch_path = NULL, *trace_path = NULL;
    unsigned long n_entries = MS_DEFAULT_ENTRIES;
    for (int i = 0; i < argc; i++) {
        if ((v = arg_value(argv[i], "out")) != NULL) {
            out = v;
        } else if ((v = arg_value(argv[i], "entries")) != NULL) {
            char *endp;
            n_entries = strtoul(v, &endp, 0);
            if (*endp || n_entries == 0 || n_entries > MS_MAX_ENTRIES) {
                fprintf(stderr, "msplugin: bad entries=%s (1..%u)\n", v, MS_MAX_ENTRIES);
                return -1;
            }
        } else if ((v = arg_value(argv[i], "gate")) != NULL) {
            ctl = v;
        } else if ((v = arg_value(argv[i], "notify")) != NULL) {
            notify = v;
        } else if ((v = arg_value(argv[i], "release")) != NULL) {
            release = v;
        } else if ((v = arg_value(argv[i], "command")) != NULL) {
            command = v;
        } else if ((v = arg_value(argv[i], "trace")) != NULL) {
            trace_path = v;
        } else if ((v = arg_value(argv[i], "watched")) != NULL) {
            watch_path = v;
        } else if ((v = arg_value(argv[i], "count")) != NULL) {
            if (strcmp(v, "insn") == 0) {
                count_mode = COUNT_INSN;
            } else if (strcmp(v, "block") == 0) {
                count_mode = COUNT_BLOCK;
            } else if (strcmp(v, "off") == 0) {
                count_mode = COUNT_OFF;
            } else {
                fprintf(stderr, "msplugin: bad count=%s (insn, block or off)\n", v);
                return -1;
            }
        } else if ((v = arg_value(argv[i], "always")) != NULL) {
            gate_always = strcmp(v, "on") == 0;
        } else {
            fprintf(stderr, "msplugin: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    if (ctl != NULL && (notify == NULL || release == NULL)) {
        fprintf(stderr, "msplugin: gate= needs notify= and release=\n");
        return -1;
    }
    if (trace_path != NULL && out == NULL) {
        fprintf(stderr, "msplugin: trace= needs out=\n");
        return -1;
    }
    if ((out != NULL && setup_table(out, n_entries) != 0) ||
        (trace_path != NULL && setup_trace(trace_path) != 0) ||
        (ctl != NULL && setup_gate(ctl, notify, release, command, watch_path) != 0)) {
        return -1;
    }
    plugin_id = id;
    if (gate != NULL && (gate->flags & GATE_LOCKSTEP)) {
        qemu_plugin_register_vcpu_init_cb(id, vcpu_init);
    }
    register_callbacks(id);
    return 0;
}
