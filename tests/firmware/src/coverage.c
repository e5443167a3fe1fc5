/* coverage: known control flow for coverage tests. Built with -O0 (see the
 * Makefile) so every statement keeps its own line in the DWARF line table.
 * DWARF file name: src/coverage.c (comp_dir "." = tests/firmware).
 *
 * Expected (line numbers of this file; each marked with a COV: tag):
 *   functions executed:     main (1x), called_three_times (3x)
 *   functions not executed: never_called
 *   line 25 never_called body            -> NOT executed     (COV:never)
 *   line 30 called_three_times body      -> executed 3 times (COV:three)
 *   line 36 if (flag)                    -> executed, condition always true
 *   line 37 then-branch                  -> executed once    (COV:then)
 *   line 39 else-branch                  -> NOT executed     (COV:else)
 *   line 42 for (i = 0; i < 10; i++)     -> loop header, 10 iterations
 *   line 43 loop body                    -> executed 10 times (COV:loop)
 *   lines 46-48 the three calls          -> executed once each (COV:call1..3)
 *   line 49 prints "coverage done\n"; exit code 0.
 */
#include "fw.h"

static volatile int sink;

/* Never called; the Makefile passes -Wl,-u,never_called so --gc-sections keeps it. */
__attribute__((noinline, used)) void never_called(void)
{
    sink = -1;                                             /* COV:never */
}

__attribute__((noinline)) int called_three_times(int x)
{
    return x * 2;                                          /* COV:three */
}

int main(void)
{
    volatile int flag = 1;
    if (flag) {                                            /* COV:if */
        sink = 1;                                          /* COV:then */
    } else {
        sink = 2;                                          /* COV:else */
    }
    int sum = 0;
    for (int i = 0; i < 10; i++) {                         /* COV:for */
        sum += i;                                          /* COV:loop */
    }
    sink = sum;
    sink = called_three_times(1);                          /* COV:call1 */
    sink = called_three_times(2);                          /* COV:call2 */
    sink = called_three_times(3);                          /* COV:call3 */
    fw_puts("coverage done\n");                            /* COV:done */
    return 0;
}
