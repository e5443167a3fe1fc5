"""QEMU's gdbstub as the driver uses it: one :class:`~machineserver.server.rsp.RspClient`
per QEMU (the server's one RSP library, :mod:`machineserver.server.rsp`), and what the
library's errors mean here.

The library raises four kinds of :class:`RspError` besides a plain one; only the plain
one is the gdbstub *refusing* a request (``Exx``, or an empty "unsupported" reply), which
a part may turn into BadRequest or ignore. The others say the gdbstub cannot be used any
more, and go to the error boundary (:func:`.target.guarded`):

===================  ==================================================================
RspTimeout           no answer in time: QEMU is stuck (e.g. SIGSTOPped): FAILED
RspClosed            the connection is gone: QEMU died; its death is classified (an
                     exit, a guest fault, or FAILED)
RspProtocolError     an answer that breaks the protocol (garbage, a reply nobody asked
                     for), or the reply owed to an abandoned request never came: the
                     client is BROKEN (or, for an answer it merely cannot decode, should
                     be): FAILED
RspStateError        the client went BROKEN earlier: FAILED; or (a driver bug) a request
                     while a stop reply is owed (RUNNING): FAILED too, saying so
===================  ==================================================================

A BROKEN client is not reconnected: QEMU accepts a new connection, but what it did with
the request whose reply went astray (a step? a write?) is unknown, so the machine's state
is too. The machine goes FAILED and a reset or power-on starts a fresh QEMU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from machineserver.server.rsp import (
    RspClosed,
    RspError,
    RspProtocolError,
    RspStateError,
    RspTimeout,
    State,
)

_UNUSABLE = (RspClosed, RspTimeout, RspProtocolError, RspStateError)


def refused(exc: RspError) -> bool:
    """Whether the gdbstub answered with a refusal (not: the connection broke, timed out,
    or cannot be trusted any more)."""
    return not isinstance(exc, _UNUSABLE)


@contextlib.contextmanager
def refusals_ignored() -> Iterator[None]:
    """Ignore the gdbstub refusing a request (an ``Exx`` reply), and only that: a lost,
    stuck or broken connection still goes to the boundary."""
    try:
        yield
    except RspError as exc:
        if not refused(exc):
            raise


def unusable_reason(exc: RspProtocolError | RspStateError) -> str:
    """The failure reason for a gdbstub connection that cannot be used any more: BROKEN
    now (a protocol error) or before (a state error), or a request made out of turn."""
    if isinstance(exc, RspProtocolError) or exc.state is State.BROKEN:
        return f"QEMU's gdbstub connection cannot be trusted any more: {exc}"
    return f"the driver used QEMU's gdbstub out of turn (a driver bug): {exc}"
