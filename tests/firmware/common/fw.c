/* Console and semihosting helpers shared by every board. */
#include "fw.h"

void *memset(void *d, int c, size_t n)
{
    unsigned char *p = d;
    while (n--)
        *p++ = (unsigned char)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

void fw_puts(const char *s)
{
    while (*s)
        uart_putc(*s++);
}

void fw_put_hex32(uint32_t v)
{
    static const char digits[] = "0123456789abcdef";
    for (int shift = 28; shift >= 0; shift -= 4)
        uart_putc(digits[(v >> shift) & 0xf]);
}

void fw_put_dec(int32_t v)
{
    char buf[12];
    int i = 0;
    uint32_t u = v < 0 ? 0u - (uint32_t)v : (uint32_t)v;
    if (v < 0)
        uart_putc('-');
    do {
        buf[i++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    while (i)
        uart_putc(buf[--i]);
}

void fw_exit(int code)
{
    if (code == 0) {
        semihost_call(SYS_EXIT, ADP_STOPPED_APPLICATION_EXIT);
    } else {
        static volatile uint32_t block[2];
        block[0] = ADP_STOPPED_APPLICATION_EXIT;
        block[1] = (uint32_t)code;
        semihost_call(SYS_EXIT_EXTENDED, (uintptr_t)block);
    }
    for (;;) {
        /* Not running under a semihosting host: park here. */
    }
}
