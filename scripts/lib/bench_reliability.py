"""The reliability suite's long form (issue 14): ``scripts/bench reliability``.

* R1 fuzz (30,000 cases), R2 durability (50 SIGKILL rounds), R3 backend death, R4
  disconnects (1,000 vanishing clients), R6 bad firmware: the tests of tests/reliability
  run by pytest at the long form's sizes (MS_RELIABILITY_* variables, each kept when
  already set), their figures read back from the file they append to.
* R7 load: 100 sessions x 10 clients for 60 s against a server process, zero errors,
  p50/p99, next to the same number of callers for as long against a bare grpc.aio echo
  server (the peer of the control-plane section) measured in the same run.

  scripts/bench reliability [--skip-tests] [--only-tests PATTERN]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import ROOT, VENV_BIN, Server, line, single
from bench_control_plane import echo_server
from grpc import aio

sys.path.insert(0, str(ROOT))
from machineserver.sdk import AsyncClient
from tests.reliability.load import LoadResult, drive, make_sessions, session_callers

LONG_FORM = {
    "MS_RELIABILITY_FUZZ_CASES": "30000",
    "MS_RELIABILITY_DURABILITY_ROUNDS": "50",
    "MS_RELIABILITY_DISCONNECT_CLIENTS": "1000",
}
LOAD_SESSIONS = int(os.environ.get("MS_RELIABILITY_LOAD_SESSIONS", "100"))
LOAD_CLIENTS = int(os.environ.get("MS_RELIABILITY_LOAD_CLIENTS", "10"))
LOAD_SECONDS = int(os.environ.get("MS_RELIABILITY_LOAD_SECONDS", "60"))
CHANNELS = 16


def run_tests(pattern: str) -> list[dict[str, object]]:
    """tests/reliability at the long form's sizes (not the load test: R7 runs below with
    its peer); the figures each check reported."""
    with tempfile.NamedTemporaryFile("r", prefix="ms-reliability-", suffix=".jsonl") as figures:
        env = {**os.environ, "MS_RELIABILITY_FIGURES": figures.name, "MS_REQUIRE_TEST_TOOLS": "1"}
        for key, value in LONG_FORM.items():
            env.setdefault(key, value)
        command = [str(VENV_BIN / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=0",
                   "--tb=short", "--show-capture=no",  # a failure's traceback, not the server's log lines
                   "tests/reliability", "--ignore", "tests/reliability/test_load.py", *(["-k", pattern] if pattern else [])]
        print(f"  pytest tests/reliability, {', '.join(f'{k}={env[k]}' for k in LONG_FORM)}", flush=True)
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        summary = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:]
        print(f"  pytest: {' '.join(summary)}")
        if proc.returncode != 0:
            print(proc.stdout[-6000:])
            print(proc.stderr[-2000:])
        return [json.loads(ln) for ln in Path(figures.name).read_text().splitlines() if ln.strip()]


def print_figures(figures: list[dict[str, object]]) -> None:
    for fig in figures:
        check = fig.pop("check")
        if check == "R1 fuzz":
            single("R1 fuzz: cases run", float(fig["cases"]), "cases", f"{fig['methods']} RPCs, no UNKNOWN/INTERNAL")  # type: ignore[arg-type]
            print(f"  {'R1 fuzz: codes seen':<46} {fig['codes']}")
            if fig.get("known_issues"):
                print(f"  {'R1 fuzz: known issues left to others':<46} {fig['known_issues']}")
        elif check == "R2 durability":
            single("R2 durability: SIGKILL rounds", float(fig["rounds"]), "rounds",  # type: ignore[arg-type]
                   f"{fig['acknowledged_writes']} acknowledged writes, {fig['lost']} lost, integrity ok, "
                   f"{fig['blobs']} blobs match")
        elif check == "R4 disconnects":
            single("R4 disconnects: vanished clients", float(fig["clients"]), "clients",  # type: ignore[arg-type]
                   f"leaked fds {fig['leaked_fds']}, threads {fig['leaked_threads']}, "
                   f"processes {fig['leaked_processes']}")
        else:
            print(f"  {check}: {fig}")


async def load_vs_echo() -> None:
    print(f"R7 load: {LOAD_SESSIONS} sessions x {LOAD_CLIENTS} clients for {LOAD_SECONDS} s "
          f"vs the same callers on a bare grpc.aio echo server")
    server = Server()
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(await AsyncClient.connect(server.target, timeout=60))
                       for _ in range(CHANNELS)]
            hello = ROOT / "tests" / "firmware" / "build" / "lm3s6965evb" / "hello.elf"
            if not hello.exists():
                hello = ROOT / "tests" / "firmware" / "prebuilt" / "lm3s6965evb" / "hello.elf"
            program = (await clients[0].upload_program(hello)).program.name
            sessions = await make_sessions(clients[0], program, LOAD_SESSIONS)
            ours = await drive(session_callers(clients, sessions, LOAD_CLIENTS), LOAD_SECONDS)
        async with echo_server() as target, contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(aio.insecure_channel(
                target, options=[("grpc.use_local_subchannel_pool", 1)])) for _ in range(CHANNELS)]
            calls = [ch.unary_unary("/bench.Echo/Echo") for ch in channels]
            callers = [(lambda call=calls[k % CHANNELS]: call(b"")) for k in range(LOAD_SESSIONS * LOAD_CLIENTS)]
            peer = await drive(callers, LOAD_SECONDS)  # type: ignore[arg-type]
    finally:
        server.stop()
    report_load(ours, peer)


def report_load(ours: LoadResult, peer: LoadResult) -> None:
    single("R7 errors", float(len(ours.errors)), "calls", f"of {ours.calls}, target 0")
    if ours.errors:
        print(f"    e.g. {ours.errors[:3]}")
    line("R7 p50 latency, ours vs echo peer", ours.pct(0.5), peer.pct(0.5), "ms", "cost")
    line("R7 p99 latency, ours vs echo peer", ours.pct(0.99), peer.pct(0.99), "ms", "cost; p99 reported")
    line("R7 calls/s, ours vs echo peer", ours.calls / ours.seconds, peer.calls / peer.seconds, "calls", "speed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tests", action="store_true", help="only R7 (the load next to its peer)")
    parser.add_argument("--only-tests", default="", help="a pytest -k expression over tests/reliability")
    parser.add_argument("--skip-load", action="store_true", help="only the tests (R1-R4, R6)")
    args = parser.parse_args()
    print("reliability (long form)")
    if not args.skip_tests:
        print_figures(run_tests(args.only_tests))
    if not args.skip_load:
        asyncio.run(load_vs_echo())


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()
