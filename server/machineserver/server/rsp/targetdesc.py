"""Register maps for a gdbstub (QEMU's, OpenOCD's, any GDB server's), built from the
target description it serves (``qXfer:features:read:target.xml`` and the files it
includes), so register numbers are never hard-coded.

Architectures are named by the server's board arch strings (``"arm-cortex-m"``,
``"riscv32"``: the values of ``drivers.base.Arch``, which is a ``str`` enum); this module,
like the rest of :mod:`machineserver.server.rsp`, imports nothing from the server.

Names are the ones the Unicorn backend uses: Cortex-M ``r0``-``r12``, ``sp``, ``lr``,
``pc``, ``xpsr`` (plus ``msp``, ``psp``, ``primask``, ``basepri``, ``faultmask``,
``control`` where the stub describes them: QEMU 7.2 does not, its
``system-registers.xml`` is empty for M-profile); RISC-V ``x0``-``x31`` and ``pc`` plus
the machine-mode CSRs ``mstatus``, ``mie``, ``mip``, ``mtvec``, ``mepc``, ``mcause``,
``mtval`` (and ``mscratch``); ABI names (``a0``, ``sp``, ``fp`` ...) and ``r13``-``r15``
are accepted as aliases.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

ARM_CORTEX_M = "arm-cortex-m"
RISCV32 = "riscv32"

RV_ABI = ["zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "s0", "s1", "a0", "a1", "a2",
          "a3", "a4", "a5", "a6", "a7", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9",
          "s10", "s11", "t3", "t4", "t5", "t6"]
RV_ALIASES = {name: f"x{i}" for i, name in enumerate(RV_ABI)}
RV_ALIASES["fp"] = "x8"
RV_CSRS = ("mstatus", "mie", "mip", "mtvec", "mepc", "mcause", "mtval", "mscratch")

ARM_CORE = (*(f"r{i}" for i in range(13)), "sp", "lr", "pc", "xpsr")
ARM_SYSTEM = ("msp", "psp", "primask", "basepri", "faultmask", "control")
ARM_ALIASES = {"r13": "sp", "r14": "lr", "r15": "pc", "cpsr": "xpsr"}


@dataclass(frozen=True)
class Reg:
    name: str  # our canonical name
    number: int  # gdb register number for p/P
    size: int  # bytes
    in_g: bool  # part of the 'g' packet


@dataclass
class RegisterMap:
    arch: str  # ARM_CORTEX_M or RISCV32
    regs: dict[str, Reg]
    g_layout: list[Reg]  # registers in 'g' order (zero-size ones left out)
    g_size: int
    architecture: str = ""  # the description's <architecture> ("arm", "riscv:rv32"), if any
    features: tuple[str, ...] = field(default_factory=tuple)  # its <feature name=...>s, in order

    def names(self) -> list[str]:
        return list(self.regs)

    def resolve(self, name: str) -> Reg | None:
        n = name.strip().lower()
        aliases = ARM_ALIASES if self.arch == ARM_CORTEX_M else RV_ALIASES
        n = aliases.get(n, n)
        return self.regs.get(n)

    def decode_g(self, data: bytes) -> dict[str, int] | None:
        """Values from a 'g' reply, or None when its size is not what the map expects."""
        if len(data) != self.g_size:
            return None
        out: dict[str, int] = {}
        off = 0
        for reg in self.g_layout:
            out[reg.name] = int.from_bytes(data[off : off + reg.size], "little")
            off += reg.size
        return out


_INCLUDE = re.compile(rb'<xi:include href="([^"]+)"/>')


async def fetch_register_map(
    arch: str, read_xfer: Callable[[str, str], Awaitable[bytes]]
) -> RegisterMap:
    """Read target.xml (and its includes) through ``read_xfer(object, annex)`` and map
    its registers for ``arch`` (ARM_CORTEX_M or RISCV32)."""
    top = await read_xfer("features", "target.xml")
    docs = [top]
    for href in _INCLUDE.findall(top):
        docs.append(await read_xfer("features", href.decode()))
    raw: list[tuple[str, int, int, str]] = []  # name, regnum, bits, feature
    architecture = ""
    feature_names: list[str] = []
    number = 0
    for doc in docs:
        text = _INCLUDE.sub(b"", doc)
        text = re.sub(rb"<!DOCTYPE[^>]*>", b"", text)
        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            continue
        arch_element = root.find("architecture")
        if arch_element is not None and arch_element.text and not architecture:
            architecture = arch_element.text.strip()
        features = [root] if root.tag == "feature" else list(root.iter("feature"))
        for feat in features:
            feature_names.append(feat.attrib.get("name", ""))
            for reg in feat.iter("reg"):
                if "regnum" in reg.attrib:
                    number = int(reg.attrib["regnum"])
                raw.append((reg.attrib["name"], number, int(reg.attrib.get("bitsize", "32")),
                            feat.attrib.get("name", "")))
                number += 1
    regmap = _build(arch, raw)
    regmap.architecture = architecture
    regmap.features = tuple(feature_names)
    return regmap


def _build(arch: str, raw: list[tuple[str, int, int, str]]) -> RegisterMap:
    core_feature = raw[0][3] if raw else ""
    regs: dict[str, Reg] = {}
    g_layout: list[Reg] = []
    if arch == ARM_CORTEX_M:
        wanted = set(ARM_CORE) | set(ARM_SYSTEM)
        order = list(ARM_CORE) + list(ARM_SYSTEM)
        canon = {n: n for n in wanted}
    else:
        wanted = {f"x{i}" for i in range(32)} | {"pc"} | set(RV_CSRS)
        order = [f"x{i}" for i in range(32)] + ["pc", *RV_CSRS]
        canon = {**{n: n for n in wanted}, **RV_ALIASES}
    found: dict[str, Reg] = {}
    for name, num, bits, feature in raw:
        in_g = feature == core_feature
        c = canon.get(name.lower())
        reg = Reg(c or name.lower(), num, bits // 8, in_g)
        if in_g and reg.size:
            g_layout.append(reg)
        if c and c in wanted and c not in found:
            found[c] = reg
    for name in order:
        if name in found:
            regs[name] = found[name]
    g_layout.sort(key=lambda r: r.number)
    return RegisterMap(arch, regs, g_layout, sum(r.size for r in g_layout))
