#!/bin/sh
# Run one test firmware under real QEMU.
#   tests/firmware/run-qemu.sh BOARD PROGRAM [extra qemu args...]
# UART0 is on stdin/stdout (pipe input for `echo`); the script's exit status
# is the firmware's semihosting exit code. Set TIMEOUT (seconds, default 10)
# to change the wall-clock limit (exit 124 when it expires).
# ELF is taken from build/BOARD/PROGRAM.elf, else prebuilt/BOARD/PROGRAM.elf.
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 BOARD PROGRAM [extra qemu args...]" >&2
    exit 2
fi
board=$1
program=$2
shift 2

here=$(cd "$(dirname "$0")" && pwd)
elf=$here/build/$board/$program.elf
[ -f "$elf" ] || elf=$here/prebuilt/$board/$program.elf
if [ ! -f "$elf" ]; then
    echo "run-qemu.sh: no $board/$program.elf (run make -C tests/firmware)" >&2
    exit 2
fi

case $board in
    lm3s6965evb | mps2-an385 | netduinoplus2) qemu=qemu-system-arm ;;
    sifive_e) qemu=qemu-system-riscv32 ;;
    *)
        echo "run-qemu.sh: unknown board $board" >&2
        exit 2
        ;;
esac

run() {
    timeout "${TIMEOUT:-10}" "$qemu" -M "$board" -nographic -monitor none \
        -semihosting-config enable=on,target=native \
        -kernel "$elf" "$@"
}

# QEMU's STM32 USART drops received bytes until the firmware sets CR1.UE|RE,
# and piped input is delivered the moment QEMU starts: hold it back a little.
if [ "$board" = netduinoplus2 ] && { [ -p /dev/stdin ] || [ -f /dev/stdin ]; }; then
    { sleep "${INPUT_DELAY:-0.3}"; cat; } | run "$@"
else
    run "$@"
fi
