"""``msctl cosim ...``: co-simulation verbs over CoSimService.

``create -f topology.yaml`` makes the member sessions (uploading their programs) and the
co-simulation from one file; ``run`` starts it and shows every member's console, each
line prefixed by its node, until it stops; ``console`` shows the same view of a
co-simulation run from elsewhere; ``status``, ``list``, ``step``, ``pause``, ``delete``,
``snapshot`` and ``restore`` are the rest. A co-simulation is named by its resource name,
its id, or its display name (the topology's ``name``). Errors are one line and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from machineserver.cli import output
from machineserver.sdk import AsyncClient, Client, errors
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import cosim_pb2 as pb

PREFIX = "cosimulations/"
TOPOLOGY_HELP = """\
The topology file (YAML) names the nodes, the links between them by node name, and
the quantum; relative program paths are relative to the file:

  name: ping-pong                  # the co-simulation's display name (default: file name)
  quantum_instructions: 10000      # or quantum_ns: 100000 (exactly one)
  nodes:                           # in order: the order of the exchange at barriers
    - name: ping                   # the session id (after --id-prefix)
      board: mps2-an385
      backend: unicorn             # optional (default: the server's); qemu nodes get icount
      program: cosim_ping.elf      # a file to upload, or programs/ID
    - {name: pong, board: mps2-an385, program: cosim_pong.elf}
  links:
    - shared_memory: {size: 0x1000, mappings: {ping: 0x20200000, pong: 0x20280000}}
    - interrupt: {from: ping, doorbell: 0x20220000, mask: 1, to: pong, irq: 30}
    - interrupt: {from: pong, doorbell: 0x20220000, mask: 1, to: ping, irq: 30, latency_ns: 0}
    - serial: {a: ping, b: pong, queue_limit_bytes: 65536}

