"""msctl whoami and msctl apikey create|list|revoke: who the server takes you for, and
API keys (admin), as readable text (``--json`` for the messages)."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from machineserver.cli import output, render
from machineserver.sdk import Client
from machineserver.v1 import access_pb2

ROLES = {"viewer": access_pb2.ROLE_VIEWER, "operator": access_pb2.ROLE_OPERATOR, "admin": access_pb2.ROLE_ADMIN}


def _roles(values: Any) -> str:
    return ",".join(access_pb2.Role.Name(r).removeprefix("ROLE_").lower() for r in values) or "-"


def _time(ts: Any, field: str, parent: Any) -> str:
    if not parent.HasField(field):
        return "-"
    return datetime.datetime.fromtimestamp(ts.seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _duration(text: str) -> str:
    """"90d", "12h", "30m", "45s" or seconds -> the Duration's JSON form ("3600s")."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90d, 12h, 30m, 3600)") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the ttl must be positive")
    return f"{seconds:g}s"


def cmd_whoami(client: Client, args: argparse.Namespace) -> int:
    resp = client.access.get_caller_identity()
    if output.machine_readable(args):
        output.emit(resp, args)
        return 0
    who = resp.identity
    method = access_pb2.AuthMethod.Name(who.auth_method).removeprefix("AUTH_METHOD_").lower()
    print(f"principal:  {who.principal}\ntenant:     {who.tenant}\nroles:      {_roles(who.roles)}\n"
          f"auth:       {method}")
    return 0


def cmd_apikey_create(client: Client, args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"display_name": args.name, "tenant": args.tenant,
                              "roles": [ROLES[r] for r in args.role]}
    if args.ttl:
        fields["ttl"] = args.ttl
    resp = client.access.create_api_key(**fields)
    if output.machine_readable(args):
        output.emit(resp, args)
        return 0
    key = resp.api_key
    print(f"created {key.name} ({key.principal}, tenant {key.tenant}, roles {_roles(key.roles)}, "
          f"expires {_time(key.expire_time, 'expire_time', key)})")
    print("secret (shown only now; send it as 'authorization: ApiKey <secret>', msctl --api-key):")
    print(resp.secret)
    return 0


def cmd_apikey_list(client: Client, args: argparse.Namespace) -> int:
    terms = [f"tenant={args.tenant}"] if args.tenant else []
    if not args.all:
        terms.append("revoked=false")
    resp = client.access.list_api_keys(page_size=args.page_size, filter=" AND ".join(terms))
    if output.machine_readable(args):
        output.emit(resp, args)
        return 0
    table = render.new_table("NAME", "DISPLAY NAME", "TENANT", "ROLES", "SECRET", "CREATED", "EXPIRES", "REVOKED")
    for k in resp.api_keys:
        render.add_row(table, k.name, k.display_name, k.tenant, _roles(k.roles), k.secret_prefix + "...",
                       _time(k.create_time, "create_time", k), _time(k.expire_time, "expire_time", k),
                       _time(k.revoke_time, "revoke_time", k))
    render.print_table(table)
    return 0


def cmd_apikey_revoke(client: Client, args: argparse.Namespace) -> int:
    name = args.name if args.name.startswith("apiKeys/") else f"apiKeys/{args.name}"
    resp = client.access.revoke_api_key(name=name)
    if output.machine_readable(args):
        output.emit(resp, args)
    else:
        print(f"revoked {resp.api_key.name} ({resp.api_key.principal}); calls with it now fail UNAUTHENTICATED")
    return 0


def add_verbs(sub: Any) -> None:
    """``whoami`` and the ``apikey`` group on msctl's top-level subcommands."""
    p = sub.add_parser("whoami", help="who the server takes you for: principal, tenant, roles")
    p.set_defaults(handler=cmd_whoami)
    group = sub.add_parser("apikey", help="API keys: create (the secret is shown once), list, revoke (admin)")
    group.set_defaults(group_parser=group)
    verbs = group.add_subparsers(dest="command", metavar="COMMAND")
    p = verbs.add_parser("create", help="create a key and print its secret (once)")
    p.add_argument("--name", required=True, help="display name (the key's principal is apikey:NAME)")
    p.add_argument("--tenant", default="default", help="the tenant its calls act in (default: default)")
    p.add_argument("--role", action="append", choices=sorted(ROLES), required=True,
                   help="viewer, operator or admin (repeatable)")
    p.add_argument("--ttl", type=_duration, help="valid for (90d, 12h, 30m, seconds); default: no expiry")
    p.set_defaults(handler=cmd_apikey_create)
    p = verbs.add_parser("list", help="keys as a table (not their secrets)")
    p.add_argument("--tenant")
    p.add_argument("--all", action="store_true", help="revoked keys too")
    p.add_argument("--page-size", type=int, default=100)
    p.set_defaults(handler=cmd_apikey_list)
    p = verbs.add_parser("revoke", help="revoke a key: calls with it fail from now on")
    p.add_argument("name", help="apiKeys/ID or ID")
    p.set_defaults(handler=cmd_apikey_revoke)
