"""Which endpoints a gdbremote session may name (core/remote_targets.py): the normal forms,
the server's allow-list (by default TCP to this host only), and the refusals through the
API, each naming the field."""

from __future__ import annotations

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.core.errors import InvalidArgument
from machineserver.server.core.remote_targets import DEFAULT_REMOTE_ALLOW, check_allowed, normal_form


@pytest.mark.parametrize(("text", "form"), [
    ("127.0.0.1:3333", "tcp:127.0.0.1:3333"),
    ("tcp:localhost:1234", "tcp:localhost:1234"),
    ("[::1]:2331", "tcp:[::1]:2331"),
    ("unix:/tmp/qemu.gdb", "unix:/tmp/qemu.gdb"),
])
def test_targets_have_one_normal_form(text: str, form: str) -> None:
    assert normal_form(text, "options.remote.address") == form


@pytest.mark.parametrize("text", ["", "nohost", "host:", "host:0", "host:99999", "unix:relative",
                                  "serial:/dev/ttyUSB0", "a\nb:1", "x" * 600 + ":1"])
def test_bad_targets_name_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        normal_form(text, "options.remote.address")
    assert exc.value.field == "options.remote.address"


def test_a_serial_device_is_a_console_only() -> None:
    assert normal_form("serial:/dev/ttyACM0", "options.remote.console", console=True) == "serial:/dev/ttyACM0"


def test_the_default_allows_this_host_over_tcp_only() -> None:
    check_allowed("tcp:127.0.0.1:3333", DEFAULT_REMOTE_ALLOW, "f")
    check_allowed("tcp:localhost:1", DEFAULT_REMOTE_ALLOW, "f")
    for endpoint in ("tcp:10.0.0.5:3333", "tcp:board-farm:2331", "unix:/run/openocd.sock", "serial:/dev/ttyUSB0",
                     "tcp:127.0.0.1.evil.example:80"):
        with pytest.raises(InvalidArgument, match="gdbremote_allow"):
            check_allowed(endpoint, DEFAULT_REMOTE_ALLOW, "f")
    check_allowed("unix:/run/lab/q.sock", ["unix:/run/lab/*"], "f")


async def test_a_remote_target_is_refused_for_a_backend_that_runs_its_own_machines(client: AsyncClient) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.create_session(board_template="mps2-an385", backend="unicorn",
                                             options={"remote": {"address": "127.0.0.1:3333"}})
    assert "options.remote.address" in str(exc.value)