mask 0 (the default) means every bit; latency_ns defaults to 0; queue_limit_bytes to
64 KiB. Numbers may be written 0x... .
"""
RUNNING = pb.CO_SIM_STATE_RUNNING
ENDED = (pb.CO_SIM_STATE_STOPPED, pb.CO_SIM_STATE_FAILED)


class TopologyError(Exception):
    """A topology file that cannot be used; the message names the file and the place."""


EXIT_INPUT, EXIT_INTERRUPTED = 2, 130  # a mistake in the topology file; Ctrl-C


# ---------------------------------------------------------------------- topology files


@dataclass
class Node:
    name: str
    board: str
    backend: str
    program: str  # a path (resolved) or programs/ID
    options: dict[str, bool] = field(default_factory=dict)


@dataclass
class Topology:
    path: Path
    display_name: str
    nodes: list[Node]
    # links as CoSimLink JSON, nodes named by node name (session names filled in later)
    links: list[dict[str, Any]]
    sync: dict[str, int]

    def link_requests(self, session_of: dict[str, str]) -> list[dict[str, Any]]:
        out = []
        for link in self.links:
            ((kind, body),) = link.items()
            if kind == "shared_memory":
                body = {**body, "mappings": [{**m, "session": session_of[m["session"]]} for m in body["mappings"]]}
            elif kind == "interrupt":
                body = {**body, "from_session": session_of[body["from_session"]],
                        "to_session": session_of[body["to_session"]]}
            else:
                body = {**body, "session_a": session_of[body["session_a"]], "session_b": session_of[body["session_b"]]}
            out.append({kind: body})
        return out


def _number(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise TopologyError(f"{where}: wants a number, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        try:
            n = int(value.strip(), 0)
        except ValueError:
            raise TopologyError(f"{where}: wants a number, got {value!r}") from None
    else:
        raise TopologyError(f"{where}: wants a number, got {value!r}")
    if n < 0:
        raise TopologyError(f"{where}: must not be negative, got {n}")
    return n


def _mapping(value: object, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TopologyError(f"{where}: wants a mapping ({', '.join(allowed)}), got {type(value).__name__}")
    unknown = [str(k) for k in value if k not in allowed]
    if unknown:
        raise TopologyError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(allowed)})")
    missing = [k for k in required if value.get(k) in (None, "")]
    if missing:
        raise TopologyError(f"{where}.{missing[0]}: is required")
    return value


class _Parser:
    def __init__(self, path: Path, names: list[str]) -> None:
        self.path = path
        self.names = names

    def node_ref(self, value: object, where: str) -> str:
        name = str(value) if value is not None else ""
        if not name:
            raise TopologyError(f"{where}: is required (a node name)")
        if name not in self.names:
            raise TopologyError(f"{where}: unknown node {name!r} (nodes: {', '.join(self.names)})")
        return name

    def node(self, raw: object, i: int) -> Node:
        where = f"nodes[{i}]"
        d = _mapping(raw, where, ("name", "board", "backend", "program", "options"), ("name", "board", "program"))
        program = str(d["program"])
        if not program.startswith("programs/"):
            file = (self.path.parent / program).resolve()
            if not file.is_file():
                raise TopologyError(f"{where}.program: no such file: {program} (looked for {file})")
            program = str(file)
        options = _mapping(d.get("options") or {}, f"{where}.options", ("icount", "coverage"))
        for key, value in options.items():
            if not isinstance(value, bool):
                raise TopologyError(f"{where}.options.{key}: wants true or false, got {value!r}")
        backend = str(d.get("backend") or "")
        return Node(str(d["name"]), str(d["board"]), backend, program, {k: bool(v) for k, v in options.items()})

    def link(self, raw: object, i: int) -> dict[str, Any]:
        where = f"links[{i}]"
        d = _mapping(raw, where, ("shared_memory", "interrupt", "serial"))
        if len(d) != 1:
            raise TopologyError(f"{where}: wants exactly one of shared_memory, interrupt, serial")
        ((kind, body),) = d.items()
        where = f"{where}.{kind}"
        if kind == "shared_memory":
            b = _mapping(body, where, ("size", "mappings"), ("size", "mappings"))
            maps = b["mappings"]
            if not isinstance(maps, dict):
                raise TopologyError(f"{where}.mappings: wants a mapping of node name to address")
            mappings = [{"session": self.node_ref(node, f"{where}.mappings"),
                         "address": _number(addr, f"{where}.mappings.{node}")} for node, addr in maps.items()]
            return {kind: {"size": _number(b["size"], f"{where}.size"), "mappings": mappings}}
        if kind == "interrupt":
            b = _mapping(body, where, ("from", "doorbell", "mask", "to", "irq", "latency_ns"),
                         ("from", "doorbell", "to", "irq"))
            return {kind: {"from_session": self.node_ref(b["from"], f"{where}.from"),
                           "doorbell_address": _number(b["doorbell"], f"{where}.doorbell"),
                           "value_mask": _number(b.get("mask", 0), f"{where}.mask"),
                           "to_session": self.node_ref(b["to"], f"{where}.to"),
                           "irq": _number(b["irq"], f"{where}.irq"),
                           "latency_ns": _number(b.get("latency_ns", 0), f"{where}.latency_ns")}}
        b = _mapping(body, where, ("a", "b", "queue_limit_bytes"), ("a", "b"))
        return {kind: {"session_a": self.node_ref(b["a"], f"{where}.a"),
                       "session_b": self.node_ref(b["b"], f"{where}.b"),
                       "queue_limit_bytes": _number(b.get("queue_limit_bytes", 0), f"{where}.queue_limit_bytes")}}


def load_topology(path_text: str) -> Topology:
    """The topology file, checked: every problem raises TopologyError naming the place."""
    path = Path(path_text)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"{path_text}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TopologyError(f"{path_text}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                            f"{exc.start}): is it the topology YAML?") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TopologyError(f"{path_text}: bad YAML: {where}{' '.join(str(problem).split())}") from None
    try:
        return _topology(path, raw)
    except TopologyError as exc:
        raise TopologyError(f"{path_text}: {exc}") from None


def _topology(path: Path, raw: object) -> Topology:
    if raw is None:
        raise TopologyError("the file is empty (it wants nodes, links and a quantum)")
    top = _mapping(raw, "the file", ("name", "quantum_ns", "quantum_instructions", "nodes", "links"), ("nodes",))
    nodes_raw = top["nodes"]
    if not isinstance(nodes_raw, list) or len(nodes_raw) < 2:
        raise TopologyError("nodes: wants a list of two or more nodes")
    names = [str(n.get("name", "")) if isinstance(n, dict) else "" for n in nodes_raw]
    parser = _Parser(path, names)
    nodes = [parser.node(n, i) for i, n in enumerate(nodes_raw)]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise TopologyError(f"nodes[{i}].name: {name!r} is used twice")
    links_raw = top.get("links") or []
    if not isinstance(links_raw, list):
        raise TopologyError("links: wants a list")
    links = [parser.link(x, i) for i, x in enumerate(links_raw)]
    given = [k for k in ("quantum_ns", "quantum_instructions") if top.get(k) is not None]
    if len(given) != 1:
        raise TopologyError("give the quantum: quantum_ns or quantum_instructions (exactly one)")
    sync = {given[0]: _number(top[given[0]], given[0])}
    return Topology(path, str(top.get("name") or path.stem), nodes, links, sync)


# server field names -> the topology file's
_FIELD_WORDS = {"from_session": "from", "to_session": "to", "doorbell_address": "doorbell", "value_mask": "mask",
                "session_a": "a", "session_b": "b"}


def topology_field(server_field: str, topo: Topology) -> str:
    """Where a CreateCoSimulation field violation is in the topology file."""
    if server_field.startswith("sessions"):
        return "nodes" + server_field.removeprefix("sessions")
    if server_field.startswith("sync"):
        return next(iter(topo.sync))
    parts = server_field.split(".")
    if len(parts) >= 3 and parts[1] == "shared_memory" and parts[2].startswith("mappings["):
        j = int(parts[2][len("mappings["):-1])
        i = int(parts[0][len("links["):-1])
        with contextlib.suppress(IndexError, KeyError):
            node = topo.links[i]["shared_memory"]["mappings"][j]["session"]
            return f"{parts[0]}.shared_memory.mappings.{node}"
    return ".".join(_FIELD_WORDS.get(p, p) for p in parts)


# ---------------------------------------------------------------------- names and text


def short(session: str) -> str:
    return session.removeprefix("sessions/")


def ns_text(ns: int) -> str:
    return f"{ns:,} ns"


def state_name(state: pb.CoSimState.ValueType) -> str:
    return pb.CoSimState.Name(state).removeprefix("CO_SIM_STATE_")


def _session_state(state: cpb.SessionState.ValueType) -> str:
    return cpb.SessionState.Name(state).removeprefix("SESSION_STATE_")


def table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(x) for x in col) for col in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def resolve(client: Client, name: str) -> str:
    """A co-simulation's resource name from its name, id or display name."""
    if name.startswith(PREFIX):
        return name
    try:
        return client.cosim.get_co_simulation(name=PREFIX + name).cosimulation.name
    except errors.NotFound:
        pass
    matches, token = [], ""
    while True:
        page = client.cosim.list_co_simulations(page_size=500, page_token=token)
        matches += [c.name for c in page.cosimulations if c.display_name == name]
        token = page.next_page_token
        if not token:
            break
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise errors.InvalidArgument(f"several co-simulations are named {name!r}: {', '.join(matches)}; give one")
    raise errors.NotFound(f"no co-simulation {name!r} (neither an id nor a display name)")


