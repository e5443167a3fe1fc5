"""Basic-block coverage of a QEMU machine: the adapter over our plugin's coverage tables
(:mod:`.blocktable`).

Only for machines created with ``MachineOptions.extra["coverage"] == "1"`` (the table's
inline counters cost ~+25 % run time; other machines never get one): every QEMU such a
machine starts gets a table of its own (``blocks-N.bin`` in the machine's coverage
directory). A restart (reset or load after an exit, snapshot restore) starts a new
table; the old one is folded into the machine's totals, so coverage spans restarts.
Counting starts at power-on; ``coverage_start``/``coverage_reset`` take a baseline,
``coverage_stop`` freezes the result. Totals, baselines and the frozen result are kept
per translation shape (:data:`.blocktable.Runs`), so they add and subtract exactly; the
blocks handed out have exact per-address counts (see ``drivers.base.Blocks``).

The plugin sees no control transfers: this part reports no edges, and the core derives
branch outcomes from execution counts (core/coverage_mapping.py says when that is exact).

The trace tail (``coverage_trace``): each QEMU also gets a ring file (``trace-N.bin``,
:mod:`.tracering`) where the plugin stores the start of every block executed (a callback
per block: see scripts/bench's coverage section for its cost). Like the totals, the trace
spans restarts (the last ring's tail is kept when the next QEMU starts), starts again at
``coverage_start``/``coverage_reset`` and is frozen by ``coverage_stop``. Machines without
coverage keep no trace (None), nor those created with ``extra["coverage_trace"] = "off"``
(no ring, no callback).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections import deque

from machineserver.server.drivers.base import TRACE_TAIL_MAX, BackendFailed, Blocks, Coverage, NotSupported
from machineserver.server.drivers.qemu.blocktable import (
    Runs,
    Table,
    add_runs,
    read_table,
    runs_since,
    runs_to_blocks,
)
from machineserver.server.drivers.qemu.plugin import plugin_status
from machineserver.server.drivers.qemu.tracering import read_ring

__all__ = ["QemuCoverage", "plugin_status"]


class QemuCoverage(Coverage):
    def __init__(self, *, enabled: bool, trace: bool = True) -> None:
        self.enabled = enabled
        self.traced = enabled and trace  # each QEMU gets a trace ring
        self._dir: str | None = None  # this machine's tables, until power_off
        self._table: str | None = None  # the running QEMU's table
        self._generation = 0
        self._past: Runs = {}  # totals of the tables of earlier QEMUs
        self._past_full = False
        self._baseline: Runs = {}  # totals at coverage_start/reset
        self._frozen: Runs | None = None  # the result at coverage_stop
        self._ring: str | None = None  # the running QEMU's trace ring
        self._ring_base = 0  # entries of that ring written before coverage_start/reset
        self._past_trace: deque[int] = deque(maxlen=TRACE_TAIL_MAX)  # earlier QEMUs' tail
        self._frozen_trace: list[int] | None = None  # the trace tail at coverage_stop

    @property
    def method(self) -> str:
        return "tcg-plugin"

    # ------------------------------------------------------------------ tables
    async def next_table(self) -> dict[str, str]:
        """The plugin's coverage options for the next QEMU ({} without coverage), with a
        table of its own; the last QEMU's table (it has ended) folds into the totals."""
        if not self.enabled:
            return {}
        status = await asyncio.to_thread(plugin_status)
        if status.path is None:
            raise NotSupported(f"coverage is unavailable on this server: {status.reason}")
        if self._table is not None:
            table = await self._read(self._table)
            add_runs(self._past, table.runs)
            self._past_full |= table.full
            with contextlib.suppress(OSError):
                os.unlink(self._table)
            self._table = None
        if self._ring is not None:
            self._past_trace.extend(await self._ring_since_base())
            with contextlib.suppress(OSError):
                os.unlink(self._ring)
            self._ring, self._ring_base = None, 0
        if self._dir is None:
            base = tempfile.gettempdir()
            self._dir = tempfile.mkdtemp(prefix="ms-cov-", dir=base if "," not in base else "/tmp")
        self._generation += 1
        self._table = os.path.join(self._dir, f"blocks-{self._generation}.bin")
        if not self.traced:
            return {"out": self._table}
        self._ring = os.path.join(self._dir, f"trace-{self._generation}.bin")
        return {"out": self._table, "trace": self._ring}

    def discard(self) -> None:
        """Forget everything (power off)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = self._table = self._ring = None
        self._past, self._past_full = {}, False
        self._baseline, self._frozen = {}, None
        self._ring_base = 0
        self._past_trace.clear()
        self._frozen_trace = None

    @staticmethod
    async def _read(path: str) -> Table:
        try:
            return await asyncio.to_thread(read_table, path)
        except (OSError, ValueError) as exc:
            raise BackendFailed(f"cannot read the coverage table {path}: {exc}") from None

    async def _ring_since_base(self) -> list[int]:
        """The running QEMU's ring: the entries written since the baseline, oldest first."""
        if self._ring is None:
            return []
        try:
            ring = await asyncio.to_thread(read_ring, self._ring)
        except (OSError, ValueError) as exc:
            raise BackendFailed(f"cannot read the trace ring {self._ring}: {exc}") from None
        return ring.since(self._ring_base)

    async def _ring_written(self) -> int:
        if self._ring is None:
            return 0
        try:
            return (await asyncio.to_thread(read_ring, self._ring)).written
        except (OSError, ValueError) as exc:
            raise BackendFailed(f"cannot read the trace ring {self._ring}: {exc}") from None

    async def _trace(self) -> list[int]:
        """The trace since the baseline, across restarts, oldest first (<= TRACE_TAIL_MAX)."""
        current = await self._ring_since_base()
        if len(current) >= TRACE_TAIL_MAX:
            return current[-TRACE_TAIL_MAX:]
        keep = TRACE_TAIL_MAX - len(current)
        past = list(self._past_trace)
        return past[len(past) - keep:] + current if keep < len(past) else past + current

    async def _trace_baseline(self) -> None:
        self._ring_base = await self._ring_written()
        self._past_trace.clear()

    async def _totals(self) -> Runs:
        totals = dict(self._past)
        if self._table is not None:
            add_runs(totals, (await self._read(self._table)).runs)
        return totals

    @property
    def coverage_overflowed(self) -> bool:
        """Whether a table filled up (blocks translated after that are not counted)."""
        if self._past_full:
            return True
        return self._table is not None and read_table(self._table).full

    # ------------------------------------------------------------------ Coverage
    def _require(self) -> None:
        if not self.enabled:
            raise NotSupported(
                "coverage was not enabled for this machine: QEMU loads the block-counting "
                'table only for machines created with MachineOptions.extra["coverage"]="1"'
            )

    async def coverage_start(self) -> None:
        self._require()
        self._baseline = await self._totals()
        await self._trace_baseline()
        self._frozen = None
        self._frozen_trace = None

    async def coverage_stop(self) -> None:
        self._require()
        if self._frozen is None:
            self._frozen = runs_since(await self._totals(), self._baseline)
            self._frozen_trace = await self._trace()

    async def coverage_reset(self) -> None:
        self._require()
        self._baseline = await self._totals()
        await self._trace_baseline()
        if self._frozen is not None:
            self._frozen = {}
            self._frozen_trace = []

    async def coverage_blocks(self) -> Blocks:
        self._require()
        if self._frozen is not None:
            return runs_to_blocks(self._frozen)
        return runs_to_blocks(runs_since(await self._totals(), self._baseline))

    async def coverage_trace(self, count: int) -> list[int] | None:
        """Starts of the last ``count`` (at most TRACE_TAIL_MAX) blocks executed since
        coverage_start/reset (since power-on before any), oldest first; frozen at
        coverage_stop. None for a machine without coverage (no ring)."""
        if not self.traced:
            return None
        count = max(0, min(count, TRACE_TAIL_MAX))
        trace = self._frozen_trace if self._frozen_trace is not None else await self._trace()
        return trace[-count:] if count else []
