"""The pytest plugin's own tests: ``pytester`` runs pytest in a subprocess on test files
written here, so the inner run loads the plugin through its pytest11 entry point like a
user's run. (pytester is registered from this folder's conftest: a ``pytest_plugins``
list is only honoured in the root conftest.)"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("pytester"):
        config.pluginmanager.import_plugin("pytester")