def _link_text(link: pb.CoSimLink) -> tuple[str, str]:
    kind = link.WhichOneof("link") or ""
    if kind == "shared_memory":
        sm = link.shared_memory
        return kind, " <-> ".join(f"{short(m.session)}@{m.address:#x}" for m in sm.mappings) + f", {sm.size} bytes"
    if kind == "interrupt":
        it = link.interrupt
        mask = f" & {it.value_mask:#x}" if it.value_mask else ""
        return kind, (f"{short(it.from_session)} doorbell {it.doorbell_address:#x}{mask} -> "
                      f"{short(it.to_session)} irq {it.irq}, latency {ns_text(it.latency_ns)}")
    se = link.serial
    return kind, f"{short(se.session_a)} <-> {short(se.session_b)}, queue {se.queue_limit_bytes or 65536} bytes"


def _link_counters(kind: str, st: pb.CoSimLinkStatus) -> str:
    if kind == "interrupt":
        return f"{st.interrupts} raised, {st.interrupts_pending} pending"
    if kind == "serial":
        return f"{st.bytes} bytes delivered, {st.bytes_in_flight} in flight, {st.bytes_dropped} dropped"
    return f"{st.bytes} bytes copied"


def stop_text(stop: pb.CoSimStop) -> str:
    what = stop.reason
    if stop.reason == "exit":
        what = f"exit (code {stop.exit_code})"
    elif stop.message:
        what = f"{stop.reason} ({stop.message})"
    return (f"{short(stop.session)} {what} at pc {stop.pc:#x}, {ns_text(stop.virtual_time_ns)}; "
            f"every member halted there in {stop.halt_ms:.1f} ms")


