"""``msctl debug SESSION``: an interactive debugger prompt over the Attach stream, with
the session's console bytes and stop events interleaved. Reads commands from stdin, so a
script can pipe them in (no prompt is printed when stdin is not a terminal)."""

from __future__ import annotations

import queue
import shlex
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

from machineserver.sdk import Client
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as pb

HELP = """commands:
  break|b LOC          breakpoint at a symbol, FILE:LINE or 0xADDR
  watch LOC [SIZE]     write watchpoint (rwatch / awatch: read / access)
  delete|d ID          remove a breakpoint
  continue|c           run until the next stop
  step|s  next|n       one source line, into / over calls
  finish               run until the current function returns
  stepi|si [N]         N instructions (default 1)
  halt                 stop a running session
  regs [NAMES...]      registers
  x ADDR [WORDS]       memory as 32-bit words
  bt                   backtrace
  disas [LOC] [N]      disassembly (default: at pc)
  info                 session state and breakpoints
  quit|q               detach"""


def _location(text: str) -> pb.CodeLocation:
    if text.lower().startswith("0x") or text.isdigit():
        return pb.CodeLocation(address=int(text, 0))
    if ":" in text:
        return pb.CodeLocation(file_line=text)
    return pb.CodeLocation(symbol=text)


def _where(stop: cpb.StopEvent) -> str:
    loc = stop.location
    src = f" {loc.function} at {loc.file}:{loc.line}" if loc.function else ""
    return f"0x{stop.pc:08x}{src}"


def describe_stop(stop: cpb.StopEvent) -> str:
    reason = cpb.StopReason.Name(stop.reason).removeprefix("STOP_REASON_").lower()
    if stop.reason == cpb.STOP_REASON_EXIT:
        return f"[exited with code {stop.exit_code}]"
    if stop.reason == cpb.STOP_REASON_WATCHPOINT:
        return f"[watchpoint 0x{stop.watch_address:08x} = 0x{stop.watch_value:x}] {_where(stop)}"
    if stop.reason == cpb.STOP_REASON_FAULT:
        return f"[fault: {stop.message}] {_where(stop)}"
    return f"[{reason}] {_where(stop)}"


