"""MachineServer's pytest plugin (a ``pytest11`` entry point: installing machineserver is
enough). Firmware tests get a simulated board as the ``machine`` fixture:

    @pytest.mark.board("mps2-an385")
    def test_boot(machine):
        machine.load("build/fw.elf")
        machine.console.expect(r"ready", timeout=Virtual(ms=50))

Server: started in this process on a free port on first need (under pytest-xdist the
controller starts one for all workers); ``--ms-target HOST:PORT`` (with ``--ms-tls-ca``,
``--ms-tls-cert``/``--ms-tls-key``, ``--ms-api-key`` or env MS_API_KEY, ``--ms-token``) uses a
remote one. The plugin costs nothing in a run that uses none of its fixtures: no server, no
server imports.

Markers: ``board(NAME)``, ``backend(NAME, ...)`` (the backends a test runs on),
``program(PATH)`` (relative to the test's folder, then the rootdir), ``machine_options(icount=,
on_fault=, assert_symbols=[...])``. ``--ms-backends unicorn,qemu`` runs every machine test
once per backend (ids ``[unicorn]``, ``[qemu]``). ``--ms-board`` is the default board.

Fixtures: ``machine`` (callable for more machines; indirect parametrisation with a dict of
the same keys), ``machine_factory``, ``ms_client`` (a sync :class:`machineserver.sdk.Client`),
``ms_target``.

On a failed test each of its machines leaves a failure capsule in ``--ms-capsules DIR``
(default ``.ms-capsules/``; ``--ms-no-capsules`` turns it off), as do the capsules the server
captured itself (fault, assert). ``--ms-coverage FORMAT:PATH`` (lcov, cobertura, html, json;
repeatable) collects coverage on every machine and writes one merged report at the end.
JUnit XML gets properties ms_session, ms_backend, ms_board, ms_instructions, ms_capsule.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from machineserver.pytest_plugin.runtime import Run, Settings

if TYPE_CHECKING:
    from machineserver.pytest_plugin.fixtures import MachineFactory
    from machineserver.sdk import Client
    from machineserver.testing import Machine

RUN = pytest.StashKey[Run]()

MARKERS = (
    "board(name): the board template a `machine` runs on (e.g. \"mps2-an385\")",
    "backend(*names): the backends a `machine` test runs on (each one; with --ms-backends, those of them)",
    "program(path, run=True): the program a `machine` loads (and runs) on first use (relative to the test's folder)",
    "machine_options(icount=False, on_fault=False, assert_symbols=()): session options of a `machine`",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("machineserver", "MachineServer firmware tests")
    group.addoption("--ms-target", dest="ms_target", metavar="HOST:PORT",
                    help="a MachineServer to use (default: one started in this process)")
    group.addoption("--ms-tls-ca", dest="ms_tls_ca", metavar="FILE", help="TLS: the server's CA certificate (PEM)")
    group.addoption("--ms-tls-cert", dest="ms_tls_cert", metavar="FILE", help="mTLS: the client certificate (PEM)")
    group.addoption("--ms-tls-key", dest="ms_tls_key", metavar="FILE", help="mTLS: the client key (PEM)")
    group.addoption("--ms-api-key", dest="ms_api_key", metavar="KEY", help="an API key (default: env MS_API_KEY)")
    group.addoption("--ms-token", dest="ms_token", metavar="JWT", help="a bearer token (JWT)")
    group.addoption("--ms-backends", dest="ms_backends", metavar="LIST",
                    help="run every machine test on each of these backends, e.g. unicorn,qemu")
    group.addoption("--ms-board", dest="ms_board", metavar="NAME", help="the board of tests without a board marker")
    group.addoption("--ms-coverage", dest="ms_coverage", action="append", default=[], metavar="FORMAT:PATH",
                    help="collect coverage and write the merged report: lcov:cov.info, cobertura:cov.xml, "
                         "html:DIR, json:cov.json (repeatable)")
    group.addoption("--ms-capsules", dest="ms_capsules", metavar="DIR",
                    help="where failure capsules are written (default: .ms-capsules/ in the rootdir)")
    group.addoption("--ms-no-capsules", dest="ms_no_capsules", action="store_true",
                    help="take no failure capsules")
    for name, help_text in (("ms_target", "default --ms-target"), ("ms_backends", "default --ms-backends"),
                            ("ms_board", "default --ms-board"), ("ms_capsules", "default --ms-capsules")):
        parser.addini(name, help_text, default="")
    parser.addini("ms_coverage", "default --ms-coverage (FORMAT:PATH, space separated)", type="args", default=[])


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    settings = Settings.from_config(config)
    worker_input: dict[str, Any] | None = getattr(config, "workerinput", None)
    worker_output: dict[str, Any] | None = getattr(config, "workeroutput", None)
    if worker_input is not None and worker_input.get("ms_target"):
        settings.target = worker_input["ms_target"]  # the controller's server, shared by all workers
    config.stash[RUN] = Run(settings, worker_output=worker_output)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, in the controller: one server for every worker."""
    node.workerinput["ms_target"] = node.config.stash[RUN].target()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist, in the controller: what a worker recorded, for the merge and summary."""
    output = getattr(node, "workeroutput", None)
    if output:
        node.config.stash[RUN].absorb(output)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test using a machine runs once per backend: --ms-backends, limited by its backend
    marker; without the option, the marker's backends."""
    if "ms_backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backend")
    allowed = [str(b) for b in marker.args] if marker else None
    chosen = metafunc.config.stash[RUN].settings.backends
    if chosen:
        backends = [b for b in chosen if allowed is None or b in allowed]
    elif allowed:
        backends = allowed
    else:
        return
    metafunc.parametrize("ms_backend", backends, indirect=True, ids=backends)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                               ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed and not hasattr(report, "wasxfail"):
        factory: MachineFactory | None = item.stash.get(FACTORY, None)
        if factory is not None:
            from machineserver.pytest_plugin.fixtures import failure_reason

            factory.capture_failure(report, failure_reason(call))
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    run = session.config.stash.get(RUN, None)
    if run is None:
        return
    try:
        if run.worker_output is None:  # a plain run or the xdist controller: the one merge
            try:
                run.finish_coverage()
            except Exception as exc:  # a report the run cannot write is said, not a traceback
                run.note(f"coverage: the merged report could not be written: {exc}")
    finally:
        run.close()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    run = config.stash.get(RUN, None)
    if run is None or not (run.capsules or run.coverage_files or run.notes):
        return
    terminalreporter.section("machineserver")
    if run.capsules:
        terminalreporter.write_line(f"{len(run.capsules)} capsule(s) written (open one: msctl capsule open FILE):")
        for path in run.capsules:
            terminalreporter.write_line(f"  {path}")
    for line in run.coverage_files:
        terminalreporter.write_line(f"coverage written, {line}")
    for note in run.notes:
        terminalreporter.write_line(note)


