"""Control plane (issue 11): unary calls next to a bare grpc.aio server, and board templates
at scale.

* GetCapabilities (a ~2 KB answer built from cached data) through the SDK vs a bare
  grpc.aio echo server in its own process (empty message, raw channel): p50 and p99 of
  sequential calls, throughput with 16 callers. Targets: p50 <= 1.15x, throughput >= 0.9x.
  The same call on a raw channel (the peer's client path: bytes in, bytes out) leaves the
  SDK out; and next to the bare server answering the same bytes it leaves the size of the
  answer out too: what remains is our share.
* Board templates, on a server of their own holding 3,893 user templates (created through
  the API first; the shipped four besides) next to this run's server, which holds only the
  shipped four: ListBoardTemplates' first page (the default 50) p50, target <= 50 ms, next
  to ListSessions on the same server; a page of 4 with 3,893 templates vs with 4 (the cost
  must not grow with the catalog); a page deep in the list vs the first; the whole walk.
  Then the same server restarted on its data: start-up time next to an empty server's,
  and each page of 50 read once (nothing cached yet) vs the same pages read again.
* No call waits behind a slow one: ListSessions p99 with 16 callers while one client walks
  all 3,893 templates (pages of 1,000) over and over, vs the same callers without it.

Rounds interleave ours and the peer's; figures are percentiles or medians over all rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from bench import VENV_BIN, Server, latency, line, pct, single, throughput
from grpc import aio

from machineserver.sdk import AsyncClient

# Echo: the request back (the bench sends an empty one); Fixed: the bytes given on stdin
ECHO_SERVER = r'''
import asyncio, grpc, sys
from grpc import aio
FIXED = sys.stdin.buffer.read()
async def main():
    server = aio.server()
    async def echo(req, ctx): return req
    async def fixed(req, ctx): return FIXED
    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo),
                "Fixed": grpc.unary_unary_rpc_method_handler(fixed)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
'''
# walks every template, pages of 1,000, until stdin closes; prints how many walks it made
# (a process of its own: a 1 MB page costs the client's event loop too)
WALKER = r'''
import asyncio, sys, threading
from machineserver.sdk import AsyncClient
async def main():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    walks = 0
    async with await AsyncClient.connect(sys.argv[1], timeout=120) as c:
        print("ready", flush=True)
        while not stop.is_set():
            token = ""
            while True:
                page = await c.capabilities.list_board_templates(page_size=1000, page_token=token)
                token = page.next_page_token
                if not token:
                    break
            walks += 1
    print(walks, flush=True)
asyncio.run(main())
'''
GET_CAPABILITIES = "/machineserver.v1.CapabilitiesService/GetCapabilities"
ROUNDS = 3
USER_TEMPLATES = 3_893
SHIPPED = ("lm3s6965evb", "mps2-an385", "netduinoplus2", "sifive_e")


@contextlib.asynccontextmanager
async def echo_server(fixed: bytes = b"") -> AsyncIterator[str]:
    """A bare grpc.aio server in a process of its own; its Fixed method answers ``fixed``."""
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdin=subprocess.PIPE,  # noqa: ASYNC220 - set-up
                            stdout=subprocess.PIPE)
    try:
        echo.stdin.write(fixed)  # type: ignore[union-attr]
        echo.stdin.close()  # type: ignore[union-attr]
        port = int(await asyncio.to_thread(echo.stdout.readline))  # type: ignore[union-attr]
        yield f"127.0.0.1:{port}"
    finally:
        echo.kill()
        echo.wait()


async def bench_control_plane(server: Server) -> None:
    await unary_vs_echo(server)
    await templates_at_scale(server)


async def unary_vs_echo(server: Server) -> None:
    print("control plane: GetCapabilities vs a bare grpc.aio echo server (separate processes)")
    async with aio.insecure_channel(server.target) as raw_ch:
        raw_call = raw_ch.unary_unary(GET_CAPABILITIES)
        answer = await raw_call(b"")  # the same bytes, for the bare server's Fixed
        async with echo_server(answer) as echo_target, aio.insecure_channel(echo_target) as echo_ch, \
                await AsyncClient.connect(server.target) as client:
            echo_call = echo_ch.unary_unary("/bench.Echo/Echo")
            fixed_call = echo_ch.unary_unary("/bench.Echo/Fixed")

            async def peer() -> object:
                return await echo_call(b"")

            async def same_answer() -> object:
                return await fixed_call(b"")

            async def ours() -> object:
                return await client.capabilities.get_capabilities()

            async def ours_raw() -> object:
                return await raw_call(b"")

            calls = {"peer": peer, "ours": ours, "raw": ours_raw, "fixed": same_answer}
            for f in calls.values():
                await latency(f, 200)  # warm up
            # interleaved rounds, so background noise falls on all alike
            lat: dict[str, list[float]] = {k: [] for k in calls}
            tps: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(ROUNDS):
                for k, f in calls.items():
                    lat[k] += await latency(f, 400)
                    tps[k].append(await throughput(f, 16, 1.5))
    tp = {k: statistics.median(v) for k, v in tps.items()}
    line("unary p50 (cost ratio)", pct(lat["ours"], 0.5), pct(lat["peer"], 0.5), "ms", "target <= 1.15x")
    line("unary p99 (cost ratio)", pct(lat["ours"], 0.99), pct(lat["peer"], 0.99), "ms", "target <= 1.2x")
    line("throughput, 16 callers (speed ratio)", tp["ours"], tp["peer"], "call/s", "target >= 0.9x")
    line("raw channel: unary p50 (cost ratio)", pct(lat["raw"], 0.5), pct(lat["peer"], 0.5), "ms",
         "no SDK: bytes in, bytes out")
    line("raw channel: throughput, 16 callers", tp["raw"], tp["peer"], "call/s", "no SDK: bytes in, bytes out")
    line(f"raw vs a bare server sending the same {len(answer):,} B: p50", pct(lat["raw"], 0.5),
         pct(lat["fixed"], 0.5), "ms", "our share alone")
    line("  the same, throughput, 16 callers", tp["raw"], tp["fixed"], "call/s", "our share alone")


def restart(server: Server) -> float:
    """Stop ``server`` and start it again on the same data: seconds until it listens."""
    port_file = Path(server.tmp) / "port"
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    port_file.unlink()
    t = time.perf_counter()
    server.proc = subprocess.Popen(
        [str(VENV_BIN / "machineserver"), "--listen", "127.0.0.1:0", "--data-dir", f"{server.tmp}/data",
         "--port-file", str(port_file), "--log-level", "warning", "--max-sessions", "10000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not port_file.exists():
        if server.proc.poll() is not None:
            raise SystemExit("bench: the server did not start again")
        time.sleep(0.01)
    server.target = f"127.0.0.1:{port_file.read_text()}"
    return time.perf_counter() - t


def user_template(i: int, shipped: dict[str, str]) -> str:
    base = SHIPPED[i % len(SHIPPED)]
    return shipped[base].replace(f"name: {base}", f"name: user-{i:05d}", 1)


async def create_templates(client: AsyncClient, count: int) -> float:
    """Create ``count`` templates (16 callers); templates created per second."""
    shipped = {n: (await client.capabilities.get_board_template(name=n)).board_template.config for n in SHIPPED}
    todo = iter(range(count))

    async def creator() -> None:
        for i in todo:
            await client.capabilities.create_board_template(config=user_template(i, shipped))

    t = time.perf_counter()
    await asyncio.gather(*(creator() for _ in range(16)))
    return count / (time.perf_counter() - t)


async def walk(client: AsyncClient, page_size: int = 1000) -> int:
    """Every template, page by page; how many."""
    seen, token = 0, ""
    while True:
        page = await client.capabilities.list_board_templates(page_size=page_size, page_token=token)
        seen += len(page.board_templates)
        token = page.next_page_token
        if not token:
            return seen


async def interleaved(calls: dict[str, Callable[[], Awaitable[object]]], n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(ROUNDS):
        for k, f in calls.items():
            out[k] += await latency(f, n)
    return out


async def templates_at_scale(small: Server) -> None:
    print(f"control plane: board templates, {USER_TEMPLATES:,} user templates on a server of their own")
    big = Server()
    try:
        async with await AsyncClient.connect(big.target, timeout=120) as c, \
                await AsyncClient.connect(small.target, timeout=120) as s:
            rate = await create_templates(c, USER_TEMPLATES)
            total = await walk(c)
            assert total == USER_TEMPLATES + len(SHIPPED), total
            small_total = await walk(s)
            single("CreateBoardTemplate, 16 callers", rate, "tmpl/s", "set-up")
            # a token deep in the list: the page after the 3,000th template
            deep = (await c.capabilities.list_board_templates(page_size=3000)).next_page_token

            figures = await interleaved({
                "first": lambda: c.capabilities.list_board_templates(),
                "sessions": lambda: c.sessions.list_sessions(),
                "four_big": lambda: c.capabilities.list_board_templates(page_size=4),
                "four_small": lambda: s.capabilities.list_board_templates(page_size=4),
                "deep": lambda: c.capabilities.list_board_templates(page_token=deep),
                "caps_big": lambda: c.capabilities.get_capabilities(),
                "caps_small": lambda: s.capabilities.get_capabilities(),
            }, 60)
            single(f"ListBoardTemplates first page (50), {USER_TEMPLATES:,} tmpl, p50",
                   pct(figures["first"], 0.5), "ms", "target <= 50 ms")
            single("  the same, p99", pct(figures["first"], 0.99), "ms", "")
            line("ListBoardTemplates first page (50) vs ListSessions", pct(figures["first"], 0.5),
                 pct(figures["sessions"], 0.5), "ms", "same server")
            line(f"page of 4: {USER_TEMPLATES:,} vs {small_total} templates", pct(figures["four_big"], 0.5),
                 pct(figures["four_small"], 0.5), "ms", "cost ratio, target ~1x: no growth")
            line("page after the 3,000th vs the first page", pct(figures["deep"], 0.5),
                 pct(figures["first"], 0.5), "ms", "cost ratio, target ~1x")
            line(f"GetCapabilities: {USER_TEMPLATES:,} vs {small_total} templates", pct(figures["caps_big"], 0.5),
                 pct(figures["caps_small"], 0.5), "ms", "every board is named in it: bigger answer")
            walks = []
            for _ in range(ROUNDS):
                t = time.perf_counter()
                await walk(c)
                walks.append((time.perf_counter() - t) * 1000)
            single(f"walk all {total:,} templates, pages of 1,000, median", statistics.median(walks), "ms", "")
            await slow_call_p99(c, big.target)
        await after_restart(big)
    finally:
        big.stop()


async def after_restart(big: Server) -> None:
    """The big server stopped and started on its data: start-up, then every page of 50
    read for the first time (nothing cached) vs read again."""
    restarted = restart(big) * 1000
    t = time.perf_counter()
    empty = Server()
    fresh = (time.perf_counter() - t) * 1000
    empty.stop()
    single(f"server start with {USER_TEMPLATES:,} templates (restart)", restarted, "ms",
           f"an empty server: {fresh:.0f} ms")
    async with await AsyncClient.connect(big.target, timeout=120) as c:
        tokens, token = [""], ""
        cold: list[float] = []
        while True:
            t = time.perf_counter()
            page = await c.capabilities.list_board_templates(page_token=token)
            cold.append((time.perf_counter() - t) * 1000)
            token = page.next_page_token
            if not token:
                break
            tokens.append(token)
        warm: list[float] = []
        for token in tokens:
            t = time.perf_counter()
            await c.capabilities.list_board_templates(page_token=token)
            warm.append((time.perf_counter() - t) * 1000)
    line(f"each page of 50 read once after the restart, p50 ({len(cold)} pages)", pct(cold, 0.5), pct(warm, 0.5),
         "ms", "vs read again; target <= 50 ms")
    line("  the same, p99", pct(cold, 0.99), pct(warm, 0.99), "ms", "")


async def slow_call_p99(c: AsyncClient, target: str) -> None:
    """ListSessions p99 with 16 callers, with and without another client (a process of its
    own) walking every template."""
    async def p99_window(seconds: float) -> list[float]:
        stop_at = time.perf_counter() + seconds
        out: list[float] = []

        async def caller() -> None:
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                await c.sessions.list_sessions()
                out.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(caller() for _ in range(16)))
        return out

    alone: list[float] = []
    beside: list[float] = []
    walks = 0
    for _ in range(ROUNDS):
        alone += await p99_window(2.0)
        walker = subprocess.Popen([sys.executable, "-c", WALKER, target], stdin=subprocess.PIPE,  # noqa: ASYNC220
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert (await asyncio.to_thread(walker.stdout.readline)).strip() == "ready"  # type: ignore[union-attr]
            await asyncio.sleep(0.2)  # the walk is under way
            beside += await p99_window(2.0)
            out, _ = await asyncio.to_thread(walker.communicate, "", 120)
            walks += int(out.strip() or 0)
        finally:
            if walker.poll() is None:
                walker.kill()
                walker.wait()
    line(f"ListSessions p99, 16 callers, while walking {USER_TEMPLATES:,} tmpl", pct(beside, 0.99),
         pct(alone, 0.99), "ms", f"vs without; {walks} walks; no call waits behind another")
    line("  the same, p50", pct(beside, 0.5), pct(alone, 0.5), "ms", "")
