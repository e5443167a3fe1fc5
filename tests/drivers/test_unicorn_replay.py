"""Unicorn driver: which address an instruction is about to access (replay.py), so that an
MMIO access interrupted by a slice's stop is recognised when Unicorn runs it again. The
encodings are what arm-none-eabi-as / riscv64-unknown-elf-as produce for each line."""

from __future__ import annotations

import pytest

from machineserver.server.drivers.unicorn.replay import memory_operand_address

REGS = {"a0": 0x11, "a1": 0x2000_0000, "a3": 0x1001_3000, "a5": 0x1001_3000, "sp": 0x8000_3F00,
        "r1": 0x4000_C000, "r2": 3, "r3": 0x4000_4000}


def read(name: str) -> int | None:
    return REGS.get(name)


@pytest.mark.parametrize(("code", "text", "address"), [
    ("d843", "c.lw a4, 4(a5)", 0x1001_3004),
    ("88c7", "c.sw a0, 8(a5)", 0x1001_3008),
    ("3245", "c.lwsp a0, 12(sp)", 0x8000_3F0C),
    ("2ec8", "c.swsp a1, 16(sp)", 0x8000_3F10),
    ("03a5c5ff", "lw a0, -4(a1)", 0x1FFF_FFFC),
    ("0e05", "c.slli a0, 3", None),  # no memory access
])
def test_riscv_loads_and_stores_compressed_or_not(code, text, address):
    assert memory_operand_address("riscv", bytes.fromhex(code), 0x2040_0000, read) == address, text


@pytest.mark.parametrize(("code", "text", "address"), [
    ("9a61", "str r2, [r3, #0x18]", 0x4000_4018),
    ("0878", "ldrb r0, [r1]", 0x4000_C000),
    ("8858", "ldr r0, [r1, r2]", 0x4000_C003),
    ("51f82200", "ldr.w r0, [r1, r2, lsl #2]", 0x4000_C00C),
    ("41f8040c", "str r0, [r1, #-4]", 0x4000_BFFC),
])
def test_thumb_loads_and_stores(code, text, address):
    assert memory_operand_address("arm", bytes.fromhex(code), 0x100, read) == address, text


def test_unreadable_base_register_is_no_answer():
    assert memory_operand_address("riscv", bytes.fromhex("88c7"), 0, lambda name: None) is None
