"""A long step cancelled just as it reaches a breakpoint still reports the breakpoint.

ExpectConsole with a counted budget drives the machine in steps and cancels the step in
flight when the console matches; the assert firmware prints "checking" and reaches
__assert_func (an assert symbol: a breakpoint of the server's) a few hundred instructions
later, so the match and the breakpoint race. Whichever wins, the machine must end halted at
__assert_func with the ASSERT capsule taken, never run on past it to the firmware's exit
(QEMU reported the cancellation's halt and the wait resumed the machine). The race is a
matter of timing: seen under load by the plugin's tests, not forced here; this checks the
outcome every time."""

from __future__ import annotations

import pytest

from machineserver.sdk import AsyncClient
from machineserver.v1 import capsule_pb2 as pb
from machineserver.v1 import common_pb2 as cpb
from tests.capsules.test_capsules import capsules_of, eventually
from tests.helpers.api import upload, wait_state
from tests.helpers.backends import require_backend
from tests.helpers.firmware import elf_symbol

BOARD = "mps2-an385"


@pytest.mark.parametrize("budget", [{"instructions": 10**7}, {"virtual_time_ns": 50_000_000}],
                         ids=["instructions", "virtual"])
@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_an_assert_reached_while_an_expect_drives_the_machine(client: AsyncClient, backend: str,
                                                                    budget: dict[str, int]) -> None:
    require_backend(backend, BOARD)
    prog = await upload(client, BOARD, "assert")
    assert_func = elf_symbol(BOARD, "assert", "__assert_func") & ~1
    for _ in range(6):
        name = (await client.sessions.create_session(
            board_template=BOARD, backend=backend, program=prog, run=True,
            options={"capsules": {"assert_symbols": ["__assert_func"]}})).session.name
        r = await client.sessions.expect_console(name=name, pattern="checking", budget=cpb.Budget(**budget))  # type: ignore[arg-type]
        assert r.outcome in (cpb.WAIT_OUTCOME_MATCHED, cpb.WAIT_OUTCOME_STOPPED), r
        # the console may match before the step that reaches the assert (it then runs on
        # to it): either way it must come to rest there, never run past it to the exit
        s = await wait_state(client, name, cpb.SESSION_STATE_HALTED)
        assert s.last_stop.reason == cpb.STOP_REASON_BREAKPOINT and s.last_stop.pc == assert_func
        caps = await eventually(lambda session=name: capsules_of(client, session))
        assert [c.trigger for c in caps] == [pb.CAPSULE_TRIGGER_ASSERT] and caps[0].pc == assert_func
        await client.sessions.delete_session(name=name)
