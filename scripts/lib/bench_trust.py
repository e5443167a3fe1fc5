"""Trust (issue 14): what authentication costs a call.

* GetCapabilities through the SDK on a server with auth on (an API key on every call: the
  key's hash looked up, the role table consulted, the caller stamped) next to the same call
  on this run's server with auth off, and next to the bare grpc.aio echo server: p50 and
  p99 of sequential calls, throughput with 16 callers. Target: auth on costs <= 1.15x auth
  off at p50.
* A mutating call with its audit entry (CreateAlertRule + DeleteAlertRule: two records, two
  audit rows in the same transactions) with auth on vs off.

Rounds interleave the servers; figures are percentiles or medians over all rounds.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import yaml
from bench import Server, latency, line, pct, throughput
from bench_control_plane import echo_server
from grpc import aio

from machineserver.sdk import AsyncClient

ROUNDS = 3
RULE = {"metric": "cpu.percent", "comparison": "COMPARISON_GREATER", "threshold": 99, "duration": "0s"}


def auth_server() -> tuple[Server, str]:
    """A server of its own with auth on; its bootstrap admin key."""
    folder = Path(tempfile.mkdtemp(prefix="ms-bench-auth-"))
    key_file = folder / "admin.key"
    config = folder / "server.yaml"
    config.write_text(yaml.safe_dump({"auth": {"enabled": True, "bootstrap_admin_key_file": str(key_file)}}))
    server = Server(["--config", str(config)])
    return server, key_file.read_text().split()[0]


async def bench_trust(server: Server) -> None:
    print("trust: authentication on (API key) vs off, same call; the bare grpc.aio echo server")
    secured, key = auth_server()
    try:
        async with echo_server() as echo_target, aio.insecure_channel(echo_target) as echo_ch, \
                await AsyncClient.connect(server.target) as open_client, \
                await AsyncClient.connect(secured.target, api_key=key) as key_client:
            echo_call = echo_ch.unary_unary("/bench.Echo/Echo")

            async def peer() -> object:
                return await echo_call(b"")

            async def auth_off() -> object:
                return await open_client.capabilities.get_capabilities()

            async def auth_on() -> object:
                return await key_client.capabilities.get_capabilities()

            async def mutate(client: AsyncClient) -> None:
                rule = (await client.telemetry.create_alert_rule(rule=RULE)).rule
                await client.telemetry.delete_alert_rule(name=rule.name)

            async def mutate_off() -> object:
                return await mutate(open_client)

            async def mutate_on() -> object:
                return await mutate(key_client)

            calls = {"peer": peer, "off": auth_off, "on": auth_on}
            writes = {"off": mutate_off, "on": mutate_on}
            for f in [*calls.values(), *writes.values()]:
                await latency(f, 100)  # warm up
            lat: dict[str, list[float]] = {k: [] for k in calls}
            tps: dict[str, list[float]] = {k: [] for k in calls}
            wlat: dict[str, list[float]] = {k: [] for k in writes}
            for _ in range(ROUNDS):
                for k, f in calls.items():
                    lat[k] += await latency(f, 400)
                    tps[k].append(await throughput(f, 16, 1.5))
                for k, f in writes.items():
                    wlat[k] += await latency(f, 100)
    finally:
        secured.stop()
    tp = {k: statistics.median(v) for k, v in tps.items()}
    line("unary p50, auth on vs off (cost)", pct(lat["on"], 0.5), pct(lat["off"], 0.5), "ms", "target <= 1.15x")
    line("unary p99, auth on vs off (cost)", pct(lat["on"], 0.99), pct(lat["off"], 0.99), "ms", "noisy")
    line("throughput 16 callers, auth on vs off (speed)", tp["on"], tp["off"], "call/s", "target >= 0.9x")
    line("unary p50, auth on vs bare echo (cost)", pct(lat["on"], 0.5), pct(lat["peer"], 0.5), "ms",
         "the whole stack with auth")
    line("create+delete alert rule (2 audit rows), on vs off", pct(wlat["on"], 0.5), pct(wlat["off"], 0.5), "ms",
         "p50; audit is on in both")
