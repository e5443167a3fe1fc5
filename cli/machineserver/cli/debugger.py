"""``msctl debug SESSION``: an interactive debugger prompt over the Attach stream, with
the session's console bytes and stop events interleaved. Reads commands from stdin, so a
script can pipe them in (no prompt is printed when stdin is not a terminal).

On a terminal it keeps gdb's habits: line editing and a history kept across runs
(readline, ``~/.msctl_history``), an empty line repeats the last step-like command,
Ctrl-C while the target runs (``c``, ``next``, ``finish``, ``si N``) halts it and comes
back to the prompt saying where it stopped, Ctrl-C at the prompt says "Quit", and
Ctrl-D or ``quit`` detaches."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TextIO

from machineserver.cli import rpc
from machineserver.sdk import Client, errors
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
  help [COMMAND]       this list, or one command's usage
  quit|q  (or Ctrl-D)  detach
on a terminal: Ctrl-C halts a running target, an empty line repeats a step"""

# what a command that needs an argument says without one (gdb's "Argument required
# (...)."), then its usage and an example
USAGE: dict[str, tuple[str, str]] = {
    "break": ("a location", "break LOC    e.g. break main, break hello.c:12, break 0x00000120"),
    "watch": ("an address or a symbol to watch", "watch LOC [SIZE]    e.g. watch counter, watch 0x20000000 4"),
    "rwatch": ("an address or a symbol to watch", "rwatch LOC [SIZE]    e.g. rwatch counter"),
    "awatch": ("an address or a symbol to watch", "awatch LOC [SIZE]    e.g. awatch counter"),
    "delete": ("a breakpoint id; 'info' lists them", "delete ID    e.g. delete 1"),
    "x": ("starting display address", "x ADDR [WORDS]    32-bit words in hex, e.g. x 0x20000000 8, x counter"),
}
ALIASES = {"b": "break", "d": "delete", "c": "continue", "s": "step", "n": "next", "si": "stepi", "q": "quit"}
# commands that let the target run: Ctrl-C halts it; an empty line repeats them (gdb)
RUNNING_COMMANDS = frozenset({"continue", "step", "next", "finish", "stepi"})
HISTORY_FILE = "~/.msctl_history"
HISTORY_LENGTH = 1000


class ArgumentRequired(ValueError):
    """A command given without the argument it needs; the message says which and how."""

    def __init__(self, command: str) -> None:
        what, usage = USAGE[command]
        super().__init__(f"Argument required ({what}).\nusage: {usage}")


