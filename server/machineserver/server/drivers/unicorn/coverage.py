"""Coverage on Unicorn: the Coverage capability over the block collector of
:mod:`.collector` (a native block callback with exact block and edge counts, or
first-hit collection at translation time).

Collection runs between ``coverage_start`` and ``coverage_stop``, or from power-on when
``MachineOptions.extra["coverage"] == "1"`` (as the QEMU backend). The table outlives power
cycles (it lives in the context and is attached to each new engine); ``coverage_stop``
freezes what was collected; ``coverage_reset`` empties it. Reading works while off.

What it reports (counting mode): blocks whose per-address counts are exact execution
counts (split where a slice stopped inside a block, see :mod:`.collector`), and edges
``(last instruction of the block left, start of the block entered) -> count``, so a
conditional branch's taken and not-taken counts are the counts of its two edges.

The trace tail (``coverage_trace``): the starts of the last blocks entered while collecting,
kept by the native block callback in counting mode (None in first-hit mode, unless
``MachineOptions.extra["coverage_trace"] = "python"`` asks for the slow Python fallback;
``"off"``: none; see :mod:`.collector`). Start and reset empty it; stop freezes it with the rest.
"""

from __future__ import annotations

from machineserver.server.drivers.base import TRACE_TAIL_MAX, Arch, Blocks, Coverage, Edges
from machineserver.server.drivers.unicorn.collector import Collector, edges_by_branch, split_at_cuts
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext


class UnicornCoverage(Coverage):
    def __init__(self, ctx: MachineContext) -> None:
        self._ctx = ctx
        self._active = ctx.options.extra.get("coverage") == "1"
        self._frozen: tuple[Blocks, Edges] | None = None  # what coverage_stop kept
        self._frozen_trace: list[int] | None = None  # the trace tail coverage_stop kept
        self._last_insn: dict[tuple[int, int], int] = {}  # (block, size) -> last instruction

    def _collector(self) -> Collector:
        if self._ctx.collector is None:
            extra = self._ctx.options.extra
            self._ctx.collector = Collector(first_hit=extra.get("coverage_mode") == "first-hit",
                                            python_trace=extra.get("coverage_trace") == "python",
                                            trace=extra.get("coverage_trace") != "off")
        return self._ctx.collector

    @property
    def method(self) -> str:
        return self._collector().method

    # ------------------------------------------------------------------ for the machine
    def attach(self, inst: BoardInstance) -> None:
        """A new engine (power_on; the lock is held): collect on it if collecting."""
        if self._active:
            self._collector().attach(inst.uc, inst.blocks)
            inst.uc.ctl_flush_tb()

    def detach(self) -> None:
        """The engine goes away (power_off; the lock is held)."""
        if self._ctx.collector is not None:
            self._ctx.collector.detach()

    def _collected(self, inst: BoardInstance | None) -> tuple[Blocks, Edges]:
        """Blocks with exact per-address counts (entries with no count left dropped in
        counting mode) and edges by branch instruction."""
        collector = self._collector()
        raw = collector.collected()

        def read(address: int, size: int) -> bytes:
            assert inst is not None
            return bytes(inst.uc.mem_read(address, size))

        edges = edges_by_branch(raw.edges, raw.blocks, read if inst is not None else None,
                                self._ctx.board.arch == Arch.ARM_CORTEX_M, self._last_insn)
        if not collector.counting:
            return raw.blocks, edges
        blocks = split_at_cuts(raw.blocks, raw.cuts)
        return {a: v for a, v in blocks.items() if v[1] > 0}, edges

    # ------------------------------------------------------------------ Coverage
    async def coverage_start(self) -> None:
        def start(inst: BoardInstance | None) -> None:
            collector = self._collector()
            collector.clear()
            self._last_insn.clear()
            if inst is not None and not collector.attached:
                collector.attach(inst.uc, inst.blocks)
                inst.uc.ctl_flush_tb()
            elif inst is not None and not collector.counting:
                inst.uc.ctl_flush_tb()  # first-hit: what runs next must be translated again
            self._active = True
            self._frozen = None
            self._frozen_trace = None

        await self._ctx.locked_any("start coverage", start)

    async def coverage_stop(self) -> None:
        def stop(inst: BoardInstance | None) -> None:
            if self._frozen is None:
                self._frozen = self._collected(inst) if self._active else ({}, {})
                trace = self._collector().trace(TRACE_TAIL_MAX) if self._active else []
                self._frozen_trace = trace if trace is not None else []
            self._active = False
            collector = self._ctx.collector
            if collector is not None and collector.attached:
                collector.detach()
                if inst is not None:
                    inst.uc.ctl_flush_tb()  # blocks translated with the hook keep calling it

        await self._ctx.locked_any("stop coverage", stop)

    async def coverage_reset(self) -> None:
        def reset(inst: BoardInstance | None) -> None:
            collector = self._collector()
            collector.clear()
            self._last_insn.clear()
            if self._active and inst is not None and not collector.counting:
                inst.uc.ctl_flush_tb()
            if self._frozen is not None:
                self._frozen = ({}, {})
                self._frozen_trace = []

        await self._ctx.locked_any("reset coverage", reset)

    async def _reported(self) -> tuple[Blocks, Edges]:
        """What is reported: the frozen result once stopped, nothing before a start, else
        what was collected so far (blocks and edges are worked out together)."""
        if self._frozen is not None:
            blocks, edges = self._frozen
            return dict(blocks), dict(edges)
        if not self._active:
            return {}, {}
        return await self._ctx.locked_any("read coverage", self._collected)

    async def coverage_blocks(self) -> Blocks:
        """Executed blocks since coverage_start/reset: exact execution counts with the
        native counter, 0 (executed) in first-hit mode."""
        blocks, _ = await self._reported()
        return blocks

    async def coverage_edges(self) -> Edges:
        """Control transfers seen since coverage_start/reset: (address of the last
        instruction of the block left, start of the block entered) -> how many times.
        Every transfer, counted, with the native counter; only the first way into each
        block, count 0 (taken, count unknown), in first-hit mode."""
        _, edges = await self._reported()
        return edges

    async def coverage_trace(self, count: int) -> list[int] | None:
        """Starts of the last ``count`` (at most TRACE_TAIL_MAX) blocks entered since
        coverage_start/reset, oldest first (frozen at coverage_stop); None in first-hit
        mode without the Python fallback."""
        count = max(0, min(count, TRACE_TAIL_MAX))
        if not self._collector().keeps_trace:
            return None
        if self._frozen_trace is not None:
            return self._frozen_trace[-count:] if count else []
        if not self._active:
            return []
        return await self._ctx.locked_any("read the trace", lambda _inst: self._collector().trace(count))
