"""``msctl audit list|watch``: the audit log as a table (admin role).

``list`` prints the entries (oldest first) that match ``--filter`` (the AuditService
filter, e.g. ``"method=WriteMemory AND transport=gdb"``; keys principal, tenant, method,
resource, code, transport) since ``--since`` (``30m``, ``2h``, ``7d``, or an ISO time) until
``--until``; ``watch`` prints new entries as they are written (after ``--after SEQ`` or
``--since`` first, when given) until interrupted or ``--count`` entries. ``--json``: one
JSON object a line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import re
from collections.abc import Iterable, Iterator

from google.protobuf import timestamp_pb2

from machineserver.cli import output
from machineserver.sdk import Client
from machineserver.v1 import audit_pb2 as pb

HEADERS = ["SEQ", "TIME", "PRINCIPAL", "TENANT", "METHOD", "RESOURCE", "CODE", "VIA", "ADDRESS", "LENGTH",
           "REQUEST-ID"]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TRANSPORTS = {pb.AUDIT_TRANSPORT_RPC: "rpc", pb.AUDIT_TRANSPORT_ATTACH: "attach", pb.AUDIT_TRANSPORT_GDB: "gdb"}


def parse_when(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``90s``, ``30m``, ``2h``, ``7d``, ``1w`` ago, or an ISO 8601 time (UTC if it names
    no zone)."""
    now = now or dt.datetime.now(dt.UTC)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        return now - dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a duration ago (30m, 2h, 7d) or an ISO time") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when.astimezone(dt.UTC).replace(tzinfo=None))
    return ts


def _address(e: pb.AuditEvent) -> str:
    if not e.HasField("address"):
        return "-"
    if e.method.endswith("Register"):
        return f"#{e.address}"  # a register's number
    return f"0x{e.address:08x}"


def row(e: pb.AuditEvent) -> list[str]:
    when = e.time.ToDatetime(dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    method = e.method.removeprefix("/machineserver.v1.")
    return [str(e.sequence), when, e.principal, e.tenant, method, e.resource or "-", e.code,
            _TRANSPORTS.get(e.transport, "?"), _address(e),
            str(e.length) if e.HasField("length") else "-", e.request_id]


def format_table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(x) for x in col) for col in zip(headers, *rows, strict=True)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [headers, *rows])


def _pages(client: Client, request: pb.ListAuditEventsRequest, limit: int) -> Iterator[pb.AuditEvent]:
    count = 0
    while True:
        page = client.audit.list_audit_events(request)
        for e in page.events:
            yield e
            count += 1
            if limit and count >= limit:
                return
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    request = pb.ListAuditEventsRequest(filter=args.filter or "", page_size=min(args.limit or 1000, 1000))
    if args.since:
        request.start_time.CopyFrom(_timestamp(args.since))
    if args.until:
        request.end_time.CopyFrom(_timestamp(args.until))
    events = _pages(client, request, args.limit)
    if output.machine_readable(args):
        args.streaming = True  # yaml: one document per entry
        for e in events:
            output.emit(e, args)
        return 0
    rows = [row(e) for e in events]
    print(format_table(rows, HEADERS) if rows else "no audit entries match")
    return 0


def _print_live(events: Iterable[pb.AuditEvent], args: argparse.Namespace, count: int) -> int:
    """Rows as they come: the header first, each row in the header's widths (or wider)."""
    widths = [len(h) for h in HEADERS]
    widths[1], widths[4], widths[5], widths[10] = 23, 36, 28, 14
    as_json = output.machine_readable(args)
    args.streaming = True  # yaml: one document per entry
    if not as_json:
        print("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)).rstrip(), flush=True)
    seen = 0
    for e in events:
        if as_json:
            output.emit(e, args)
        else:
            print("  ".join(c.ljust(w) for c, w in zip(row(e), widths, strict=True)).rstrip(), flush=True)
        seen += 1
        if count and seen >= count:
            break
    return 0


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    after = args.after
    since: list[pb.AuditEvent] = []
    if args.since and not after:  # the entries since then first, then the stream after them
        request = pb.ListAuditEventsRequest(filter=args.filter or "", page_size=1000)
        request.start_time.CopyFrom(_timestamp(args.since))
        since = list(_pages(client, request, args.count))
        after = since[-1].sequence if since else 0
    stream = client.audit.stream_audit_events(filter=args.filter or "", after_sequence=after, timeout=None)
    try:
        return _print_live(itertools.chain(since, (m.event for m in stream)), args, args.count)
    finally:  # Ctrl-C goes on to msctl's main: "interrupted", exit 130
        stream.close()  # cancels the call


def add_verbs(asub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = asub.add_parser("list", help="audit entries as a table (filter, time range)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--filter", help='e.g. "principal=apikey:ci AND method=WriteMemory"')
    p.add_argument("--since", type=parse_when, help="30m, 2h, 7d ago, or an ISO time")
    p.add_argument("--until", type=parse_when, help="as --since")
    p.add_argument("--limit", type=int, default=1000, help="at most this many entries (0: all; default 1000)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object a line")
    p.set_defaults(handler=cmd_list)
    p = asub.add_parser("watch", help="audit entries as they are written",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--filter", help="as for list")
    p.add_argument("--since", type=parse_when, help="show the entries since then first (30m, 2h, ISO time)")
    p.add_argument("--after", type=int, default=0, help="show the entries after this sequence number first")
    p.add_argument("--count", type=int, default=0, help="stop after N entries (default: until interrupted)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object a line")
    p.set_defaults(handler=cmd_watch)
