/* Minimal QEMU TCG plugin: counts executed guest instructions (inline, per
 * translated block) and prints "insns: N" on stderr when QEMU exits.
 * Debian ships no qemu-plugin.h, so the few API items used are declared here
 * (QEMU plugin API version 1, QEMU 7.2).
 *   gcc -shared -fPIC -O2 -o insn_count.so insn_count.c
 *   qemu-system-arm ... -plugin ./insn_count.so
 * Counts whole blocks, so a block left early by an exception is over-counted
 * by a few instructions: good for benchmarks, not for exact tests. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                                     void *ptr, uint64_t imm);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t insns;

static void report(void)
{
    fprintf(stderr, "insns: %llu\n", (unsigned long long)insns);
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns,
                                             qemu_plugin_tb_n_insns(tb));
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv)
{
    (void)info;
    (void)argc;
    (void)argv;
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    atexit(report); /* semihosting SYS_EXIT ends QEMU through exit() */
    return 0;
}
