"""Many sessions at once through the API, each with its own correct console."""

from __future__ import annotations

import asyncio

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import upload, wait_state

EXPECTED = {
    "hello": "Hello from {board}!\n",
    "crc32": "crc32=0x80f45f04\n",
    "systick": "ticks=10\n",
}


async def test_fifty_sessions_at_once(client: AsyncClient) -> None:
    boards = ["lm3s6965evb", "mps2-an385", "netduinoplus2"]
    programs = {(b, p): await upload(client, b, p) for b in boards for p in EXPECTED}
    plan = [(boards[i % 3], list(EXPECTED)[i % len(EXPECTED)]) for i in range(50)]
    sessions = await asyncio.gather(*(
        client.sessions.create_session(board_template=b, program=programs[(b, p)], run=True, session_id=f"many-{i}")
        for i, (b, p) in enumerate(plan)
    ))
    assert len({s.session.name for s in sessions}) == 50
    done = await asyncio.gather(*(wait_state(client, s.session.name, cpb.SESSION_STATE_EXITED, timeout=120) for s in sessions))
    assert all(d.exit_code == 0 for d in done)  # type: ignore[attr-defined]
    for (board, prog), s in zip(plan, sessions, strict=True):
        out = b"".join([m.data async for m in client.sessions.stream_console(name=s.session.name, follow=False)])
        assert out.decode() == EXPECTED[prog].format(board=board), (s.session.name, board, prog)
