/* crc32: compute benchmark. Bitwise CRC-32 (reflected, poly 0xEDB88320,
 * init 0xFFFFFFFF, final xor 0xFFFFFFFF, i.e. zlib.crc32) over CRC_ROUNDS
 * concatenated copies of a CRC_BUF_LEN-byte buffer filled by an LCG.
 *
 * Expected output (every board): crc32=0x80f45f04
 * Check on a host:
 *   python3 -c "import zlib;x=1;b=bytearray()
 *   for i in range(4096): x=(x*1103515245+12345)&0xffffffff; b.append(x>>16&0xff)
 *   print(hex(zlib.crc32(bytes(b)*300)))"
 */
#include "fw.h"

#define CRC_BUF_LEN 4096
#define CRC_ROUNDS 300

static uint8_t buf[CRC_BUF_LEN];

static void fill(void)
{
    uint32_t x = 1;
    for (int i = 0; i < CRC_BUF_LEN; i++) {
        x = x * 1103515245u + 12345u;
        buf[i] = (uint8_t)(x >> 16);
    }
}

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, int n)
{
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return crc;
}

int main(void)
{
    fill();
    uint32_t crc = 0xFFFFFFFFu;
    for (int r = 0; r < CRC_ROUNDS; r++)
        crc = crc32_update(crc, buf, CRC_BUF_LEN);
    crc ^= 0xFFFFFFFFu;
    fw_puts("crc32=0x");
    fw_put_hex32(crc);
    fw_puts("\n");
    return 0;
}
