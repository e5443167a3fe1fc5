"""gdb-multiarch driven through its machine interface with pygdbmi (blocking: call it from
a thread, never on the event loop that runs the server)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pygdbmi.gdbcontroller import GdbController

from tests.helpers.firmware import FIRMWARE
from tests.helpers.gdb import gdb_multiarch


class MiGdb:
    def __init__(self, elf: Path, port: int) -> None:
        self.gdb = GdbController(
            command=[str(gdb_multiarch()), "--nx", "--quiet", "--interpreter=mi3", f"--cd={FIRMWARE}", str(elf)],
            time_to_check_for_additional_output_sec=1e-4,  # >0, or each read waits its full timeout
        )
        self.cmd("-gdb-set pagination off")
        self.cmd("-gdb-set confirm off")
        self.cmd("-gdb-set mi-async on")  # so -exec-interrupt is read while the target runs
        self.cmd(f"-target-select remote 127.0.0.1:{port}", until="^connected", timeout=20)

    def cmd(self, command: str, *, until: str = "^", timeout: float = 10) -> list[dict[str, Any]]:
        """Send one MI command; read until a record whose '^class'/'*class' starts with
        ``until`` ('^' = the result record; '*stopped' = the next stop)."""
        self.gdb.write(command, read_response=False)
        return self.read_until(until, timeout)

    def read_until(self, until: str, timeout: float = 10) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.gdb.get_gdb_response(timeout_sec=0.05, raise_error_on_timeout=False):
                out.append(rec)
                tag = {"result": "^", "notify": "*"}.get(rec.get("type", ""), "?") + str(rec.get("message"))
                if rec.get("type") == "result" and rec.get("message") == "error":
                    raise AssertionError(f"gdb error: {rec.get('payload')}")
                if tag.startswith(until):
                    return out
        raise AssertionError(f"no {until!r} from gdb in {timeout} s: {out}")

    @staticmethod
    def stopped(records: list[dict[str, Any]]) -> dict[str, Any]:
        for rec in records:
            if rec.get("type") == "notify" and rec.get("message") == "stopped":
                return rec["payload"]  # type: ignore[no-any-return]
        raise AssertionError(f"no *stopped in {records}")

    def exit(self) -> None:
        self.gdb.exit()