class DebugPrompt:
    def __init__(self, client: Client, session: str, out: TextIO = sys.stdout) -> None:
        self.client = client
        self.session = session if session.startswith("sessions/") else f"sessions/{session}"
        self.out = out
        self._requests: queue.Queue[pb.AttachRequest | None] = queue.Queue()
        self._results: dict[int, queue.Queue[pb.DebugCommandResult]] = {}
        self._tag = 0
        self._lock = threading.Lock()
        self._opened = threading.Event()
        self._closed = threading.Event()
        self._stopped = threading.Event()
        self.role = ""

    # ------------------------------------------------------------------ stream plumbing

    def _request_iter(self) -> Iterator[pb.AttachRequest]:
        yield pb.AttachRequest(open=pb.AttachOpen(name=self.session, control=True, clear_breakpoints_on_detach=False))
        while (req := self._requests.get()) is not None:
            yield req

    def _print(self, text: str) -> None:
        with self._lock:
            self.out.write(text)
            self.out.flush()

    def _pump(self) -> None:
        try:
            for msg in self.client.debug.attach(self._request_iter()):
                kind = msg.WhichOneof("response")
                if kind == "opened":
                    self.role = pb.AttachRole.Name(msg.opened.role).removeprefix("ATTACH_ROLE_").lower()
                    self._opened.set()
                elif kind == "result":
                    q = self._results.get(msg.result.tag)
                    if q is not None:
                        q.put(msg.result)
                elif kind == "stopped":
                    # steps and halts are printed from their command's answer
                    if msg.stopped.reason not in (cpb.STOP_REASON_STEP, cpb.STOP_REASON_HALT):
                        self._print(describe_stop(msg.stopped) + "\n")
                    self._stopped.set()
                elif kind == "console":
                    self._print(msg.console.decode(errors="replace"))
        except Exception as exc:  # the stream ended with an error: say it, then stop
            self._print(f"msctl: {exc}\n")
        finally:
            self._opened.set()
            self._closed.set()

    def call(self, command: pb.DebugCommand) -> pb.DebugCommandResult:
        """Send one command on the Attach stream (tagged here) and wait for its result."""
        self._tag += 1
        tag = self._tag
        q: queue.Queue[pb.DebugCommandResult] = queue.Queue()
        self._results[tag] = q
        cmd = pb.DebugCommand()
        cmd.CopyFrom(command)
        cmd.tag = tag
        self._requests.put(pb.AttachRequest(command=cmd))
        while True:
            try:
                result = q.get(timeout=0.2)
                break
            except queue.Empty:
                if self._closed.is_set():
                    raise ConnectionError("the debug stream closed") from None
        del self._results[tag]
        return result

    # ------------------------------------------------------------------ commands

    def run(self, lines: TextIO) -> int:
        pump = threading.Thread(target=self._pump, daemon=True)
        pump.start()
        self._opened.wait(30)
        if self._closed.is_set():
            return 1
        self._print(f"attached to {self.session} as {self.role}; 'help' lists commands\n")
        interactive = lines.isatty()
        try:
            while not self._closed.is_set():
                if interactive:
                    self._print("(msctl) ")
                line = lines.readline()
                if not line:
                    break
                words = shlex.split(line)
                if not words:
                    continue
                if words[0] in ("quit", "q", "exit"):
                    break
                try:
                    self.dispatch(words)
                except (ValueError, IndexError) as exc:
                    self._print(f"error: {exc}\n")
        except ConnectionError as exc:
            self._print(f"msctl: {exc}\n")
            return 1
        finally:
            self._requests.put(None)
            pump.join(5)
        return 0

    def dispatch(self, words: list[str]) -> None:
        name, args = words[0], words[1:]
        handler = self._commands().get(name)
        if handler is None:
            self._print(f"unknown command {name!r}; 'help' lists commands\n")
            return
        handler(args)

    def _commands(self) -> dict[str, Callable[[list[str]], object]]:
        step_line = self._step_line
        return {
            "help": lambda a: self._print(HELP + "\n"),
            "break": self._break, "b": self._break,
            "watch": lambda a: self._watch(a, pb.BREAKPOINT_KIND_WATCH_WRITE),
            "rwatch": lambda a: self._watch(a, pb.BREAKPOINT_KIND_WATCH_READ),
            "awatch": lambda a: self._watch(a, pb.BREAKPOINT_KIND_WATCH_ACCESS),
            "delete": self._delete, "d": self._delete,
            "continue": self._continue, "c": self._continue,
            "step": step_line(pb.STEP_MODE_INTO), "s": step_line(pb.STEP_MODE_INTO),
            "next": step_line(pb.STEP_MODE_OVER), "n": step_line(pb.STEP_MODE_OVER),
            "finish": step_line(pb.STEP_MODE_OUT),
            "stepi": self._stepi, "si": self._stepi,
            "halt": lambda a: self._show(self.call(pb.DebugCommand(halt=pb.HaltRequest()))),
            "regs": self._regs,
            "x": self._examine,
            "bt": self._backtrace,
            "disas": self._disas,
            "info": self._info,
        }

    def _step_line(self, mode: pb.StepMode.ValueType) -> Callable[[list[str]], object]:
        return lambda args: self._show(self.call(pb.DebugCommand(step_line=pb.StepLineRequest(mode=mode))))

    def _show(self, result: pb.DebugCommandResult) -> pb.DebugCommandResult:
        if result.code:
            self._print(f"error: {result.message}\n")
            return result
        which = result.WhichOneof("result")
        inner = getattr(result, which) if which else None
        if inner is not None and hasattr(inner, "stop") and inner.HasField("stop"):
            self._print(describe_stop(inner.stop) + "\n")
        return result

    def _break(self, args: list[str]) -> None:
        r = self.call(pb.DebugCommand(set_breakpoint=pb.SetBreakpointRequest(location=_location(args[0]))))
        if not r.code:
            bp = r.set_breakpoint.breakpoint
            src = f" ({bp.source.function} {bp.source.file}:{bp.source.line})" if bp.source.function else ""
            self._print(f"breakpoint {bp.id} at 0x{bp.address:08x}{src}\n")
        else:
            self._show(r)

    def _watch(self, args: list[str], kind: pb.BreakpointKind.ValueType) -> None:
        size = int(args[1], 0) if len(args) > 1 else 4
        r = self.call(pb.DebugCommand(set_breakpoint=pb.SetBreakpointRequest(location=_location(args[0]), kind=kind,
                                                                             size=size)))
        if not r.code:
            self._print(f"watchpoint {r.set_breakpoint.breakpoint.id} at 0x{r.set_breakpoint.breakpoint.address:08x}\n")
        else:
            self._show(r)

    def _delete(self, args: list[str]) -> None:
        self._show(self.call(pb.DebugCommand(clear_breakpoint=pb.ClearBreakpointRequest(id=int(args[0])))))

    def _continue(self, args: list[str]) -> None:
        """Like gdb: returns at the next stop (printed by the stream reader)."""
        self._stopped.clear()
        command = pb.DebugCommand()
        getattr(command, "continue").SetInParent()  # a Python keyword: no constructor argument
        result = self.call(command)
        if result.code:
            self._show(result)
            return
        while not self._stopped.wait(0.2):
            if self._closed.is_set():
                return

    def _stepi(self, args: list[str]) -> None:
        self._show(self.call(pb.DebugCommand(step=pb.StepRequest(count=int(args[0], 0) if args else 1))))

    def _regs(self, args: list[str]) -> None:
        r = self.call(pb.DebugCommand(read_registers=pb.ReadRegistersRequest(names=args)))
        if r.code:
            self._show(r)
            return
        regs = list(r.read_registers.registers)
        for i in range(0, len(regs), 4):
            self._print("  ".join(f"{x.name:>9} 0x{x.value:08x}" for x in regs[i:i + 4]) + "\n")

    def _examine(self, args: list[str]) -> None:
        address = self._address(args[0])
        words = int(args[1], 0) if len(args) > 1 else 4
        r = self.call(pb.DebugCommand(read_memory=pb.ReadMemoryRequest(address=address, size=4 * words)))
        if r.code:
            self._show(r)
            return
        data = r.read_memory.data
        for row in range(0, len(data), 16):
            vals = " ".join(f"0x{int.from_bytes(data[i:i + 4], 'little'):08x}" for i in range(row, min(row + 16, len(data)), 4))
            self._print(f"0x{address + row:08x}: {vals}\n")

    def _address(self, text: str) -> int:
        if text.lower().startswith("0x") or text.isdigit():
            return int(text, 0)
        r = self.call(pb.DebugCommand(resolve_symbol=pb.ResolveSymbolRequest(symbol=text)))
        if r.code:
            raise ValueError(r.message)
        return int(r.resolve_symbol.address)

    def _backtrace(self, args: list[str]) -> None:
        r = self.call(pb.DebugCommand(backtrace=pb.BacktraceRequest()))
        if r.code:
            self._show(r)
            return
        for f in r.backtrace.frames:
            loc = f.location
            src = f"{loc.function or '??'} at {loc.file}:{loc.line}" if loc.file else (loc.function or "??")
            self._print(f"#{f.level}  0x{f.pc:08x} in {src}\n")

    def _disas(self, args: list[str]) -> None:
        req = pb.DisassembleRequest(count=int(args[1], 0) if len(args) > 1 else 8)
        if args:
            req.location.CopyFrom(_location(args[0]))
        r = self.call(pb.DebugCommand(disassemble=req))
        if r.code:
            self._show(r)
            return
        for insn in r.disassemble.instructions:
            sym = f"<{insn.symbol}>" if insn.symbol else ""
            self._print(f"0x{insn.address:08x} {sym:<24} {insn.mnemonic} {insn.operands}\n")

    def _info(self, args: list[str]) -> None:
        s = self.client.sessions.get_session(name=self.session).session
        self._print(f"{s.name} {cpb.SessionState.Name(s.state).removeprefix('SESSION_STATE_')}: {s.state_reason}\n")
        for bp in self.client.debug.list_breakpoints(name=self.session).breakpoints:
            kind = pb.BreakpointKind.Name(bp.kind).removeprefix("BREAKPOINT_KIND_").lower()
            self._print(f"  {bp.id}: {kind} 0x{bp.address:08x} hits {bp.hit_count}\n")


def run(client: Client, session: str) -> int:
    return DebugPrompt(client, session).run(sys.stdin)