def render(c: pb.CoSimulation) -> None:
    quantum = ns_text(c.quantum_ns)
    if c.sync.quantum_instructions:
        quantum += f" ({c.sync.quantum_instructions:,} instructions)"
    print(f"{c.name}  {c.display_name}  {state_name(c.state)}: {c.state_reason}")
    print(f"virtual time {ns_text(c.virtual_time_ns)}, {c.quanta:,} quanta of {quantum}")
    table([[short(m.session), m.board, m.backend, _session_state(m.state), ns_text(m.virtual_time_ns), f"{m.cycles:,}"]
           for m in c.members], ["MEMBER", "BOARD", "BACKEND", "STATE", "VIRTUAL TIME", "CYCLES"])
    if c.links:
        print()
        rows = []
        for i, link in enumerate(c.links):
            kind, text = _link_text(link)
            st = c.link_status[i] if i < len(c.link_status) else pb.CoSimLinkStatus()
            rows.append([str(i), kind, text, _link_counters(kind, st)])
        table(rows, ["LINK", "KIND", "ENDPOINTS", "TRAFFIC"])
    if c.last_stop.session:
        print(f"\nlast stop: {stop_text(c.last_stop)}")


def _emit(c: pb.CoSimulation, args: argparse.Namespace, message: Any = None) -> None:
    if output.machine_readable(args):
        output.emit(message if message is not None else c, args)
    else:
        render(c)


# ---------------------------------------------------------------------- consoles


