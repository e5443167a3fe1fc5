ARCH := cortexm
CPU_FLAGS := -mcpu=cortex-m3 -mthumb -mfloat-abi=soft
QEMU_SYSTEM := qemu-system-arm
PROGRAMS := hello crc32 systick fault echo coverage mmio \
    cosim_ping cosim_pong cosim_chatter cosim_responder ring0 ring1 ring2 cosim_spin assert
