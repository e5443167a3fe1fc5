ARCH := cortexm
CPU_FLAGS := -mcpu=cortex-m3 -mthumb -mfloat-abi=soft
QEMU_SYSTEM := qemu-system-arm
PROGRAMS := hello crc32 systick fault echo coverage mmio boot_heavy boot_poll assert
