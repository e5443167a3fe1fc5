"""Bounds on what a client's configs may make the server allocate: a board's memory and
interrupts, how deep and how large a board config may be, how much console a session may
keep. Each has a default here and a setting in the server config (``limits:`` in the
YAML, see :class:`machineserver.server.core.engine.Limits`); a config over one is
INVALID_ARGUMENT naming the field and the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20

MAX_BOARD_MEMORY_BYTES = 256 * MiB  # all memory regions of one board together
MAX_IRQS = 496  # external interrupts (an ARMv7-M NVIC has at most 496)
MAX_CONFIG_DEPTH = 32  # nesting of a board config's mappings and lists
MAX_CONFIG_NODES = 100_000  # values in a board config, YAML aliases expanded
MAX_CONFIG_BYTES = 256 << 10  # a board config's text
MAX_DESCRIPTION_BYTES = 16 << 10  # a board's description
MAX_CONSOLE_BYTES = 64 * MiB  # a session's limits.max_console_bytes
MAX_MEMORY_REGIONS = 64
MAX_PERIPHERALS = 256


@dataclass(frozen=True)
class BoardBounds:
    """What a board config given by a client may ask for."""

    max_board_memory_bytes: int = MAX_BOARD_MEMORY_BYTES
    max_irqs: int = MAX_IRQS
    max_config_depth: int = MAX_CONFIG_DEPTH
    max_config_nodes: int = MAX_CONFIG_NODES
    max_config_bytes: int = MAX_CONFIG_BYTES


DEFAULT_BOUNDS = BoardBounds()
