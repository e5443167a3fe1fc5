/* boot_poll: boot_heavy whose boot also polls a peripheral status register every 8th
 * round (about 1 M instructions in all, ~10,000 of them status reads), like a boot that
 * waits on clock, PLL or flash ready flags. Same protocol as boot_heavy ("ready", then
 * 'g' -> "result=72c8a908"). */
#define BOOT_POLL_EVERY 8u
#define BOOT_ROUNDS 85000u
#include "boot_heavy.c"
