"""How msctl shows an answer: ``table`` (for people; the default), ``json`` (one line per
message, for scripts) or ``yaml``.

The format is a global choice that may be given anywhere on the command line:
``--json`` or ``-o json|yaml|table`` (also ``--output FORMAT``, ``-oFORMAT``,
``--output=FORMAT``), before or after the subcommand. :func:`split_output_flags` takes those
words out of argv before argparse sees them; ``-o``/``--output`` with any other value (a file
name) is left to the subcommand that owns it.

Human output: :data:`HUMAN` maps a response message's full name to a renderer
(registered with :func:`human`); a message without one is shown by :func:`generic`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from machineserver.cli import render
from machineserver.sdk import errors

FORMATS = ("table", "json", "yaml")
DEFAULT_FORMAT = "table"
Renderer = render.Renderer
HUMAN: dict[str, Renderer] = {}


def human(*full_names: str) -> Callable[[Renderer], Renderer]:
    """Register a renderer for the messages with these full names."""
    def register(fn: Renderer) -> Renderer:
        for name in full_names:
            HUMAN[name] = fn
        return fn
    return register


def split_output_flags(argv: list[str]) -> tuple[list[str], str | None]:
    """argv without its output-format words, and the format they chose (the last one
    wins; None when none was given). Words after ``--`` are left alone."""
    rest: list[str] = []
    chosen: str | None = None
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            rest.extend(argv[i:])
            break
        if word == "--json":
            chosen = "json"
        elif word in ("-o", "--output") and i + 1 < len(argv) and argv[i + 1] in FORMATS:
            chosen = argv[i + 1]
            i += 1
        elif word.startswith("--output=") and word.removeprefix("--output=") in FORMATS:
            chosen = word.removeprefix("--output=")
        elif word.startswith("-o") and not word.startswith("--") and word[2:].lstrip("=") in FORMATS:
            chosen = word[2:].lstrip("=")
        else:
            rest.append(word)
        i += 1
    return rest, chosen


def output_format(args: argparse.Namespace) -> str:
    return str(getattr(args, "output_format", None) or DEFAULT_FORMAT)


def as_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def emit(msg: Message, args: argparse.Namespace) -> None:
    """Print one response in the chosen format."""
    fmt = output_format(args)
    if fmt == "json":
        print(json.dumps(as_dict(msg)), flush=True)
    elif fmt == "yaml":
        if getattr(args, "streaming", False):
            print("---")  # one YAML document per message
        print(yaml.safe_dump(as_dict(msg), sort_keys=False).rstrip(), flush=True)
    else:
        HUMAN.get(msg.DESCRIPTOR.full_name, generic)(msg, args)


def generic(msg: Message, args: argparse.Namespace) -> None:
    """A message without a renderer of its own: a list as a table, an empty answer as one
    line saying what happened, anything else as indented ``key: value`` lines."""
    render.generic(msg, args)


def machine_readable(args: argparse.Namespace) -> bool:
    """Whether the chosen format is for programs (json, yaml) rather than people."""
    return output_format(args) != "table"


def emit_stream(stream: Iterator[Message], args: argparse.Namespace) -> None:
    """Print a server stream's messages until it ends, ``--count`` messages came, or
    ``--timeout`` seconds passed (the call's deadline: both end it normally)."""
    count: int | None = getattr(args, "stream_count", None)
    args.streaming = True
    if count == 0:
        return
    seen = 0
    try:
        for msg in stream:
            emit(msg, args)
            seen += 1
            if count is not None and seen >= count:
                break
    except errors.DeadlineExceeded:
        if getattr(args, "stream_timeout", None) is None:
            raise  # not the deadline --timeout gave the call
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


render.register(human)