class ConsoleView:
    """Members' console bytes as whole lines, each prefixed by its member ("ping | ...")."""

    def __init__(self, sessions: list[str], as_json: bool = False) -> None:
        width = max(len(short(s)) for s in sessions)
        self.prefix = {s: short(s).ljust(width) + " | " for s in sessions}
        self.offset = dict.fromkeys(sessions, 0)
        self.partial = dict.fromkeys(sessions, b"")
        self.as_json = as_json

    def feed(self, session: str, offset: int, data: bytes) -> None:
        skip = self.offset[session] - offset  # bytes already shown (a resumed read)
        if skip >= len(data):
            return
        data = data[max(0, skip):]
        self.offset[session] = max(self.offset[session], offset) + len(data)
        *lines, self.partial[session] = (self.partial[session] + data).split(b"\n")
        for line in lines:
            self._line(session, line)

    def skip(self, session: str, offset: int, data: bytes) -> None:
        """Bytes not to show (printed before this view began)."""
        self.offset[session] = max(self.offset[session], offset + len(data))

    def flush(self) -> None:
        for session, rest in self.partial.items():
            if rest:
                self._line(session, rest)
                self.partial[session] = b""

    def _line(self, session: str, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if self.as_json:
            print(json.dumps({"session": session, "line": text}), flush=True)
        else:
            print(self.prefix[session] + text, flush=True)


async def _connect_async(args: argparse.Namespace) -> AsyncClient:
    """An async client with msctl's global options (target, deadline, credentials, TLS)."""
    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return await AsyncClient.connect(
        args.target, timeout=args.timeout, api_key=args.api_key or None, bearer_token=args.token or None,
        tls=args.tls or bool(args.tls_ca), root_certificates=read(args.tls_ca), private_key=read(args.tls_key),
        certificate_chain=read(args.tls_cert))


async def follow(args: argparse.Namespace, name: str, *, start: bool, until_ns: int = 0) -> pb.CoSimulation:
    """Show every member's console until the co-simulation stops: with ``start``, what
    they print from now until the run this call starts ends (paused, stopped, failed);
    else all of it until it is STOPPED or FAILED. Returns the co-simulation as it ended."""
    async with await _connect_async(args) as client:
        events = client.cosim.stream_co_simulation_events(name=name)
        first = await anext(events)
        view = ConsoleView(list(first.cosimulation_now.sessions), args.json)
        done = asyncio.Event()
        started = False

        def ended(state: pb.CoSimState.ValueType) -> bool:
            return state != RUNNING if start else state in ENDED

        async def watch_events() -> None:
            seen_running = False
            async for ev in events:
                seen_running = seen_running or ev.state == RUNNING
                if (seen_running or not start) and ended(ev.state):
                    break
            done.set()  # the stream ended: stopped, deleted or the server went away

        async def poll() -> None:  # a guard in case the stream is cut: ask now and then
            while True:
                await asyncio.sleep(1.0)
                now = (await client.cosim.get_co_simulation(name=name)).cosimulation
                if (started or not start) and ended(now.state):
                    done.set()
                    return

        async def console(session: str) -> None:
            async for msg in client.sessions.stream_console(name=session, offset=view.offset[session], follow=True):
                view.feed(session, msg.offset, msg.data)

        if start:  # a run shows what the members print from now on
            for session in view.offset:
                async for msg in client.sessions.stream_console(name=session, follow=False):
                    view.skip(session, msg.offset, msg.data)
        tasks = [asyncio.create_task(console(s)) for s in view.offset]
        tasks += [asyncio.create_task(watch_events()), asyncio.create_task(poll())]
        try:
            if start:
                await client.cosim.start_co_simulation(name=name, until_virtual_time_ns=until_ns)
                started = True
            elif ended(first.state):
                done.set()
            await done.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await events.aclose()
        for session in view.offset:  # what the members printed last
            async for msg in client.sessions.stream_console(name=session, offset=view.offset[session], follow=False):
                view.feed(session, msg.offset, msg.data)
        view.flush()
        return (await client.cosim.get_co_simulation(name=name)).cosimulation


def exit_status(client: Client, c: pb.CoSimulation) -> int:
    """0 when the co-simulation paused (a time reached, a breakpoint) or ended with every
    exited member exiting 0; a member's exit code (1..125) or 1 otherwise."""
    if c.state == pb.CO_SIM_STATE_FAILED:
        return 1
    status = 0
    for m in c.members:
        if m.state in (cpb.SESSION_STATE_FAULTED, cpb.SESSION_STATE_FAILED):
            return 1
        if m.state == cpb.SESSION_STATE_EXITED:
            code = client.sessions.get_session(name=m.session).session.exit_code
            if code:
                status = status or (code if 0 < code < 126 else 1)
    return status


def _summary(c: pb.CoSimulation) -> str:
    return f"-- {c.name} {state_name(c.state)} at {ns_text(c.virtual_time_ns)} after {c.quanta:,} quanta: {c.state_reason}"


# ---------------------------------------------------------------------- verbs


def cmd_create(client: Client, args: argparse.Namespace) -> int:
    topo = load_topology(args.file)
    default_backend = ""
    if any(not n.backend for n in topo.nodes):
        default_backend = client.capabilities.get_capabilities().default_backend
    uploaded: dict[str, str] = {}
    created: list[str] = []
    try:
        for i, node in enumerate(topo.nodes):
            program = node.program
            if not program.startswith("programs/"):
                if program not in uploaded:
                    uploaded[program] = client.upload_program(program).program.name
                program = uploaded[program]
            backend = node.backend or default_backend
            options = {"icount": backend == "qemu", **node.options}
            try:
                s = client.sessions.create_session(board_template=node.board, backend=node.backend, program=program,
                                                   session_id=args.id_prefix + node.name, display_name=node.name,
                                                   options=options).session
            except errors.MachineServerError as exc:
                raise TopologyError(f"{args.file}: nodes[{i}] ({node.name}): {exc}") from None
            created.append(s.name)
        session_of = {n.name: s for n, s in zip(topo.nodes, created, strict=True)}
        try:
            resp = client.cosim.create_co_simulation(display_name=args.id_prefix + topo.display_name, sessions=created,
                                                     links=topo.link_requests(session_of), sync=topo.sync)
        except errors.MachineServerError as exc:
            if exc.field_violations:
                where, why = exc.field_violations[0]
                raise TopologyError(f"{exc.code.name}: {args.file}: {topology_field(where, topo)}: {why}") from None
            raise
    except BaseException:
        for name in reversed(created):  # leave nothing half made behind
            with contextlib.suppress(errors.MachineServerError):
                client.sessions.delete_session(name=name)
        raise
    _emit(resp.cosimulation, args, resp)
    return 0


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    name = resolve(client, args.name)
    if args.no_follow:
        resp = client.cosim.start_co_simulation(name=name, until_virtual_time_ns=args.until_ns)
        _emit(resp.cosimulation, args, resp)
        return 0
    try:
        final = asyncio.run(follow(args, name, start=True, until_ns=args.until_ns))
    except KeyboardInterrupt:
        return _interrupted(client, name)
    if output.machine_readable(args):
        output.emit(final, args)
    else:
        print(_summary(final))
    return exit_status(client, final)


def _interrupted(client: Client, name: str) -> int:
    """Ctrl-C while it runs: pause it, say so in one line (where it paused), 130."""
    try:
        paused = client.cosim.pause_co_simulation(name=name).cosimulation
    except errors.MachineServerError as exc:  # it ended meanwhile, or the server went away
        print(f"msctl: interrupted ({exc})", file=sys.stderr)
    else:
        print(f"\nmsctl: interrupted; paused it: {_summary(paused).removeprefix('-- ')}", file=sys.stderr)
    return EXIT_INTERRUPTED


def cmd_console(client: Client, args: argparse.Namespace) -> int:
    name = resolve(client, args.name)
    if args.no_follow:
        c = client.cosim.get_co_simulation(name=name).cosimulation
        view = ConsoleView(list(c.sessions), args.json)
        for session in c.sessions:
            for msg in client.sessions.stream_console(name=session, follow=False):
                view.feed(session, msg.offset, msg.data)
            view.flush()
        return 0
    try:
        asyncio.run(follow(args, name, start=False))
    except KeyboardInterrupt:
        print("msctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    resp = client.cosim.get_co_simulation(name=resolve(client, args.name))
    _emit(resp.cosimulation, args, resp)
    return 0


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    resp = client.cosim.list_co_simulations(page_size=args.page_size, filter=args.filter or "")
    if output.machine_readable(args):
        output.emit(resp, args)
        return 0
    table([[c.name, c.display_name, state_name(c.state), ns_text(c.virtual_time_ns), f"{c.quanta:,}",
            " ".join(short(s) for s in c.sessions),
            f"{short(c.last_stop.session)} {c.last_stop.reason}" if c.last_stop.session else ""]
           for c in resp.cosimulations],
          ["NAME", "DISPLAY NAME", "STATE", "VIRTUAL TIME", "QUANTA", "MEMBERS", "LAST STOP"])
    return 0


def cmd_step(client: Client, args: argparse.Namespace) -> int:
    name = resolve(client, args.name)
    try:
        resp = client.cosim.step_co_simulation(name=name, count=args.count, until_virtual_time_ns=args.until_ns,
                                               timeout=None)
    except KeyboardInterrupt:
        return _interrupted(client, name)
    _emit(resp.cosimulation, args, resp)
    return 0


def cmd_pause(client: Client, args: argparse.Namespace) -> int:
    resp = client.cosim.pause_co_simulation(name=resolve(client, args.name))
    _emit(resp.cosimulation, args, resp)
    return 0


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    name = resolve(client, args.name)
    sessions = list(client.cosim.get_co_simulation(name=name).cosimulation.sessions)
    client.cosim.delete_co_simulation(name=name)
    print(f"deleted {name}")
    if args.sessions:
        for s in sessions:
            client.sessions.delete_session(name=s)
            print(f"deleted {s}")
    return 0


def cmd_snapshot(client: Client, args: argparse.Namespace) -> int:
    resp = client.cosim.create_co_sim_snapshot(parent=resolve(client, args.name), display_name=args.display_name or "")
    if output.machine_readable(args):
        output.emit(resp, args)
    else:
        s = resp.snapshot
        print(f"{s.name}  at {ns_text(s.virtual_time_ns)}, {s.quanta:,} quanta, {s.size_bytes:,} bytes  "
              f"({', '.join(s.shape)})")
    return 0


def cmd_restore(client: Client, args: argparse.Namespace) -> int:
    resp = client.cosim.restore_co_sim_snapshot(name=args.snapshot)
    _emit(resp.cosimulation, args, resp)
    return 0


# ---------------------------------------------------------------------- parser


Handler = Callable[[Client, argparse.Namespace], int]


def one_line_errors(handler: Handler) -> Handler:
    """Errors as one line on stderr: a problem in the topology file (named at its
    place, also when the server found it) exits 2, another refusal of the server 1."""

    def run(client: Client, args: argparse.Namespace) -> int:
        try:
            return handler(client, args)
        except TopologyError as exc:
            print(f"msctl: {exc}", file=sys.stderr)
            return EXIT_INPUT
        except errors.MachineServerError as exc:
            print(f"msctl: {exc}", file=sys.stderr)
            return 1

    return run


def _name_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the co-simulation: cosimulations/ID, ID, or its display name")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="the raw messages as JSON")


def add_verbs(csub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def verb(name: str, handler: Handler, help_text: str, **kw: Any) -> argparse.ArgumentParser:
        p = csub.add_parser(name, help=help_text, description=help_text, **kw)
        p.set_defaults(handler=one_line_errors(handler))
        return p

    p = verb("create", cmd_create, "create the member sessions and the co-simulation from a topology file",
             epilog=TOPOLOGY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-f", "--file", required=True, help="the topology (YAML)")
    p.add_argument("--id-prefix", default="", help="prepended to the node names (the session ids) and to the display name")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="the raw response as JSON")
    p = verb("run", cmd_run, "start it and show every member's console until it stops (Ctrl-C pauses it); "
             "exit 0 when every exited member exited 0")
    _name_arg(p)
    p.add_argument("--until-ns", type=int, default=0, help="pause at this virtual time (ns)")
    p.add_argument("--no-follow", action="store_true", help="start it and return at once")
    p = verb("console", cmd_console, "every member's console, lines prefixed by the member, until it stops or fails")
    _name_arg(p)
    p.add_argument("--no-follow", action="store_true", help="print what is there and stop")
    p = verb("status", cmd_status, "state, virtual time, members, link counters and the last stop")
    _name_arg(p)
    p = verb("list", cmd_list, "co-simulations as a table")
    p.add_argument("--filter", help='e.g. "state=RUNNING"')
    p.add_argument("--page-size", type=int, default=100)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="the raw response as JSON")
    p = verb("step", cmd_step, "run some quanta (default 1) or until a virtual time, then show the status")
    _name_arg(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--count", type=int, default=0, help="quanta to run")
    how.add_argument("--until-ns", type=int, default=0, help="run to the barrier at or after this virtual time (ns)")
    p = verb("pause", cmd_pause, "pause at the next barrier")
    _name_arg(p)
    p = verb("delete", cmd_delete, "delete the co-simulation (its sessions stay unless --sessions)")
    _name_arg(p)
    p.add_argument("--sessions", action="store_true", help="delete its member sessions too")
    p = verb("snapshot", cmd_snapshot, "save every member and the links at the current barrier")
    _name_arg(p)
    p.add_argument("--display-name")
    p = verb("restore", cmd_restore, "bring the members and links back to a snapshot (paused there)")
    p.add_argument("snapshot", help="cosimulations/ID/snapshots/ID")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="the raw response as JSON")
