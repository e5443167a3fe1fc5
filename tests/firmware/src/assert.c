/* assert: prints "checking\n", then a check fails and calls __assert_func (newlib's name
 * for what assert() calls) with the file, line, function and expression; it prints
 * "assertion failed: <expr>\n" and exits 4. A capsule's assert trigger halts on
 * __assert_func's first instruction, with check_balance in the backtrace. */
#include "fw.h"

#define ASSERT(e) ((e) ? (void)0 : __assert_func(__FILE__, __LINE__, __func__, #e))

void __assert_func(const char *file, int line, const char *func, const char *expr)
    __attribute__((noreturn, noinline));

void __assert_func(const char *file, int line, const char *func, const char *expr)
{
    (void)file;
    (void)line;
    (void)func;
    fw_puts("assertion failed: ");
    fw_puts(expr);
    fw_puts("\n");
    fw_exit(4);
}

static volatile int32_t balance = 100;

__attribute__((noinline)) int32_t check_balance(int32_t withdraw)
{
    int32_t left = balance - withdraw;
    ASSERT(left >= 0);
    return left;
}

int main(void)
{
    fw_puts("checking\n");
    int32_t left = check_balance(30);
    left = check_balance(left + 50);
    fw_puts("unreachable\n");
    return (int)left;
}
