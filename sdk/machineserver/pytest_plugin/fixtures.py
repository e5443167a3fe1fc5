"""The machines of one test: made from markers and parameters, and at the end of the test
their capsules exported, coverage stored, JUnit properties recorded and sessions deleted."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from machineserver.pytest_plugin.runtime import Run
from machineserver.sdk import errors
from machineserver.testing import Machine, MachineSpec, sanitise
from machineserver.v1 import capsule_pb2

SPEC_KEYS = ("board", "backend", "program", "run", "icount", "on_fault", "assert_symbols", "display_name")


def failure_reason(call: pytest.CallInfo[None]) -> str:
    """The failure's first line ("AssertionError: console never matched ...")."""
    if call.excinfo is None:
        return "the test failed"
    lines = call.excinfo.exconly().strip().splitlines()
    return lines[0] if lines else call.excinfo.typename


class MachineFactory:
    """``factory(board=..., backend=..., program=..., icount=..., on_fault=...,
    assert_symbols=[...], display_name=...)`` -> a :class:`Machine` (created on first use);
    the test's markers give the defaults."""

    def __init__(self, request: pytest.FixtureRequest, run: Run, backend: str) -> None:
        self._node = request.node
        self._run = run
        self._backend = backend
        self._test_dir = Path(str(request.node.path)).parent
        self.machines: list[Machine] = []

    def _marker_defaults(self) -> dict[str, Any]:
        node = self._node
        got: dict[str, Any] = {}
        if (m := node.get_closest_marker("board")) is not None and m.args:
            got["board"] = str(m.args[0])
        if (m := node.get_closest_marker("backend")) is not None and m.args:
            got["backend"] = str(m.args[0])
        if (m := node.get_closest_marker("program")) is not None and m.args:
            got["program"] = m.args[0]
            if "run" in m.kwargs:
                got["run"] = bool(m.kwargs["run"])
        if (m := node.get_closest_marker("machine_options")) is not None:
            got.update(m.kwargs)
        return got

    def _program_path(self, given: str | Path) -> Path:
        path = Path(given)
        candidates = [path] if path.is_absolute() else [self._test_dir / path, self._node.config.rootpath / path]
        for candidate in candidates:
            if candidate.exists():
                return candidate.resolve()
        pytest.fail(f"{self._node.nodeid}: program {str(given)!r} not found (relative to "
                    f"{self._test_dir} or {self._node.config.rootpath})", pytrace=False)

    def __call__(self, **given: Any) -> Machine:
        unknown = set(given) - set(SPEC_KEYS)
        if unknown:
            raise TypeError(f"unknown machine option(s) {sorted(unknown)}; known: {', '.join(SPEC_KEYS)}")
        spec = self._marker_defaults() | given
        if self._backend and "backend" not in given:  # the --ms-backends / marker parameter
            spec["backend"] = self._backend
        board = spec.get("board") or self._run.settings.board
        if not board:
            pytest.fail(f"{self._node.nodeid}: no board for the machine: add @pytest.mark.board(\"NAME\"), "
                        "pass board=..., or run with --ms-board NAME", pytrace=False)
        program = spec.get("program")
        machine_spec = MachineSpec(
            board=board, backend=str(spec.get("backend") or ""),
            program=self._program_path(program) if program else None, run=bool(spec.get("run", True)),
            icount=bool(spec.get("icount", False)),
            # collected for the merged report, and for capsules: their trace tail and coverage
            # delta come from the coverage hooks
            coverage=bool(self._run.settings.coverage) or self._run.settings.capsule_dir is not None,
            on_fault=bool(spec.get("on_fault", False)),
            assert_symbols=tuple(str(s) for s in spec.get("assert_symbols", ())))
        m = Machine(self._run.client(), machine_spec, programs=self._run.programs(),
                    capsule_dir=self._run.settings.capsule_dir or Path(".ms-capsules"), spawn=self,
                    display_name=str(spec.get("display_name") or self._node.nodeid))
        self.machines.append(m)
        return m

    # ---------------------------------------------------------------- the end of a test

    def _capsule_path(self, index: int, suffix: str = "") -> Path:
        assert self._run.settings.capsule_dir is not None
        stem = sanitise(self._node.nodeid, 150) + (f"-{index + 1}" if index else "") + suffix
        return self._run.settings.capsule_dir / f"{stem}.capsule"

    def _property(self, name: str, value: object) -> None:
        self._node.user_properties.append((name, str(value)))

    def capture_failure(self, report: pytest.TestReport, reason: str) -> None:
        """The test failed: a capsule of each of its live machines."""
        if self._run.settings.capsule_dir is None:
            return
        for i, m in enumerate(self.machines):
            if not m.created:
                continue
            try:
                path = m.capsule(reason, test_id=self._node.nodeid, trigger=capsule_pb2.CAPSULE_TRIGGER_TEST_FAILURE,
                                 path=self._capsule_path(i))
            except errors.MachineServerError as exc:
                report.sections.append(("machineserver capsule", f"no capsule of {m.name}: {exc}"))
                continue
            self._run.record_capsule(path)
            self._property("ms_capsule", path)
            report.sections.append(("machineserver capsule", f"{m.name}: {path}"))

    def finish(self) -> None:
        """After the test: server-made capsules exported, coverage stored, JUnit properties,
        sessions deleted. A problem here is a warning, never a failure of a passed test."""
        for i, m in enumerate(self.machines):
            if not m.created:
                continue
            for step in (self._export_server_capsules, self._store_coverage, self._record_properties):
                try:
                    step(i, m)
                except errors.Unimplemented:
                    pass  # the server has no such service: nothing to export
                except errors.MachineServerError as exc:
                    warnings.warn(pytest.PytestWarning(f"machineserver: {step.__name__.strip('_')} of {m.name}: {exc}"),
                                  stacklevel=1)
            try:
                m.close()
            except errors.MachineServerError as exc:
                warnings.warn(pytest.PytestWarning(f"machineserver: could not delete {m.name}: {exc}"), stacklevel=1)
        self.machines.clear()

    def _export_server_capsules(self, i: int, m: Machine) -> None:
        if self._run.settings.capsule_dir is None:
            return
        for c in m.server_capsules():
            trigger = capsule_pb2.CapsuleTrigger.Name(c.trigger).removeprefix("CAPSULE_TRIGGER_").lower()
            path = m.export_capsule(c.name, self._capsule_path(i, f"-{trigger}-{sanitise(c.name.rsplit('/', 1)[-1])}"))
            self._run.record_capsule(path)
            self._property("ms_capsule", path)

    def _store_coverage(self, i: int, m: Machine) -> None:
        if not self._run.settings.coverage:
            return  # collected for capsules only: it goes with the session
        got = m.stop_coverage()
        if got is not None:
            self._run.record_coverage(*got)

    def _record_properties(self, i: int, m: Machine) -> None:
        self._property("ms_session", m.name)
        self._property("ms_backend", m.backend)
        self._property("ms_board", m.board)
        self._property("ms_instructions", m.instructions)