# -------------------------------------------------------------------------- fixtures

if TYPE_CHECKING:
    FACTORY: pytest.StashKey[MachineFactory]
else:
    FACTORY = pytest.StashKey()


@pytest.fixture(scope="session")
def ms_target(pytestconfig: pytest.Config) -> str:
    """The server's "host:port" (the embedded one is started here on first need)."""
    return pytestconfig.stash[RUN].target()


@pytest.fixture(scope="session")
def ms_client(pytestconfig: pytest.Config, ms_target: str) -> Client:
    """A synchronous SDK client to the server (closed at the end of the run)."""
    return pytestconfig.stash[RUN].client()


@pytest.fixture
def ms_backend(request: pytest.FixtureRequest) -> str:
    """The backend this test instance runs on ("" for the server's default)."""
    return str(getattr(request, "param", "") or "")


@pytest.fixture
def machine_factory(request: pytest.FixtureRequest, ms_client: Client, ms_backend: str) -> Iterator[MachineFactory]:
    """Makes machines: ``machine_factory(board=..., backend=..., program=...)``. Each one's
    session is deleted after the test (capsules and coverage taken first)."""
    from machineserver.pytest_plugin.fixtures import MachineFactory

    factory = MachineFactory(request, request.config.stash[RUN], ms_backend)
    request.node.stash[FACTORY] = factory
    try:
        yield factory
    finally:
        factory.finish()


@pytest.fixture
def machine(request: pytest.FixtureRequest, machine_factory: MachineFactory) -> Machine:
    """A machine from the test's markers (board, backend, program, machine_options) or an
    indirect parameter's dict; created on first use. Call it for more machines."""
    params = getattr(request, "param", None) or {}
    if not isinstance(params, dict):
        raise pytest.UsageError(f"{request.node.nodeid}: an indirect `machine` parameter is a dict "
                                f"(board=, backend=, program=, ...), not {params!r}")
    return machine_factory(**params)
