"""The backend conformance suite: the same end-to-end tests, through the SDK against a
real in-process server (port 0, a temporary data dir), run once per backend.

`backend` is parametrized over every backend; `qemu` is skipped (with the reason) when
its binaries are missing, and fails instead under scripts/test (tests/helpers/tools.py).
Where a backend cannot do something, the test checks that the server says so
(UNIMPLEMENTED with the reason, and the matching capability flag or board limit), never
that it silently differs.

``gdbremote`` drives a QEMU that the test starts with ``-gdb`` (one per session, from
Conf.session; the server's gdbremote_allow admits their sockets). What that backend
cannot have is not run here: GDBREMOTE_CANNOT skips those tests with the reason and
names the test in tests/gdbremote/ that checks the server saying so.

Every test also checks that no QEMU child process outlives it. The helpers (Conf, the
boards) live in tests/helpers/conformance.py; require_backend and the QEMU check in
tests/helpers/backends.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.config import ServerConfig
from tests.helpers.backends import no_qemu_left_behind, require_backend
from tests.helpers.conformance import BACKENDS, Conf
from tests.helpers.remote_targets import RemoteTargets, remote_targets

# a QEMU behind -gdb exits with the firmware (semihosting), so what needs the machine after
# the exit cannot apply; nor can what needs an emulator's own clock or counter
_AFTER_EXIT = ("needs the target after the firmware exited, but the QEMU behind -gdb ends with it "
               "(reset/load/restore then answer FAILED_PRECONDITION: "
               "tests/gdbremote/test_remote_qemu.py::test_after_the_target_exited_the_server_says_so)")
GDBREMOTE_CANNOT = {
    "test_hello_then_crc32_console_and_exit_code": _AFTER_EXIT,
    "test_session_state_machine": _AFTER_EXIT,
    "test_breakpoint_at_main_by_symbol": _AFTER_EXIT,
    "test_snapshot_restore_replays_on_mps2": _AFTER_EXIT + "; soft snapshots: "
                                             "tests/gdbremote/test_remote_qemu.py::test_soft_snapshot_replays",
    "test_snapshots_on_lm3s_work_or_say_why": _AFTER_EXIT + "; soft snapshots: "
                                              "tests/gdbremote/test_remote_qemu.py::test_soft_snapshot_replays",
    "test_instruction_counter_with_icount": "a remote target counts no instructions (icount is refused: "
                                            "tests/gdbremote/test_remote_qemu.py::test_what_a_remote_cannot_do)",
    "test_wrong_arch_program_is_invalid_argument": "creates its session without options.remote, which a gdbremote "
                                                   "session needs first (the wrong-arch program: tests/gdbremote/"
                                                   "test_remote_qemu.py::test_bad_inputs_name_what_is_wrong)",
    "test_pause_while_running": "a remote target has no virtual clock to see it run on "
                                "(pause/run: tests/gdbremote/test_remote_qemu.py::test_pause_and_run)",
}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    require_backend("qemu" if name == "gdbremote" else name)
    if name == "gdbremote" and request.node.originalname in GDBREMOTE_CANNOT:
        pytest.skip(f"gdbremote: {GDBREMOTE_CANNOT[request.node.originalname]}")
    return name


@pytest.fixture(autouse=True)
def no_qemu_left() -> Iterator[None]:
    """Set up before (so torn down after) the server: every QEMU must be gone by then."""
    with no_qemu_left_behind():
        yield


@pytest.fixture
def targets() -> Iterator[RemoteTargets]:
    """gdbremote's QEMUs (none start unless a gdbremote session asks): all stopped at the
    end, after the server (set up before it)."""
    with remote_targets() as found:
        yield found


@pytest.fixture
def server_config(server_config: ServerConfig, targets: RemoteTargets) -> ServerConfig:
    return dataclasses.replace(server_config, gdbremote_allow=targets.allow_patterns)


# server and client: the fixtures of tests/conftest.py


@pytest.fixture
def conf(client: AsyncClient, backend: str, targets: RemoteTargets) -> Conf:
    return Conf(client, backend, targets)
