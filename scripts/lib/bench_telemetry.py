"""Telemetry fan-out benchmark: many StreamHostStatus subscribers against a server process.

Same run, two phases on one server: a single subscriber (the peer figure), then N
subscribers (default 200) at 10 Hz, each for ~5 s. For each phase: messages delivered per
second, delivery % (messages received / (subscribers x samples the shared sampler
published in the window), target >= 99 %), the largest ``dropped`` a subscriber was told
of, and the server process's CPU (psutil on its pid, % of one core).

    .venv/bin/python scripts/lib/bench_telemetry.py [--subscribers 200] [--hz 10] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from google.protobuf import duration_pb2
from grpc import aio

from machineserver.v1 import telemetry_pb2 as tpb
from machineserver.v1 import telemetry_pb2_grpc

VENV_BIN = Path(sys.executable).parent
CHANNELS = 4


class ServerProcess:
    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="ms-bench-telemetry-")
        port_file = Path(self.tmp) / "port"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "machineserver"), "--listen", "127.0.0.1:0", "--data-dir", f"{self.tmp}/data",
             "--port-file", str(port_file), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench_telemetry: the server did not start")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        self.ps = psutil.Process(self.proc.pid)

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Phase:
    subscribers: int
    window_s: float
    received: int
    published: int
    max_dropped: int
    server_cpu_percent: float

    @property
    def per_second(self) -> float:
        return self.received / self.window_s

    @property
    def delivery(self) -> float:
        expected = self.subscribers * self.published
        return 100.0 * self.received / expected if expected else 0.0


async def phase(server: ServerProcess, subscribers: int, hz: float, seconds: float) -> Phase:
    channels = [aio.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(min(CHANNELS, subscribers))]
    stubs = [telemetry_pb2_grpc.TelemetryServiceStub(c) for c in channels]
    interval = duration_pb2.Duration()
    interval.FromNanoseconds(int(1e9 / hz))
    ready = 0
    all_ready = asyncio.Event()
    window: list[int] = []  # [start_ns, end_ns] in the server's sample clock, once known
    seen: list[set[int]] = [set() for _ in range(subscribers)]
    max_dropped = 0

    async def subscribe(i: int) -> None:
        nonlocal ready, max_dropped
        call = stubs[i % len(stubs)].StreamHostStatus(tpb.StreamHostStatusRequest(interval=interval))
        first = True
        try:
            async for msg in call:
                if first:
                    first = False
                    ready += 1
                    if ready == subscribers:
                        all_ready.set()
                t = msg.status.time.ToNanoseconds()
                if window and window[0] <= t < window[1]:
                    seen[i].add(t)
                    max_dropped = max(max_dropped, msg.dropped)
                elif window and t >= window[1]:
                    return
        finally:
            call.cancel()

    tasks = [asyncio.create_task(subscribe(i)) for i in range(subscribers)]
    await asyncio.wait_for(all_ready.wait(), 60)
    await asyncio.sleep(0.5)  # settle
    start_ns = time.time_ns() + int(0.2e9)
    window[:] = [start_ns, start_ns + int(seconds * 1e9)]
    await asyncio.sleep((start_ns - time.time_ns()) / 1e9)
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), 10 + seconds)
    except TimeoutError:
        for t in tasks:
            t.cancel()
    for c in channels:
        await c.close()
    published = len(set().union(*seen))
    return Phase(subscribers, seconds, sum(len(s) for s in seen), published, max_dropped,
                 100.0 * (cpu1 - cpu0) / (t1 - t0))


async def main_async(args: argparse.Namespace) -> int:
    server = ServerProcess()
    try:
        one = await phase(server, 1, args.hz, args.seconds)
        many = await phase(server, args.subscribers, args.hz, args.seconds)
    finally:
        server.stop()
    print(f"telemetry fan-out: StreamHostStatus at {args.hz:g} Hz for {args.seconds:g} s "
          f"({psutil.cpu_count()} CPUs, client and server on this host)")
    for p in (one, many):
        print(f"  {p.subscribers:>4} subscriber(s)  {p.per_second:9.1f} msg/s  delivery {p.delivery:6.2f} %  "
              f"({p.received}/{p.subscribers}x{p.published} samples, {args.hz * args.seconds:g} due)  "
              f"max dropped {p.max_dropped}  "
              f"server CPU {p.server_cpu_percent:5.1f} %")
    per_sub_cpu = (many.server_cpu_percent - one.server_cpu_percent) / max(1, many.subscribers - 1)
    print(f"  server CPU per extra subscriber {per_sub_cpu:.3f} % of a core; "
          f"delivery target >= 99 %: {'met' if many.delivery >= 99 else 'NOT met'}")
    return 0 if many.delivery >= 99 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=200)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
