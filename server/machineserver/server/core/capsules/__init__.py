"""Failure capsules (CapsuleService's core): :mod:`.manager` captures, keeps, imports and
opens them; :mod:`.archive` is the archive's layout; :mod:`.formats` says which snapshot
formats this server restores."""

from machineserver.server.core.capsules.manager import (
    CapsuleManager,
    CapsuleRecord,
    CapsuleSettings,
    Trigger,
)

__all__ = ["CapsuleManager", "CapsuleRecord", "CapsuleSettings", "Trigger"]
