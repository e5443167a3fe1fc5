"""The gdbremote end-to-end tests: a real server in this process (tests/conftest.py's
``server`` and ``client``) whose gdbremote_allow admits the sockets of the QEMUs the test
starts behind ``-gdb`` (tests/helpers/remote_targets.py). Every QEMU is stopped and
reaped at the end, and no QEMU child may outlive a test."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.config import ServerConfig
from tests.helpers.backends import no_qemu_left_behind, require_backend
from tests.helpers.conformance import Conf
from tests.helpers.remote_targets import RemoteTargets, remote_targets


@pytest.fixture(autouse=True)
def no_qemu_left() -> Iterator[None]:
    with no_qemu_left_behind():
        yield


@pytest.fixture
def targets() -> Iterator[RemoteTargets]:
    require_backend("qemu")  # the targets are QEMUs
    with remote_targets() as found:
        yield found


@pytest.fixture
def server_config(server_config: ServerConfig, targets: RemoteTargets) -> ServerConfig:
    return dataclasses.replace(server_config, gdbremote_allow=targets.allow_patterns)


@pytest.fixture
def remote(client: AsyncClient, targets: RemoteTargets) -> Conf:
    """gdbremote seen through the SDK: Conf.session starts a QEMU per session."""
    return Conf(client, "gdbremote", targets)
