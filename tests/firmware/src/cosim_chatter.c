/* cosim_chatter: talks to cosim_responder over a serial link (this node's
 * console UART TX is the responder's RX and the other way round), so
 * everything it prints goes to the responder. Sends "msg <i>\n" for i in
 * 1..COSIM_MESSAGES (10) and after each reads the answer line (polling UART
 * RX), which must be "ack <i>\n"; then sends "done\n", waits for "bye\n" and
 * exits 0. On any other answer it sends "chatter: wrong answer: <line>\n"
 * and exits 1. */
#include "cosim.h"

static int wrong_answer(const char *line)
{
    fw_puts("chatter: wrong answer: ");
    fw_puts(line);
    fw_puts("\n");
    return 1;
}

int main(void)
{
    char line[COSIM_LINE_MAX];
    uint32_t acked;
    for (uint32_t i = 1; i <= COSIM_MESSAGES; i++) {
        fw_puts("msg ");
        fw_put_dec((int32_t)i);
        fw_puts("\n");
        cosim_read_line(line);
        if (!cosim_line_number(line, "ack ", &acked) || acked != i)
            return wrong_answer(line);
    }
    fw_puts("done\n");
    cosim_read_line(line);
    if (!cosim_line_is(line, "bye"))
        return wrong_answer(line);
    return 0;
}
