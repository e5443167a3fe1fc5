"""Host status streams: many subscribers share one sampler; a subscriber that never reads
loses its oldest samples (counted in ``dropped``) without slowing the others; the
subscriber limit answers RESOURCE_EXHAUSTED. psutil for real throughout."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer
from machineserver.server.core.telemetry import Telemetry
from machineserver.v1 import telemetry_pb2 as tpb
from machineserver.v1 import telemetry_pb2_grpc
from tests.helpers.api import duration, until


async def test_many_subscribers_share_one_stream(client: AsyncClient, server: RunningServer) -> None:
    async def take(n: int) -> list[tpb.StreamHostStatusResponse]:
        out = []
        async for msg in client.telemetry.stream_host_status(interval=duration(0.05)):
            out.append(msg)
            if len(out) == n:
                break
        return out

    results = await asyncio.gather(*(take(8) for _ in range(60)))
    assert all(len(r) == 8 for r in results)
    assert len(server.engine.telemetry._samplers) == 1
    # everyone saw the same samples (one sampler), at the interval
    times = {tuple(m.status.time.ToNanoseconds() for m in r) for r in results}
    assert len({t[-1] for t in times}) <= 3
    # the server sees the 60 cancels asynchronously (nothing signals it): poll
    await until(lambda: server.engine.telemetry.subscriber_count() == 0)


async def test_slow_subscriber_drops_without_slowing_the_others_core(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """At the core: the publisher and fast subscribers keep the rate; the one that never
    reads keeps only the newest samples and counts the rest."""
    from machineserver.server.core.telemetry import sample_host
    from machineserver.server.store.db import Database

    tel = Telemetry(Database(tmp_path / "t.db"), sample=sample_host)
    period = 0.02
    slow = tel.subscribe_host(period)
    fast = [tel.subscribe_host(period) for _ in range(20)]
    got = [0] * len(fast)

    async def read(i: int) -> None:
        while await fast[i].get() is not None:
            got[i] += 1

    readers = [asyncio.create_task(read(i)) for i in range(len(fast))]
    t0 = time.monotonic()
    await asyncio.sleep(2.0)  # the window the rates are measured over (the thing under test)
    elapsed = time.monotonic() - t0
    await tel.stop()
    await asyncio.gather(*readers)
    expected = elapsed / period
    assert min(got) >= 0.8 * expected, (min(got), expected)
    assert all(f.dropped == 0 for f in fast)
    kept = len(slow._items)
    assert kept == 16 and slow.dropped >= min(got) - kept - 2


async def test_slow_grpc_subscriber_gets_dropped_count(client: AsyncClient, server: RunningServer) -> None:
    """Over gRPC: one call that is never read (its HTTP/2 window fills, its server-side
    queue then drops) while other subscribers receive at the rate; when it finally reads,
    the messages carry the dropped count."""
    period = 0.01
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}",
                                        options=[("grpc.http2.bdp_probe", 0)])
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    slow = stub.StreamHostStatus(tpb.StreamHostStatusRequest(interval=duration(period)))
    try:
        counts: list[int] = []
        fast_dropped: list[int] = []

        async def fast() -> None:
            n = dropped = 0
            end = asyncio.get_running_loop().time() + 3.0
            async for msg in client.telemetry.stream_host_status(interval=duration(period)):
                n += 1
                dropped = max(dropped, msg.dropped)
                if asyncio.get_running_loop().time() >= end:
                    break
            counts.append(n)
            fast_dropped.append(dropped)

        await asyncio.gather(*(fast() for _ in range(5)))
        # Not a timing test (the sampler itself slows on a loaded machine): the readers
        # lose nothing, and all got the same samples, while the unread one drops.
        assert fast_dropped == [0] * 5, fast_dropped
        assert min(counts) >= 20 and max(counts) - min(counts) <= 3, counts
        assert server.engine.telemetry.dropped_total() > 0  # the unread one, server side
        dropped = 0
        async for msg in slow:
            dropped = max(dropped, msg.dropped)
            if dropped:
                break
        assert dropped > 0
    finally:
        slow.cancel()
        await channel.close()


async def test_subscriber_limit_is_resource_exhausted(client: AsyncClient, server: RunningServer) -> None:
    server.engine.telemetry.max_subscribers = 3
    started = asyncio.Event()
    held = 0

    async def hold() -> None:
        nonlocal held
        async for _ in client.telemetry.stream_host_status(interval=duration(0.05)):
            held += 1
            if held >= 3:
                started.set()
            await asyncio.sleep(30)  # holds its slot (the thing under test)

    tasks = [asyncio.create_task(hold()) for _ in range(3)]
    try:
        await asyncio.wait_for(started.wait(), 10)
        with pytest.raises(errors.ResourceExhausted):
            async for _ in client.telemetry.stream_host_status(interval=duration(0.05)):
                pass
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await until(lambda: server.engine.telemetry.subscriber_count() == 0)
    async for _ in client.telemetry.stream_host_status(interval=duration(0.05)):
        break  # a slot is free again once the holders left


