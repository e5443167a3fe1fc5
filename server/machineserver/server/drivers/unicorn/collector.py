"""The block collector behind the Unicorn Coverage part (:mod:`.coverage`): basic-block
coverage without Python in the hot path.

Measured on crc32 (mps2-an385 / sifive_e, a tight CRC loop: the worst case; run to
exit, median of 9, ~30-45 ms without coverage):

============================================  ===========  ==============================
collector                                      slow-down    what it gives
============================================  ===========  ==============================
Python ``UC_HOOK_BLOCK`` callback              ~150x        counts
native ``UC_HOOK_BLOCK`` (C, counts only)      ~1.7-2.0x    exact counts
native ``UC_HOOK_BLOCK`` + edge counts (used)  ~2.0-2.3x    exact counts, exact edge counts
``UC_HOOK_EDGE_GENERATED`` (translation)       ~1.0x        first hit only, edges approx.
============================================  ===========  ==============================

* **counting** (the default): a C callback (``native/ucblocks.c``) on ``UC_HOOK_BLOCK``
  (the engine's exact instruction counter's own hook, :mod:`.blockcount`, which feeds the
  table: one block hook for both; a hook of its own only where there is no counter),
  passed to ``uc_hook_add`` by address, counts every entry into a translated block in an
  open-addressing hash table (start -> size, count) and every transition (previous block
  -> this block) in a second one. A per-block "last successor" cache (the successor and
  its edge entry) makes a transition that repeats (a loop) one compare and one add. The
  library is compiled on first use with the host's C compiler into a per-user cache
  (like the QEMU plugin), against ``unicorn/include`` types only; it links nothing.
* **first-hit** (``MachineOptions.extra["coverage_mode"] = "first-hit"``, or when no C
  compiler is available): ``UC_HOOK_EDGE_GENERATED`` fires once per *translation* of a
  block, with the block it came from; coverage start flushes the translation cache so
  everything that runs afterwards is translated (and seen) again. Counts are 0
  ("executed, count unknown"); blocks are those translated, which is those entered
  (a block cut short by a fault still counts as executed); edges are only the ones that
  caused a translation (the first way into each block), so a successor reached first
  from elsewhere is missing. Uses the native callback when built, a Python one (which
  runs at translation time only, so is as cheap) otherwise.

Unicorn instruments blocks when it translates them, so the caller flushes the
translation cache (``uc.ctl_flush_tb()``) after :meth:`Collector.attach` /
:meth:`Collector.detach`.

What a "block" is: a translated block (TB). Blocks may overlap (a jump into the middle
of a block's range starts a block there); an address's execution count is the sum of
the counts of the blocks holding it (see ``drivers.base.Blocks``).

Exact counts across slice ends. Unicorn calls the block hook *before* the block's
exit-request check, and a slice may end anywhere (an instruction count, a breakpoint's
or watchpoint's code hook, an MMIO access that is restarted, a fault, a semihosting
exit, the watchdog): the hook has counted an entry whose instructions from the stop pc
on did not run. So after every slice the run engine calls :meth:`Collector.slice_ended`
with the pc it stopped at, on the rule "a machine halted at pc has not executed pc":

* pc inside the last block entered: a *cut* (block, pc) is recorded: that entry ran
  [start, pc) only (pc == start: nothing). When :meth:`Collector.blocks` reports the
  block, it splits it at its cuts so every address keeps its exact count; what runs
  from pc on after the stop is a block of its own (Unicorn translates one starting at
  pc), with no transition into it (none happened).
* pc outside it: the block ran to its end and control passed to pc before the next
  hook fired; that transition is counted now, so it is not lost if the next block is an
  interrupt handler, and not counted twice when pc's block is entered.

One case reads the same and is not: a slice ended asynchronously (the watchdog) at the
first, not yet chained, transition from a block back to its own start or into its own
range goes through Unicorn's main loop, which stops there *before* the hook: it is taken
for an entry that ran nothing, so that block counts one too few (and the transition is
missed). Chained transitions (every one after the first) go through the hook first.

The trace tail (:meth:`Collector.trace`): in counting mode the native block callback also
keeps the start of each block entered in a ring of the last ``TRACE_TAIL_MAX`` entries (one
store per block: no measurable cost next to the counting, see scripts/bench's coverage
section). An entry that ran nothing (a slice that stopped at the block's start, see
above) is taken back at :meth:`Collector.slice_ended`, so a breakpoint at a block's start
does not put that block in the trace twice. First-hit mode sees translations, not
entries: it keeps no trace, unless the machine asks for the **Python fallback**
(``MachineOptions.extra["coverage_trace"] = "python"``), a Python ``UC_HOOK_BLOCK``
callback that feeds the same ring (a deque) with the same rule at slice ends; it costs
what a Python block hook costs (~150x on a tight loop), so it is for hosts without a C
compiler that need the trace, never the default. ``coverage_trace = "off"`` keeps no
trace (the native callback without the ring's store).

All table access happens on the emulating thread or between slices under the
machine's lock, never concurrently.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unicorn import unicorn_const as ucc

from machineserver.server.drivers import native
from machineserver.server.drivers.base import TRACE_TAIL_MAX, Blocks, Edges, merge_blocks
from machineserver.server.drivers.unicorn.arch import Engine, native_handle

if TYPE_CHECKING:
    from machineserver.server.drivers.unicorn.blockcount import BlockCounter

SOURCE = Path(__file__).resolve().parent / "native" / "ucblocks.c"

# (block start, pc, count): entries of a block that stopped at pc (see slice_ended)
Cuts = list[tuple[int, int, int]]


@dataclass(frozen=True)
class Collected:
    """What the table holds, as the collector recorded it."""

    blocks: Blocks  # translated blocks as entered (start -> size, entries)
    edges: Edges  # (source block start, target block start) -> count (0 in first-hit mode)
    cuts: Cuts


@dataclass(frozen=True)
class NativeStatus:
    lib: Any  # the loaded ctypes.CDLL, None when unavailable
    path: str = ""
    reason: str = ""


def _load(path: Path) -> Any:
    lib = ctypes.CDLL(str(path))
    vp, u64, u32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32
    for name, res, args in (
        ("ucb_new", vp, []), ("ucb_free", None, [vp]), ("ucb_clear", None, [vp]),
        ("ucb_forget_last", None, [vp]), ("ucb_set_edges", None, [vp, u32]),
        ("ucb_stop", None, [vp, u64]),
        ("ucb_nblocks", u64, [vp]), ("ucb_nedges", u64, [vp]), ("ucb_ncuts", u64, [vp]),
        ("ucb_oom", u32, [vp]),
        ("ucb_dump_blocks", u64, [vp, ctypes.POINTER(u64), u64]),
        ("ucb_dump_edges", u64, [vp, ctypes.POINTER(u64), u64]),
        ("ucb_dump_cuts", u64, [vp, ctypes.POINTER(u64), u64]),
        ("ucb_trace", u64, [vp, ctypes.POINTER(u64), u64]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_lock = threading.Lock()


@functools.cache
def _native_cached() -> NativeStatus:
    path, reason = native.build_cached(SOURCE, "the block counter")
    if path is None:
        return NativeStatus(None, reason=reason)
    try:
        return NativeStatus(_load(path), str(path))
    except (OSError, AttributeError) as exc:
        return NativeStatus(None, reason=f"cannot load {path}: {exc}")


def native_status() -> NativeStatus:
    """The native collector, built on first call (thread-safe; cached for the process)."""
    with _lock:
        return _native_cached()


def add_native_hook(uc: Engine, htype: int, fn_addr: int, user_data: int) -> int:
    """``uc_hook_add`` of a C function (by address) over the whole address space."""
    from unicorn.unicorn_py3.unicorn import uclib

    handle = native_handle(uc)
    if handle is None:
        raise RuntimeError("uc_hook_add on a released engine")
    h = ctypes.c_size_t()
    err = uclib.uc_hook_add(handle, ctypes.byref(h), htype, ctypes.c_void_p(fn_addr),
                            ctypes.c_void_p(user_data), 1, 0)
    if err != ucc.UC_ERR_OK:
        raise RuntimeError(f"uc_hook_add failed ({err})")
    return int(h.value)


def _triples(lib: Any, table: int, count: Callable[[int], int], dump: Callable[..., int]) -> list[tuple[int, int, int]]:
    n = int(count(table))
    buf = (ctypes.c_uint64 * (3 * n + 3))()
    got = int(dump(table, buf, n))
    return [(int(buf[3 * i]), int(buf[3 * i + 1]), int(buf[3 * i + 2])) for i in range(got)]


class Collector:
    """One machine's coverage table; survives power cycles (attach to each new Uc).
    ``python_trace``: keep the trace tail with a Python block hook where the native
    counter does not (first-hit mode, no C compiler): see the module docstring.
    ``trace`` False: keep no trace at all."""

    def __init__(self, first_hit: bool = False, python_trace: bool = False, trace: bool = True) -> None:
        st = native_status()
        self._lib = st.lib
        self.counting = st.lib is not None and not first_hit
        self._traced = trace and self.counting  # the native ring is kept
        if st.lib is not None:
            self._t = st.lib.ucb_new()
            if not self._t:
                raise MemoryError("ucblocks table")
            weakref.finalize(self, st.lib.ucb_free, self._t)
            self.method = ("native-block-hook (exact counts and edge counts)" if self.counting
                           else "native-edge-generated (first hit, count 0)")
        else:
            self._t = None
            self._py_blocks: Blocks = {}
            self._py_edges: Edges = {}
            self.method = f"python-edge-generated (first hit, count 0; {st.reason})"
        # the Python fallback's trace ring and the block its hook saw last (None: none, or
        # the next block does not follow it)
        self._py_trace: deque[int] | None = None
        self._py_last: int | None = None
        if trace and python_trace and not self.counting:
            self._py_trace = deque(maxlen=TRACE_TAIL_MAX + 1)  # + 1: as the native ring's
            self.method += "; trace tail by a Python block hook"
        self._hook: tuple[Engine, list[int]] | None = None  # (uc, hook handles)
        self._feeder: BlockCounter | None = None  # the engine's block counter feeding the table

    @property
    def attached(self) -> bool:
        return self._hook is not None

    @property
    def keeps_trace(self) -> bool:
        """Whether :meth:`trace` has a trace to give (counting mode, or the Python fallback)."""
        return self._traced or self._py_trace is not None

    def attach(self, uc: Engine, blocks: BlockCounter | None = None) -> None:
        """Collect on ``uc``. In counting mode with the engine's block counter
        (``blocks``, :mod:`.blockcount`), its hook feeds the table: no second block hook."""
        if self._hook is not None and self._hook[0] is uc:
            return
        handles = []
        if self._t is not None and self.counting and blocks is not None:
            blocks.set_coverage(self._t, self._traced)
            self._feeder = blocks
            self._lib.ucb_forget_last(self._t)
        elif self._t is not None:
            lib = self._lib
            fn = (lib.ucb_block if self._traced else lib.ucb_block_untraced) if self.counting else lib.ucb_edge
            htype = ucc.UC_HOOK_BLOCK if self.counting else ucc.UC_HOOK_EDGE_GENERATED
            address = ctypes.cast(fn, ctypes.c_void_p).value
            assert address is not None  # a symbol of a loaded library
            handles.append(add_native_hook(uc, htype, address, self._t))
            lib.ucb_forget_last(self._t)
        else:
            handles.append(uc.hook_add(ucc.UC_HOOK_EDGE_GENERATED, self._py_edge))
        if self._py_trace is not None:
            self._py_last = None
            handles.append(uc.hook_add(ucc.UC_HOOK_BLOCK, self._py_block))
        self._hook = (uc, handles)

    def detach(self) -> None:
        """Remove the hooks. The caller detaches before it releases the engine (a released
        engine's hooks are gone with it: then this only forgets)."""
        hook, self._hook = self._hook, None
        feeder, self._feeder = self._feeder, None
        if feeder is not None:
            feeder.set_coverage(None, False)
        if hook is None:
            return
        uc, handles = hook
        if native_handle(uc) is not None:
            for h in handles:
                with contextlib.suppress(Exception):
                    uc.hook_del(h)

    def _py_edge(self, uc: Any, cur: Any, prev: Any, _ud: Any) -> None:
        try:
            b = self._py_blocks
            if cur.pc not in b or b[cur.pc][0] < cur.size:
                b[cur.pc] = (int(cur.size), 0)
            if prev is not None and prev.size:
                if prev.pc not in b or b[prev.pc][0] < prev.size:
                    b[prev.pc] = (int(prev.size), 0)
                self._py_edges[(int(prev.pc), int(cur.pc))] = 0
        except Exception:  # never let an exception reach Unicorn
            pass

    def _py_block(self, uc: Any, address: int, size: int, _ud: Any) -> None:
        trace = self._py_trace
        if trace is not None:
            trace.append(address)
            self._py_last = address

    def clear(self) -> None:
        if self._t is not None:
            self._lib.ucb_clear(self._t)
        else:
            self._py_blocks.clear()
            self._py_edges.clear()
        if self._py_trace is not None:
            self._py_trace.clear()
            self._py_last = None

    def forget_last(self) -> None:
        """The next block does not follow the last one (reset, restore, PC written)."""
        if self._t is not None:
            self._lib.ucb_forget_last(self._t)
        self._py_last = None

    def slice_ended(self, pc: int) -> None:
        """An emulation slice ended with the machine at ``pc`` (not executed): see the
        module docstring. The run engine calls it after every ``emu_start``."""
        if self._hook is None:
            return
        if self._t is not None and self.counting:
            self._lib.ucb_stop(self._t, pc)
        trace, last, self._py_last = self._py_trace, self._py_last, None
        if trace is not None and last == pc and trace and trace[-1] == pc:
            trace.pop()  # that entry ran nothing

    def trace(self, count: int) -> list[int] | None:
        """The start addresses of the last ``count`` (<= ``TRACE_TAIL_MAX``) blocks entered,
        oldest first; None when this collector keeps no trace (first-hit mode)."""
        count = max(0, min(count, TRACE_TAIL_MAX))
        if self._py_trace is not None:
            return list(self._py_trace)[-count:] if count else []
        if not self._traced:
            return None
        buf = (ctypes.c_uint64 * max(count, 1))()
        got = int(self._lib.ucb_trace(self._t, buf, count))
        return [int(buf[i]) for i in range(got)]

    @property
    def overflowed(self) -> bool:
        return bool(self._t is not None and self._lib.ucb_oom(self._t))

    def collected(self) -> Collected:
        if self._t is None:
            return Collected(dict(self._py_blocks), dict(self._py_edges), [])
        lib, t = self._lib, self._t
        blocks = {start: (size, count) for start, size, count in _triples(lib, t, lib.ucb_nblocks, lib.ucb_dump_blocks)}
        edges = {(src, dst): count for src, dst, count in _triples(lib, t, lib.ucb_nedges, lib.ucb_dump_edges)}
        return Collected(blocks, edges, _triples(lib, t, lib.ucb_ncuts, lib.ucb_dump_cuts))


def split_at_cuts(blocks: Blocks, cuts: Cuts) -> Blocks:
    """The blocks with every cut applied, as blocks whose counts are exact per address: a
    block [start, end) entered n times with c entries stopped at pc becomes [start, pc)
    with n and [pc, end) with n - c (several cuts: several pieces). Pieces with no count
    left are dropped; a piece that starts where another block does is merged with it
    (``merge_blocks`` keeps per-address counts)."""
    by_block: dict[int, dict[int, int]] = {}
    for start, pc, count in cuts:
        stops = by_block.setdefault(start, {})
        stops[pc] = stops.get(pc, 0) + count
    out: Blocks = {}
    for start, (size, count) in sorted(blocks.items()):
        cut = by_block.get(start)
        if not cut:
            merge_blocks(out, {start: (size, count)})
            continue
        bounds = sorted({start, *(pc for pc in cut if start < pc < start + size), start + size})
        left = count
        for lo, hi in itertools.pairwise(bounds):
            left -= cut.get(lo, 0)
            if left > 0:
                merge_blocks(out, {lo: (hi - lo, left)})
    return out


def last_instruction(start: int, size: int, read: Callable[[int, int], bytes] | None,
                     thumb: bool) -> int:
    """Address of the last instruction of the block [start, start+size): decode the
    instruction lengths (Thumb: 32-bit when the first halfword is 0b11101/11110/11111...;
    RISC-V: 32-bit when the low two bits are 11). Without memory, assume 2 bytes."""
    if size <= 2:
        return start
    code = b""
    if read is not None:
        with contextlib.suppress(Exception):
            code = read(start, size)
    if len(code) < size:
        return start + size - 2
    pos = last = 0
    while pos + 1 < size:
        last = pos
        h = code[pos] | code[pos + 1] << 8
        wide = (h >> 11) in (0x1D, 0x1E, 0x1F) if thumb else (h & 3) == 3
        pos += 4 if wide else 2
    return start + last


def edges_by_branch(raw: Mapping[tuple[int, int], int], blocks: Blocks,
                    read: Callable[[int, int], bytes] | None, thumb: bool,
                    cache: dict[tuple[int, int], int]) -> Edges:
    """(source block start, target) -> count, as (the source block's last instruction,
    target) -> count (summed where blocks of different starts end at the same
    instruction, e.g. a block and the rest of it after a cut). ``blocks``: the blocks as
    entered (before cuts), for their sizes."""
    out: Edges = {}
    for (src, dst), count in raw.items():
        size = blocks.get(src, (0, 0))[0]
        key = (src, size)
        addr = cache.get(key)
        if addr is None:
            addr = last_instruction(src, size, read, thumb) if size else src
            if read is not None:
                cache[key] = addr
        out[(addr, dst)] = out.get((addr, dst), 0) + count
    return out
