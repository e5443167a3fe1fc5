"""Helpers shared by the test modules, in one place (test modules import from here, never
from one another or from a conftest):

- ``tools``: the external tools the suite uses; ``require_tool`` skips a test for a
  missing tool, or fails it when ``scripts/test`` asked for every tool
  (``MS_REQUIRE_TEST_TOOLS=1``);
- ``firmware``: the test firmware images (built on demand) and their ELF symbols;
- ``api``: the common path through the SDK (upload, console, waiting on session states
  and on the first message of the event and alert streams);
- ``events``: a recorder of a driver's MachineEvents, for tests below the API;
- ``server``: MachineServer as a child process.
"""
