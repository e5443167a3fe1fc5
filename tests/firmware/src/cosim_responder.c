/* cosim_responder: answers cosim_chatter over a serial link (console UART).
 * Reads lines from UART RX (polling) and answers "msg <i>\n" with
 * "ack <i>\n"; "done\n" with "bye\n", after which it sleeps for good (WFI
 * with interrupts masked and none enabled: it never wakes, never exits).
 * Any other line gets "what?\n". It prints nothing else (its console is the
 * link). */
#include "cosim.h"

int main(void)
{
    char line[COSIM_LINE_MAX];
    uint32_t n;
    for (;;) {
        cosim_read_line(line);
        if (cosim_line_number(line, "msg ", &n)) {
            fw_puts("ack ");
            fw_put_dec((int32_t)n);
            fw_puts("\n");
        } else if (cosim_line_is(line, "done")) {
            fw_puts("bye\n");
            break;
        } else {
            fw_puts("what?\n");
        }
    }
    __asm__ volatile("cpsid i" ::: "memory");
    cosim_sleep_forever();
}
