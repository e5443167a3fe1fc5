"""``msctl console SESSION``: print a session's console, following it until the session
ends, and exit with what ended it, so that a script can gate on it.

Following, the command watches the session's state (StreamSessionEvents) beside the
console (StreamConsole). When the session reaches EXITED, FAULTED or FAILED (or is
deleted), it reads the console once more, without following, from where it was to the
end: every byte written before the end is printed. Exit status:

- EXITED: the firmware's exit code (its low byte, as a shell reports it; a non-zero code
  whose low byte is 0 gives 1, so that it never reads as success);
- FAULTED: 139 (128 + SIGSEGV, as a shell reports a crashed program);
- FAILED, deleted, or EXITED without an exit code: 125;
- --timeout ran out first: 124 (as timeout(1));
- Ctrl-C: 130 (main says "msctl: interrupted").

Marks (a reset, a power-on, a snapshot restored) are printed as their own lines on
stdout (all but the first power-on, at offset 0: every console starts with one), where they happened between the bytes: they are part of the log's story and a
file made with ``>`` keeps them in place. ``--raw`` prints the bytes only.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from machineserver.cli import output
from machineserver.sdk import Client, errors
from machineserver.v1 import common_pb2, session_pb2

EXIT_FAULTED = 139
EXIT_FAILED = 125
EXIT_TIMEOUT = 124

ENDED = {common_pb2.SESSION_STATE_EXITED, common_pb2.SESSION_STATE_FAULTED, common_pb2.SESSION_STATE_FAILED}

MARK_WORDS = {
    session_pb2.CONSOLE_MARK_KIND_RESET: "reset",
    session_pb2.CONSOLE_MARK_KIND_POWER_ON: "power-on",
    session_pb2.CONSOLE_MARK_KIND_SNAPSHOT_RESTORED: "snapshot restored",
}

EXIT_HELP = (f"exit status when following: the firmware's exit code when the session EXITS; "
             f"{EXIT_FAULTED} when it FAULTS; {EXIT_FAILED} when it FAILS or is deleted; "
             f"{EXIT_TIMEOUT} when --timeout runs out; 130 on Ctrl-C. Marks (reset, power-on, "
             "snapshot restored) are lines of their own on stdout, in place between the bytes, "
             "so that a saved log keeps them; --raw prints the console's bytes only.")


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("session")
    p.add_argument("--offset", type=int, default=0, help="console offset to start from")
    p.add_argument("--no-follow", action="store_true", help="print what is there and stop (exit 0)")
    p.add_argument("--timeout", dest="follow_timeout", type=float, metavar="SECONDS",
                   help=f"stop following after this many seconds: exit {EXIT_TIMEOUT}")
    p.add_argument("--raw", action="store_true", help="the console's bytes only: no mark lines")


@dataclass
class _Printer:
    args: argparse.Namespace
    offset: int
    at_line_start: bool = True

    def show(self, msg: session_pb2.StreamConsoleResponse) -> None:
        if output.output_format(self.args) != "table":
            output.emit(msg, self.args)
        elif self.args.raw or not msg.marks:
            self._write(msg.data)
        else:
            done = 0
            for mark in msg.marks:
                cut = max(0, min(len(msg.data), mark.offset - msg.offset))
                self._write(msg.data[done:cut])
                done = max(done, cut)
                self._mark(mark)
            self._write(msg.data[done:])
        self.offset = max(self.offset, msg.offset + len(msg.data))

    def _write(self, data: bytes) -> None:
        if not data:
            return
        out = sys.stdout.buffer
        out.write(data)
        out.flush()
        self.at_line_start = data.endswith(b"\n")

    def _mark(self, mark: session_pb2.ConsoleMark) -> None:
        if mark.offset == 0 and mark.kind == session_pb2.CONSOLE_MARK_KIND_POWER_ON:
            return  # the first power-on: every console starts with one
        when = time.strftime("%H:%M:%S", time.localtime(mark.time.seconds))
        what = MARK_WORDS.get(mark.kind, "mark")
        detail = f" ({mark.detail})" if mark.detail else ""
        self._write((b"" if self.at_line_start else b"\n") + f"--- {what} {when}{detail} ---\n".encode())


def _pump(items: Iterator[Any], kind: str, inbox: queue.Queue[tuple[str, Any]]) -> None:
    """Hand every item of a stream to the main thread, then its end (or its error)."""
    try:
        for item in items:
            inbox.put((kind, item))
        inbox.put((kind + "-end", None))
    except Exception as exc:  # the main thread raises it
        inbox.put(("error", exc))


def _status(session: session_pb2.Session) -> int:
    state = session.state
    if state == common_pb2.SESSION_STATE_EXITED and session.HasField("exit_code"):
        code = session.exit_code & 0xFF
        return 1 if code == 0 and session.exit_code != 0 else code
    if state == common_pb2.SESSION_STATE_FAULTED:
        print(f"msctl: {session.name} faulted: {session.state_reason}", file=sys.stderr)
        return EXIT_FAULTED
    print(f"msctl: {session.name} is {common_pb2.SessionState.Name(state).removeprefix('SESSION_STATE_')}"
          f"{': ' + session.state_reason if session.state_reason else ''}", file=sys.stderr)
    return EXIT_FAILED


def run(client: Client, args: argparse.Namespace) -> int:
    name = args.session if args.session.startswith("sessions/") else f"sessions/{args.session}"
    printer = _Printer(args, args.offset)
    if args.no_follow:
        for msg in client.sessions.stream_console(name=name, offset=args.offset, follow=False):
            printer.show(msg)
        return 0
    deadline = None if args.follow_timeout is None else time.monotonic() + args.follow_timeout
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
    # the state first (subscribed: every change after it arrives), then the console
    events = client.sessions.stream_session_events(name=name)
    first = next(events)
    watch = threading.Thread(target=_pump, args=(events, "event", inbox), daemon=True)
    watch.start()
    ended = any(s.state in ENDED for s in first.subscribed.sessions)
    if not ended:
        follow = client.sessions.stream_console(name=name, offset=args.offset, follow=True)
        threading.Thread(target=_pump, args=(follow, "console", inbox), daemon=True).start()
    timed_out = False
    while not ended:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            timed_out = True
            break
        try:
            kind, item = inbox.get(timeout=left)
        except queue.Empty:
            continue
        if kind == "error":
            raise item
        if kind == "console":
            printer.show(item)
        elif kind == "event":
            ended = item.state in ENDED or item.reason == "deleted"
        else:  # a stream ended: the session was deleted (or the server stops)
            ended = True
    # whatever was written up to now: read to the end, not following
    try:
        for msg in client.sessions.stream_console(name=name, offset=printer.offset, follow=False):
            printer.show(msg)
        session = client.sessions.get_session(name=name).session
    except errors.NotFound:
        print(f"msctl: {name} was deleted", file=sys.stderr)
        return EXIT_TIMEOUT if timed_out else EXIT_FAILED
    if output.output_format(args) != "table":
        output.emit(session, args)
    if timed_out:
        print(f"msctl: {name} still {common_pb2.SessionState.Name(session.state).removeprefix('SESSION_STATE_')} "
              f"after {args.follow_timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    return _status(session)
