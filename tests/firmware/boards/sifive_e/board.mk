ARCH := riscv
CPU_FLAGS := -march=rv32imac_zicsr -mabi=ilp32 -mcmodel=medany
QEMU_SYSTEM := qemu-system-riscv32
PROGRAMS := hello crc32 timer fault echo coverage mmio
