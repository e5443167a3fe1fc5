"""Helpers shared by the test modules, in one place (test modules import from here, never
from one another or from a conftest; a driver's own test helper module, e.g.
tests/drivers/qemu_helpers.py, holds only what is that driver's):

- ``tools``: the external tools the suite uses; ``require_tool`` skips a test for a
  missing tool, or fails it when ``scripts/test`` asked for every tool
  (``MS_REQUIRE_TEST_TOOLS=1``);
- ``backends``: whether a backend can run a board here (``require_backend``,
  ``require_qemu_plugin``, both through ``tools``), and the QEMU children a test leaves
  behind (``qemu_children``, ``reaped``, ``no_qemu_left_behind``);
- ``firmware``: the test firmware images (built on demand), their symbols, functions,
  entry and code addresses;
- ``api``: the common path through the SDK (upload, console, waiting on session states
  and on the first message of the event and alert streams, durations);
- ``conformance``: the conformance suite's boards, registers and ``Conf``;
- ``gdb``: gdb-multiarch against a session's GDB bridge;
- ``machines``: for tests below the API: board specs, images and analyses through the
  server's loader, a machine's parts by short names (``Parts``), cancelling a call;
- ``events``: a recorder of a driver's MachineEvents, for tests below the API;
- ``server``: MachineServer in-process on a test's own configuration (``serving``), or
  as a child process (``ServerProcess``).
"""
