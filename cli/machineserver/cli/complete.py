"""Shell completion (argcomplete): what the server knows, for the arguments that name it.

Turned on with ``eval "$(register-python-argcomplete msctl)"``; msctl's main() hands its
parser to ``argcomplete.autocomplete`` before parsing. Completers run inside a completion
request, where a traceback or a hang would land in the user's shell: every error gives no
completions, and every call has a short deadline."""

from __future__ import annotations

import argparse
import copy

# seconds one completion may wait for the server
COMPLETION_DEADLINE = 2.0


def session_names(prefix: str, parsed_args: argparse.Namespace, **_: object) -> list[str]:
    """Sessions on the server: their IDs, and their names ``sessions/ID`` too once the
    prefix starts that way, through the global --target and credentials; [] on any error."""
    from machineserver.cli.main import connect  # main imports this module: not at import time

    args = copy.copy(parsed_args)
    args.timeout = COMPLETION_DEADLINE
    try:
        with connect(args) as client:
            names: list[str] = []
            token = ""
            while True:
                page = client.sessions.list_sessions(page_size=1000, page_token=token)
                names += [s.name for s in page.sessions]
                token = page.next_page_token
                if not token or len(names) >= 10_000:
                    break
    except Exception:  # a completion never fails: whatever went wrong, no candidates
        return []
    ids = [n.removeprefix("sessions/") for n in names]
    if prefix and (prefix.startswith("sessions/") or "sessions/".startswith(prefix)):
        return names + ids
    return ids  # what people type: msctl takes a bare session ID wherever it takes sessions/ID


def complete_sessions(parser: argparse.ArgumentParser, dest: str) -> None:
    """Complete ``parser``'s argument ``dest`` (a session) from the server's sessions."""
    for action in parser._actions:
        if action.dest == dest:
            action.completer = session_names  # type: ignore[attr-defined]  # argcomplete reads it


def complete_commands_and_sessions(group: argparse.ArgumentParser) -> None:
    """After ``msctl debug``: its commands (argcomplete adds them) and the server's
    sessions, for the interactive form ``msctl debug SESSION``."""
    for action in group._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.completer = session_names  # type: ignore[attr-defined]
