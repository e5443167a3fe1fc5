"""QEMU at scale: 256 QEMU sessions created and powered on through the API (halted, the
program loaded), and what they cost in memory, each figure next to a peer from this run:
a bare QEMU of the same board started by hand (``-S``, halted, no plugin, no sockets).

* per session: the QEMU's resident set (RSS: what ``top`` shows, shared pages counted in
  every process) and its own memory (USS: pages no other process maps), against the bare
  QEMU's; the worker processes' growth and the server's growth, divided by the sessions;
* the total: every QEMU's proportional share (PSS: shared pages divided among the
  processes that map them) plus the workers' and the server's growth, per session and for
  all of them (a spare QEMU per worker is counted in it: it is part of the cost);
* CapabilitiesService's ``memory_bytes`` for the board against the measured per session.

``MS_BENCH_QEMU_SESSIONS`` sets how many (default 256). Creation runs ``BATCH`` calls at a
time; if a creation fails (a limit of this host), what was created is measured and the
figures for 256 are extrapolated from it, saying so.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

import psutil
from bench import Server, firmware, line, single

BOARD = "mps2-an385"
SESSIONS = int(os.environ.get("MS_BENCH_QEMU_SESSIONS", "256"))
BATCH = 8
BARE = 5
MIB = 1024 * 1024


@dataclass
class Memory:
    rss: int
    uss: int
    pss: int


def _memory(proc: psutil.Process) -> Memory:
    info = proc.memory_full_info()
    return Memory(info.rss, info.uss, info.pss)


def bare_qemus(count: int = BARE) -> list[Memory]:
    """``count`` bare QEMUs of the board by hand, halted, all up at once (so they share
    what QEMUs share); their memory once each has answered on its QMP socket."""
    procs: list[subprocess.Popen[bytes]] = []
    out: list[Memory] = []
    with tempfile.TemporaryDirectory(prefix="ms-bench-bare-") as tmp:
        try:
            for i in range(count):
                path = os.path.join(tmp, f"qmp{i}.sock")
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(path)
                listener.listen(1)
                procs.append(subprocess.Popen(
                    ["qemu-system-arm", "-M", BOARD, "-nographic", "-monitor", "none", "-nodefaults", "-S",
                     "-chardev", f"socket,id=qmp,fd={listener.fileno()},server=on,wait=off",
                     "-mon", "chardev=qmp,mode=control"],
                    pass_fds=[listener.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                listener.close()
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    client.settimeout(30)
                    client.connect(path)
                    client.recv(4096)  # the greeting: QEMU is up
            out = [_memory(psutil.Process(p.pid)) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return out


@dataclass
class Tree:
    server: psutil.Process
    workers: list[psutil.Process]
    qemus: list[psutil.Process]


def tree(server: Server) -> Tree:
    """The server, its worker processes (forks of its zygote) and their QEMUs."""
    top = psutil.Process(server.proc.pid)
    workers, qemus = [], []
    for child in top.children(recursive=True):
        try:
            name = child.name()
            if name.startswith("qemu-system"):
                qemus.append(child)
            elif child.ppid() != top.pid and "worker.zygote" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:
            continue
    return Tree(top, workers, qemus)


async def _create(c: object, program: str, count: int) -> tuple[list[str], str]:
    """Up to ``count`` sessions powered on, BATCH at a time; their names, and why it
    stopped short ("" when all were made)."""
    names: list[str] = []

    async def one() -> str:
        s = (await c.sessions.create_session(board_template=BOARD, program=program,  # type: ignore[attr-defined]
                                             power_on=True, backend="qemu", timeout=120)).session
        return str(s.name)

    while len(names) < count:
        batch = await asyncio.gather(*(one() for _ in range(min(BATCH, count - len(names)))),
                                     return_exceptions=True)
        names += [n for n in batch if isinstance(n, str)]
        failed = [e for e in batch if isinstance(e, BaseException)]
        if failed:
            return names, f"{type(failed[0]).__name__}: {failed[0]}"
    return names, ""


async def bench_qemu_scale(server: Server) -> None:
    from machineserver.sdk import AsyncClient

    print(f"qemu at scale ({BOARD}): {SESSIONS} sessions powered on through the API, halted; peer: a bare "
          "QEMU of the board started by hand (-S)")
    async with await AsyncClient.connect(server.target, timeout=120) as c:
        program = (await c.upload_program(str(firmware(BOARD, "crc32")))).program.name
        # the workers up (one session made and deleted), then the baseline
        warm = (await c.sessions.create_session(board_template=BOARD, program=program, power_on=True,
                                                backend="qemu")).session.name
        await c.sessions.delete_session(name=warm)
        await asyncio.sleep(1.0)
        before = tree(server)
        server_before = before.server.memory_info().rss
        workers_before = {w.pid: w.memory_info().rss for w in before.workers}

        t0 = time.perf_counter()
        names, short = await _create(c, program, SESSIONS)
        created_s = time.perf_counter() - t0
        await asyncio.sleep(2.0)  # spares started on demand settle too
        after = tree(server)
        qemus = [_memory(q) for q in after.qemus]
        workers_growth = sum(w.memory_info().rss - workers_before.get(w.pid, 0) for w in after.workers)
        server_growth = after.server.memory_info().rss - server_before
        caps = await c.capabilities.get_capabilities()
        estimate = next((f.memory_bytes for b in caps.backends if b.name == "qemu"
                         for f in b.board_footprints if f.board == BOARD), 0)
        t0 = time.perf_counter()
        for i in range(0, len(names), BATCH):
            await asyncio.gather(*(c.sessions.delete_session(name=n) for n in names[i:i + BATCH]))
        deleted_s = time.perf_counter() - t0
    bare = bare_qemus()

    n = len(names)
    if short:
        print(f"  only {n} of {SESSIONS} sessions were created ({short}); totals for {SESSIONS} are extrapolated")
    spares = len(qemus) - n
    rss = statistics.median(m.rss for m in qemus) / MIB
    uss = statistics.median(m.uss for m in qemus) / MIB
    bare_rss = statistics.median(m.rss for m in bare) / MIB
    bare_uss = statistics.median(m.uss for m in bare) / MIB
    pss_total = sum(m.pss for m in qemus) / MIB
    total = pss_total + workers_growth / MIB + server_growth / MIB
    per_session = total / n
    line("QEMU RSS per session (median)", rss, bare_rss, "MiB", "cost; shared pages counted in each")
    line("QEMU own memory (USS) per session (median)", uss, bare_uss, "MiB", "cost")
    single(f"workers' growth per session ({len(after.workers)} workers)", workers_growth / MIB / n, "MiB",
           "Python side of a machine, and the workers it took")
    single("server's growth per session", server_growth / MIB / n, "MiB", "the session's records and streams")
    line("total per session (QEMU PSS + workers + server)", per_session, bare_rss, "MiB",
         "cost vs one bare QEMU alone")
    single(f"total for {SESSIONS} sessions" + (" (extrapolated)" if n < SESSIONS else ""),
           per_session * SESSIONS / 1024, "GiB", f"{n} measured, {spares} spare QEMU(s) included")
    single(f"RSS summed over the {len(qemus)} QEMUs (what top adds up)", sum(m.rss for m in qemus) / MIB / 1024,
           "GiB", "overcounts shared pages")
    single("sessions created and powered on per second", n / created_s, "/s", f"{BATCH} calls at a time")
    single("sessions deleted per second", n / deleted_s, "/s", f"{BATCH} calls at a time")
    if estimate:
        line("CapabilitiesService memory_bytes vs measured per session", estimate / MIB, per_session, "MiB",
             "the estimate against this run")
    else:
        print("  CapabilitiesService reports no memory_bytes for the board")
