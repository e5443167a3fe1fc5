"""``msctl telemetry watch``: a live view of the host, redrawn from StreamHostStatus.

Per-core bars, memory and swap, temperatures, GPUs, power rails and the status of each
source. On a terminal each frame is drawn over the last (ANSI: the screen cleared once,
then cursor home, each line and the rest of the screen cleared after it: no flicker, and
the terminal's scrollback keeps no old frames); piped, the frames follow one another, each
starting with a ``host`` line. ``--json`` prints the
stream's messages, one JSON object a line (``-o yaml``: one YAML document each).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import TextIO

from google.protobuf import duration_pb2

from machineserver.cli import output
from machineserver.sdk import Client
from machineserver.v1 import telemetry_pb2 as pb

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen
HOME = "\x1b[H"
CLEAR_LINE_END = "\x1b[K"
CLEAR_BELOW = "\x1b[J"
GIB = 1 << 30


def bar(percent: float, width: int) -> str:
    filled = max(0, min(width, round(percent / 100 * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def render(msg: pb.StreamHostStatusResponse, columns: int = 80) -> str:
    s = msg.status
    width = max(10, min(40, columns - 40))
    when = s.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if s.HasField("time") else ""
    load = " ".join(f"{x:.2f}" for x in s.load_average)
    lines = [f"host  {when}  cpu {s.cpu_percent:5.1f}%  load {load or '-'}  dropped {msg.dropped}"]
    for c in s.cpus:
        freq = f"{c.frequency_mhz:6.0f} MHz" if c.frequency_mhz else ""
        lines.append(f"cpu{c.index:<3} {bar(c.usage_percent, width)} {c.usage_percent:5.1f}%  {freq}".rstrip())
    for label, m in (("mem", s.memory), ("swap", s.swap)):
        lines.append(f"{label:<6} {bar(m.percent, width)} {m.percent:5.1f}%  {_gib(m.used_bytes)}/{_gib(m.total_bytes)} GiB")
    if s.temperatures:
        temps = [f"{t.sensor} {t.celsius:.1f}C" for t in s.temperatures]
        lines.append("temps  " + ", ".join(temps))
    for g in s.gpus:
        lines.append(
            f"gpu{g.index:<3} {bar(g.utilization_percent, width)} {g.utilization_percent:5.1f}%  {g.name}"
        )
        detail = [f"mem {_gib(g.memory_used_bytes)}/{_gib(g.memory_total_bytes)} GiB" if g.memory_total_bytes else "",
                  f"{g.temperature_celsius:.0f}C" if g.temperature_celsius else "",
                  f"{g.power_mw / 1000:.1f} W" if g.power_mw else "",
                  f"{g.graphics_clock_mhz:.0f}/{g.memory_clock_mhz:.0f} MHz" if g.graphics_clock_mhz else ""]
        lines.append("       " + "  ".join(d for d in detail if d))
    if s.power_rails:
        lines.append("power  " + ", ".join(f"{r.name} {r.current_mw:.0f}/{r.average_mw:.0f} mW" for r in s.power_rails))
    lines.append("sources " + ", ".join(
        f"{x.name} ok" if x.ok else f"{x.name} off ({x.error})" for x in s.sources))
    return "\n".join(lines)


def redraw(frame: str, first: bool) -> str:
    """What draws ``frame`` over the previous one on a terminal (the first clears it)."""
    lines = "".join(line + CLEAR_LINE_END + "\n" for line in frame.splitlines())
    return (CLEAR if first else HOME) + lines + CLEAR_BELOW


def watch(client: Client, args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    interval = duration_pb2.Duration()
    interval.FromNanoseconds(int(args.interval * 1e9))
    machine_readable = output.machine_readable(args)
    args.streaming = True  # YAML: a document per message
    shown = 0
    # Ctrl-C: msctl's main says "interrupted" and exits 130
    for msg in client.telemetry.stream_host_status(pb.StreamHostStatusRequest(interval=interval), timeout=None):
        if machine_readable:
            output.emit(msg, args)
        else:
            frame = render(msg, shutil.get_terminal_size().columns)
            out.write(redraw(frame, first=not shown) if out.isatty() else ("\n" if shown else "") + frame + "\n")
            out.flush()
        shown += 1
        if args.count and shown >= args.count:
            break
    return 0


def add_parser(tsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = tsub.add_parser("watch", help="a live view of host CPU, memory, temperatures, GPUs and power")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (0.01 to 60, default 1)")
    p.add_argument("--count", type=int, default=0, help="stop after N samples (default: until interrupted)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the messages as JSON lines")
    p.set_defaults(handler=watch)
