/* RISC-V C runtime: data/bss init, trap entry and default trap handler. */
#include "fw.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss;
int main(void);

void c_start(void) __attribute__((noreturn));
void c_start(void)
{
    uint32_t *src = &_sidata;
    for (uint32_t *dst = &_sdata; dst < &_edata;)
        *dst++ = *src++;
    for (uint32_t *dst = &_sbss; dst < &_ebss;)
        *dst++ = 0;
    uart_init();
    fw_exit(main());
}

/* Weak default: programs (timer, fault) override it. */
__attribute__((weak)) void handle_trap(uint32_t mcause, uint32_t mepc)
{
    (void)mepc;
    fw_puts("unhandled trap mcause=");
    fw_put_dec((int32_t)mcause);
    fw_puts("\n");
    fw_exit(2);
}

/* Single direct-mode trap vector: saves caller-saved registers, calls handle_trap, mret. */
__attribute__((interrupt("machine"), aligned(4))) void trap_entry(void)
{
    uint32_t mcause, mepc;
    __asm__ volatile("csrr %0, mcause" : "=r"(mcause));
    __asm__ volatile("csrr %0, mepc" : "=r"(mepc));
    handle_trap(mcause, mepc);
}
