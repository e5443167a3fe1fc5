"""Developer sessions. Run with the project's venv: .venv/bin/nox -s NAME"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "none"  # use the current environment (scripts/bootstrap made it)
nox.options.sessions = ["lint", "typecheck", "gen", "buf", "tests"]

PY = ".venv/bin/python"


@nox.session
def lint(session: nox.Session) -> None:
    session.run(".venv/bin/ruff", "check", "server", "sdk", "cli", "tests", "scripts", external=True)


@nox.session
def typecheck(session: nox.Session) -> None:
    session.run(".venv/bin/mypy", "server/machineserver/server", "sdk/machineserver/sdk", "cli/machineserver/cli",
                external=True)


@nox.session
def gen(session: nox.Session) -> None:
    """Regenerate the stubs and fail if they differ from what is committed."""
    session.run("scripts/check-gen", external=True)


@nox.session
def buf(session: nox.Session) -> None:
    session.run(".venv/bin/buf", "lint", external=True)
    # report-only until v1 is declared stable
    session.run(".venv/bin/buf", "breaking", "--against", ".git#branch=main", external=True, success_codes=[0, 100])


@nox.session
def tests(session: nox.Session) -> None:
    session.run(PY, "-m", "pytest", "-q", *session.posargs, external=True)


@nox.session
def bench(session: nox.Session) -> None:
    session.run("scripts/bench", *session.posargs, external=True)