def _number(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"{what} wants a number (decimal or 0x hex), got {text!r}") from None


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
                    if q is not None:  # None: a command given up on (Ctrl-C)
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
        """Send one command on the Attach stream (tagged here) and wait for its result.
        Interrupted (Ctrl-C), it stops waiting: a late result is dropped."""
        self._tag += 1
        tag = self._tag
        q: queue.Queue[pb.DebugCommandResult] = queue.Queue()
        self._results[tag] = q
        cmd = pb.DebugCommand()
        cmd.CopyFrom(command)
        cmd.tag = tag
        try:
            self._requests.put(pb.AttachRequest(command=cmd))
            while True:
                try:
                    return q.get(timeout=0.2)
                except queue.Empty:
                    if self._closed.is_set():
                        raise ConnectionError("the debug stream closed") from None
        finally:
            del self._results[tag]

    # ------------------------------------------------------------------ the prompt

    def run(self, lines: TextIO) -> int:
        pump = threading.Thread(target=self._pump, daemon=True)
        pump.start()
        self._opened.wait(30)
        if self._closed.is_set():
            return 1
        self._print(f"attached to {self.session} as {self.role}; 'help' lists commands\n")
        interactive = lines.isatty()
        history = _History.open() if interactive else None
        last_step: list[str] = []  # what an empty line repeats
        try:
            while not self._closed.is_set():
                try:
                    line = read_line(lines, interactive)
                except KeyboardInterrupt:  # at the prompt: gdb says Quit and asks again
                    self._print("\nQuit\n")
                    continue
                if line is None:  # end of input (Ctrl-D)
                    if interactive:
                        self._print("quit\n")
                    break
                try:
                    words = shlex.split(line)
                except ValueError as exc:
                    self._print(f"error: {exc}\n")
                    continue
                if not words:
                    if not interactive or not last_step:
                        continue
                    words = last_step
                name = ALIASES.get(words[0], words[0])
                if name in ("quit", "exit"):
                    break
                if interactive and name in RUNNING_COMMANDS:
                    last_step = words
                self._run_one(name, words, interactive)
        except ConnectionError as exc:
            self._print(f"msctl: {exc}\n")
            return 1
        finally:
            if history is not None:
                history.save()
            self._requests.put(None)
            pump.join(5)
        return 0

    def _run_one(self, name: str, words: list[str], interactive: bool) -> None:
        """One command; its mistakes and the server's refusals are printed, not raised.
        On a terminal, Ctrl-C during a command that runs the target halts it."""
        try:
            self.dispatch([name, *words[1:]])
        except ArgumentRequired as exc:  # says it all, as gdb does
            self._print(f"{exc}\n")
        except (ValueError, IndexError, rpc.UsageError) as exc:
            self._print(f"error: {exc}\n")
        except errors.MachineServerError as exc:
            self._print(f"error: {exc}\n")
        except KeyboardInterrupt:
            if not interactive:
                raise  # a script: msctl's main says "interrupted", as before
            if name in RUNNING_COMMANDS:
                self._halt_after_interrupt()
            else:
                self._print("\nQuit\n")

    def _halt_after_interrupt(self) -> None:
        """Ctrl-C while the target runs: halt it (a unary Halt: the Attach stream may
        still be busy with the step) and say where it stopped, as gdb does."""
        self._print("\nProgram received signal SIGINT, Interrupt.\n")
        try:
            stop = self.client.debug.halt(name=self.session).stop
        except KeyboardInterrupt:
            self._print("Quit\n")
            return
        except errors.MachineServerError as exc:
            self._print(f"error: could not halt the target: {exc}\n")
            return
        self._print(describe_stop(stop) + "\n")

    def dispatch(self, words: list[str]) -> None:
        name, args = ALIASES.get(words[0], words[0]), words[1:]
        handler = self._commands().get(name)
        if handler is None:
            self._print(f"unknown command {name!r}; 'help' lists commands\n")
            return
        if name in USAGE and not args:
            raise ArgumentRequired(name)
        handler(args)

    def _commands(self) -> dict[str, Callable[[list[str]], object]]:
        step_line = self._step_line
        return {
            "help": self._help,
            "break": self._break,
            "watch": lambda a: self._watch(a, pb.BREAKPOINT_KIND_WATCH_WRITE),
            "rwatch": lambda a: self._watch(a, pb.BREAKPOINT_KIND_WATCH_READ),
            "awatch": lambda a: self._watch(a, pb.BREAKPOINT_KIND_WATCH_ACCESS),
            "delete": self._delete,
            "continue": self._continue,
            "step": step_line(pb.STEP_MODE_INTO),
            "next": step_line(pb.STEP_MODE_OVER),
            "finish": step_line(pb.STEP_MODE_OUT),
            "stepi": self._stepi,
            "halt": lambda a: self._show(self.call(pb.DebugCommand(halt=pb.HaltRequest()))),
            "regs": self._regs,
            "x": self._examine,
            "bt": self._backtrace,
            "disas": self._disas,
            "info": self._info,
        }

    def _help(self, args: list[str]) -> None:
        name = ALIASES.get(args[0], args[0]) if args else ""
        if name in USAGE:
            self._print(f"usage: {USAGE[name][1]}\n")
            return
        # a command's line: its names are in the first column (23 characters)
        lines = [line for line in HELP.splitlines()[1:] if name and name in re.split(r"[\s|\[\]]+", line[:23])]
        self._print(("\n".join(lines) if lines else HELP) + "\n")

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
        request = pb.SetBreakpointRequest(location=rpc.parse_location(args[0]))
        r = self.call(pb.DebugCommand(set_breakpoint=request))
        if not r.code:
            bp = r.set_breakpoint.breakpoint
            src = f" ({bp.source.function} {bp.source.file}:{bp.source.line})" if bp.source.function else ""
            self._print(f"breakpoint {bp.id} at 0x{bp.address:08x}{src}\n")
        else:
            self._show(r)

    def _watch(self, args: list[str], kind: pb.BreakpointKind.ValueType) -> None:
        size = _number(args[1], "SIZE") if len(args) > 1 else 4
        request = pb.SetBreakpointRequest(location=rpc.parse_location(args[0]), kind=kind, size=size)
        r = self.call(pb.DebugCommand(set_breakpoint=request))
        if not r.code:
            self._print(f"watchpoint {r.set_breakpoint.breakpoint.id} at 0x{r.set_breakpoint.breakpoint.address:08x}\n")
        else:
            self._show(r)

    def _delete(self, args: list[str]) -> None:
        self._show(self.call(pb.DebugCommand(clear_breakpoint=pb.ClearBreakpointRequest(id=_number(args[0], "ID")))))

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
        count = _number(args[0], "N") if args else 1
        self._show(self.call(pb.DebugCommand(step=pb.StepRequest(count=count))))

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
        words = _number(args[1], "WORDS") if len(args) > 1 else 4
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
            return _number(text, "the address")
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
        req = pb.DisassembleRequest(count=_number(args[1], "N") if len(args) > 1 else 8)
        if args:
            req.location.CopyFrom(rpc.parse_location(args[0]))
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


class _History:
    """readline's history, kept across runs in ``~/.msctl_history`` (bounded); a file
    that cannot be read or written is no history, never an error."""

    def __init__(self, readline: ModuleType, path: Path) -> None:
        self.readline = readline
        self.path = path

    @classmethod
    def open(cls) -> _History | None:
        try:
            import readline  # only a terminal wants it (and some Pythons lack it)
        except ImportError:
            return None
        history = cls(readline, Path(os.path.expanduser(HISTORY_FILE)))
        readline.set_history_length(HISTORY_LENGTH)
        with contextlib.suppress(OSError):
            readline.read_history_file(history.path)
        return history

    def save(self) -> None:
        with contextlib.suppress(OSError):
            self.readline.write_history_file(self.path)


def read_line(lines: TextIO, interactive: bool) -> str | None:
    """The next command line, None at the end of input (Ctrl-D on a terminal)."""
    if interactive:
        try:
            return input("(msctl) ")  # readline's line editing and history
        except EOFError:
            return None
    line = lines.readline()
    return line or None


def run(client: Client, session: str) -> int:
    return DebugPrompt(client, session).run(sys.stdin)
