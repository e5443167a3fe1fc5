"""How big each reliability check runs, and where its figures go.

The fast form (scripts/test) uses the defaults; the long form (``scripts/bench
reliability``) sets the ``MS_RELIABILITY_*`` variables below and reads the figures every
check appends, one JSON object a line, to the file named by ``MS_RELIABILITY_FIGURES``.
(Not ``MACHINESERVER_*`` names: the servers the tests start inherit the environment and
refuse settings they do not know.)
"""

from __future__ import annotations

import json
import os
from typing import Any

FIGURES_ENV = "MS_RELIABILITY_FIGURES"


def size(name: str, fast: int) -> int:
    """``MS_RELIABILITY_<NAME>`` as an int, else the fast form's ``fast``."""
    value = os.environ.get(f"MS_RELIABILITY_{name.upper()}", "")
    return int(value) if value else fast


def report(check: str, **figures: Any) -> None:
    """Append one check's figures to the figures file (when the bench asked for one) and
    print them (seen with ``pytest -s``)."""
    line = json.dumps({"check": check, **figures}, sort_keys=True)
    print(f"reliability figures: {line}")
    path = os.environ.get(FIGURES_ENV, "")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")
