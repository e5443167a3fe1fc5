"""Python models of the board UARTs, hooked only on their MMIO pages (``mmio_map``).

Each model is a small register file. A model talks to its machine through a
:class:`Host` (console output, interrupt lines, virtual time) and keeps its whole
state in plain ints/bytes so a snapshot can carry it (``get_state``/``set_state``).
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Protocol

from machineserver.server.drivers.base import PeripheralSpec


class Host(Protocol):
    def console_out(self, data: bytes) -> None: ...

    def set_irq(self, irq: int, level: bool) -> None: ...

    def now_cycles(self) -> int: ...


class Peripheral:
    """A memory-mapped device model. Offsets are relative to ``spec.base``."""

    model = ""

    def __init__(self, spec: PeripheralSpec, host: Host) -> None:
        self.spec = spec
        self.host = host

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def get_state(self) -> dict[str, Any]:
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        pass


class Uart(Peripheral):
    """Common part: an RX FIFO fed by the session console, TX bytes to the console."""

    def __init__(self, spec: PeripheralSpec, host: Host) -> None:
        super().__init__(spec, host)
        self.rx: collections.deque[int] = collections.deque()
        self._rx_lock = threading.Lock()
        self.reset()

    def feed(self, data: bytes) -> None:
        """Console input (any thread)."""
        with self._rx_lock:
            self.rx.extend(data)
        self.update_irq()

    def can_receive(self) -> bool:
        """Whether the receiver takes a byte now (lock-step console links): its receive
        side is empty."""
        return not self.rx

    def clear_rx(self) -> None:
        with self._rx_lock:
            self.rx.clear()

    def pop_rx(self) -> int | None:
        with self._rx_lock:
            return self.rx.popleft() if self.rx else None

    def update_irq(self) -> None:
        pass

    def regs(self) -> dict[str, int]:
        return {}

    def get_state(self) -> dict[str, Any]:
        with self._rx_lock:
            return {"regs": self.regs(), "rx": bytes(self.rx).hex()}

    def set_state(self, state: dict[str, Any]) -> None:
        for k, v in state.get("regs", {}).items():
            setattr(self, k, int(v))
        with self._rx_lock:
            self.rx = collections.deque(bytes.fromhex(state.get("rx", "")))
        self.update_irq()


class Pl011(Uart):
    """ARM PL011 (lm3s6965evb). TX always ready; RX FIFO; IMSC/RIS/MIS/ICR interrupts."""

    model = "uart-pl011"
    _ID = (0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)
    RX_INT, TX_INT = 1 << 4, 1 << 5

    def reset(self) -> None:
        self.cr, self.lcrh, self.ibrd, self.fbrd, self.ifls = 0x300, 0, 0, 0, 0x12
        self.imsc, self.ris, self.dmacr = 0, 0, 0

    def regs(self) -> dict[str, int]:
        names = ("cr", "lcrh", "ibrd", "fbrd", "ifls", "imsc", "ris", "dmacr")
        return {k: getattr(self, k) for k in names}

    def _level(self) -> int:
        return self.ris | (self.RX_INT if self.rx else 0)

    def update_irq(self) -> None:
        if self.spec.irq is not None:
            self.host.set_irq(self.spec.irq, bool(self._level() & self.imsc))

    def read(self, offset: int, size: int) -> int:
        if offset == 0x00:
            b = self.pop_rx()
            self.update_irq()
            return 0 if b is None else b
        if offset == 0x18:  # FR: TXFE(7) | RXFE(4) when empty
            return 0x80 | (0 if self.rx else 0x10)
        if 0xFE0 <= offset < 0x1000:
            return self._ID[(offset - 0xFE0) >> 2]
        return {
            0x24: self.ibrd, 0x28: self.fbrd, 0x2C: self.lcrh, 0x30: self.cr, 0x34: self.ifls,
            0x38: self.imsc, 0x3C: self._level(), 0x40: self._level() & self.imsc, 0x48: self.dmacr,
        }.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x00:
            self.host.console_out(bytes((value & 0xFF,)))
            self.ris |= self.TX_INT
        elif offset == 0x44:  # ICR
            self.ris &= ~value
        elif offset in (0x24, 0x28, 0x2C, 0x30, 0x34, 0x38, 0x48):
            attr = {0x24: "ibrd", 0x28: "fbrd", 0x2C: "lcrh", 0x30: "cr", 0x34: "ifls",
                    0x38: "imsc", 0x48: "dmacr"}[offset]
            setattr(self, attr, value & 0xFFFF)
        self.update_irq()


class CmsdkUart(Uart):
    """ARM CMSDK APB UART (mps2-an385). Like QEMU: TX only while CTRL.TXEN is set."""

    model = "uart-cmsdk"

    def reset(self) -> None:
        self.ctrl, self.bauddiv, self.intstatus = 0, 0, 0

    def regs(self) -> dict[str, int]:
        return {"ctrl": self.ctrl, "bauddiv": self.bauddiv, "intstatus": self.intstatus}

    def can_receive(self) -> bool:
        return not self.rx and bool(self.ctrl & 0x2)  # as QEMU: RX enabled and empty

    def update_irq(self) -> None:
        rx = bool(self.rx) and bool(self.ctrl & 0x8)
        if rx:
            self.intstatus |= 0x2
        if self.spec.irq is not None:
            self.host.set_irq(self.spec.irq, bool(self.intstatus & 0x2))
        tx_irq = self.spec.properties.get("tx_irq")
        if tx_irq is not None:
            self.host.set_irq(int(tx_irq), bool(self.intstatus & 0x1))

    def read(self, offset: int, size: int) -> int:
        if offset == 0x00:
            b = self.pop_rx() if self.ctrl & 0x2 else None
            self.update_irq()
            return 0 if b is None else b
        if offset == 0x04:  # STATE: TXFULL(0)=0, RXFULL(1)
            return 0x2 if (self.rx and self.ctrl & 0x2) else 0
        if offset == 0x08:
            return self.ctrl
        if offset == 0x0C:
            return self.intstatus
        if offset == 0x10:
            return self.bauddiv
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x00:
            if self.ctrl & 0x1:
                self.host.console_out(bytes((value & 0xFF,)))
                if self.ctrl & 0x4:
                    self.intstatus |= 0x1
        elif offset == 0x08:
            self.ctrl = value & 0x7F
        elif offset == 0x0C:
            self.intstatus &= ~value
        elif offset == 0x10:
            self.bauddiv = value & 0xFFFFF
        self.update_irq()


class Stm32Usart(Uart):
    """STM32F4 USART (netduinoplus2). SR.TXE/TC always set; RXNE from the FIFO."""

    model = "uart-stm32"

    def reset(self) -> None:
        self.brr, self.cr1, self.cr2, self.cr3, self.gtpr = 0, 0, 0, 0, 0

    def regs(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("brr", "cr1", "cr2", "cr3", "gtpr")}

    def update_irq(self) -> None:
        if self.spec.irq is not None:
            level = (bool(self.rx) and bool(self.cr1 & 0x20)) or bool(self.cr1 & 0x80)
            self.host.set_irq(self.spec.irq, level and bool(self.cr1 & 0x2000))

    def read(self, offset: int, size: int) -> int:
        if offset == 0x00:
            return 0xC0 | (0x20 if self.rx else 0)
        if offset == 0x04:
            b = self.pop_rx()
            self.update_irq()
            return 0 if b is None else b
        return {0x08: self.brr, 0x0C: self.cr1, 0x10: self.cr2, 0x14: self.cr3,
                0x18: self.gtpr}.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x04:
            self.host.console_out(bytes((value & 0xFF,)))
        elif offset in (0x08, 0x0C, 0x10, 0x14, 0x18):
            attr = {0x08: "brr", 0x0C: "cr1", 0x10: "cr2", 0x14: "cr3", 0x18: "gtpr"}[offset]
            setattr(self, attr, value & 0xFFFF)
        self.update_irq()


class SifiveUart(Uart):
    """SiFive UART (sifive_e): TXDATA.full never set; RXDATA pops (bit 31 = empty).
    Its interrupt goes through the PLIC, which is not modelled: ``ie``/``ip`` are kept
    as registers only."""

    model = "uart-sifive"

    def reset(self) -> None:
        self.txctrl, self.rxctrl, self.ie, self.div = 0, 0, 0, 0

    def regs(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("txctrl", "rxctrl", "ie", "div")}

    def read(self, offset: int, size: int) -> int:
        if offset == 0x04:
            b = self.pop_rx()
            return 0x80000000 if b is None else b
        if offset == 0x14:  # IP: txwm always, rxwm when data
            return 0x1 | (0x2 if self.rx else 0)
        return {0x08: self.txctrl, 0x0C: self.rxctrl, 0x10: self.ie, 0x18: self.div}.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x00:
            self.host.console_out(bytes((value & 0xFF,)))
        elif offset in (0x08, 0x0C, 0x10, 0x18):
            setattr(self, {0x08: "txctrl", 0x0C: "rxctrl", 0x10: "ie", 0x18: "div"}[offset], value)


UART_MODELS: dict[str, type[Uart]] = {
    m.model: m for m in (Pl011, CmsdkUart, Stm32Usart, SifiveUart)
}
