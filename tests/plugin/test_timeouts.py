"""Timeouts in machine time, through the plugin's own fixtures in this process (the plugin
is loaded in this suite by its entry point)."""

from __future__ import annotations

import pytest

from machineserver.testing import ExpectTimeout, Host, Instructions, Machine, Virtual
from machineserver.v1 import common_pb2
from tests.helpers.firmware import firmware

BOARD = "mps2-an385"
pytestmark = [pytest.mark.board(BOARD), pytest.mark.backend("unicorn", "qemu")]


@pytest.mark.parametrize("budget", [Virtual(ms=20), Instructions(500_000), Host(s=0.3)], ids=str)
def test_expect_of_text_that_never_comes_ends_on_its_budget(machine: Machine, budget: object) -> None:
    machine.load(firmware(BOARD, "echo"))
    machine.console.expect("echo ready", timeout=Virtual(ms=50))
    with pytest.raises(ExpectTimeout) as err:
        machine.console.expect(r"bye", timeout=budget)  # type: ignore[arg-type]
    r = err.value.response
    assert r.outcome == common_pb2.WAIT_OUTCOME_BUDGET_EXHAUSTED
    assert r.state == common_pb2.SESSION_STATE_RUNNING  # an expect leaves the machine running
    # honoured: the machine ran its whole budget, and was not left waiting far past it (the
    # upper bounds are loose: QEMU without icount keeps virtual time by the host's clock)
    if isinstance(budget, Virtual):
        assert budget.total_ns <= r.virtual_time_ns < budget.total_ns + 200_000_000
    elif isinstance(budget, Instructions):
        assert budget.n <= r.instructions < 2 * budget.n + 10_000_000
    else:
        assert r.host_time.ToTimedelta().total_seconds() >= 0.3
    assert f"console never matched 'bye' within {budget}: the timeout ran out" in str(err.value)
    assert "echo ready" in str(err.value)  # the console tail
