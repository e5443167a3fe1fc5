# PYTHON_ARGCOMPLETE_OK  (argcomplete: msctl completes in the shell; see complete.py)
"""msctl: the MachineServer command line.

Every RPC is a command (``msctl session create-session --board-template lm3s6965evb``),
and friendly verbs cover the common path::

    msctl serve                                   start a server (same flags as machineserver)
    msctl caps                                    backends and boards, as a table
    msctl boards                                  board templates: arch, cpu, memory, backends
    msctl program upload fw.elf                   upload a program
    msctl session create --board lm3s6965evb --program fw.elf --run
    msctl session list                            sessions, as a table
    msctl console SESSION                         follow a session's console
    msctl telemetry watch [--count N] [--json]    live host CPU, memory, temperatures, GPUs
    msctl coverage export SESSION --format lcov -o cov.info
    msctl debug SESSION                           interactive debugger (break, c, s, n, si, regs, x, bt, disas)
    msctl cosim create -f topology.yaml           co-simulation: member sessions + links from one file
    msctl cosim run NAME [--until-ns T]           run it, every member's console prefixed, until it stops
    msctl cosim console|status|list|step|pause|delete|snapshot|restore
    msctl job run suite.yaml [-o report.xml]      a regression job from a suite file, with a live progress bar
    msctl job watch|results|junit|list|get|cancel JOB   follow it, its runs as a table, its JUnit XML, ...
    msctl audit list|watch [--filter F] [--since 2h]   the audit log as a table (admin)
    msctl whoami                                  who the server takes you for (principal, tenant, roles)
    msctl apikey create --name N --role operator [--tenant T] [--ttl 90d]   prints the secret once
    msctl apikey list|revoke                      API keys (admin)
    msctl capsule show FILE [--json]              a failure capsule, read here: trigger, pc, registers, console, trace
    msctl capsule open FILE [--session-id ID]     import it: a session halted at the failure instant
    msctl capsule list|get|export NAME -o FILE|create SESSION [--reason R]|delete NAME

Credentials: --api-key (env MSCTL_API_KEY) or --token (a JWT, env MSCTL_TOKEN); TLS with
--tls (system roots) or --tls-ca CA.pem, plus --tls-cert/--tls-key for a client certificate.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import argcomplete
from google.rpc import error_details_pb2

from machineserver.cli import (
    access,
    audit,
    capsule,
    complete,
    console,
    cosim,
    debugger,
    jobs,
    output,
    rpc,
    watch,
)
from machineserver.sdk import Client, errors
from machineserver.sdk.sources import source_bundle
from machineserver.v1 import coverage_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
# what a command's parser stores as `handler`: runs the command, returns the exit status
Handler = Callable[[Client, argparse.Namespace], int]


# ---------------------------------------------------------------------- friendly verbs


def cmd_caps(client: Client, args: argparse.Namespace) -> int:
    output.emit(client.capabilities.get_capabilities(), args)  # a table of backends (render.show_caps)
    return 0


def cmd_boards(client: Client, args: argparse.Namespace) -> int:
    """Board templates in a short table: name, arch, cpu, MHz, memory, backends."""
    templates = client.capabilities.list_board_templates(page_size=args.page_size)
    output.emit(templates, args)
    return 0


def _upload(client: Client, path: str, fmt: str, load_address: int) -> str:
    resp = client.upload_program(path, format=fmt, load_address=load_address)
    return resp.program.name


def cmd_program_upload(client: Client, args: argparse.Namespace) -> int:
    resp = client.upload_program(args.file, format=args.format, load_address=args.load_address,
                                 sources=args.sources)
    output.emit(resp, args)
    return 0


def cmd_program_list(client: Client, args: argparse.Namespace) -> int:
    output.emit(client.sessions.list_programs(page_size=args.page_size), args)
    return 0


def cmd_session_create(client: Client, args: argparse.Namespace) -> int:
    program = ""
    if args.program:
        program = args.program if args.program.startswith("programs/") else _upload(client, args.program, args.format, args.load_address)
    labels = dict(args.label or [])
    resp = client.sessions.create_session(
        board_template=args.board or "", board_config=Path(args.board_config).read_text() if args.board_config else "",
        backend=args.backend or "", display_name=args.display_name or "", labels=labels, program=program,
        power_on=args.power_on, run=args.run, session_id=args.id or "",
        options={"coverage": args.coverage,
                 **({"remote": {"address": args.remote, "console": args.remote_console or ""}}
                    if args.remote else {})},
    )
    output.emit(resp, args)
    return 0


def cmd_session_list(client: Client, args: argparse.Namespace) -> int:
    output.emit(client.sessions.list_sessions(page_size=args.page_size, filter=args.filter or ""), args)
    return 0


def cmd_console(client: Client, args: argparse.Namespace) -> int:
    return console.run(client, args)  # Ctrl-C: main says so, 130


COVERAGE_FORMATS: dict[str, coverage_pb2.CoverageFormat.ValueType] = {
    "lcov": coverage_pb2.COVERAGE_FORMAT_LCOV,
    "html": coverage_pb2.COVERAGE_FORMAT_HTML,
    "cobertura": coverage_pb2.COVERAGE_FORMAT_COBERTURA,
    "json": coverage_pb2.COVERAGE_FORMAT_JSON,
}


def cmd_coverage_export(client: Client, args: argparse.Namespace) -> int:
    name = args.name if "/" in args.name else f"sessions/{args.name}"
    out = open(args.output, "wb") if args.output != "-" else sys.stdout.buffer
    try:
        bundle = source_bundle(args.sources) if args.sources else b""
        for msg in client.coverage.export_coverage(name=name, format=COVERAGE_FORMATS[args.format],
                                                   source_root=args.source_root or "", sources=bundle):
            out.write(msg.chunk)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    return 0


def cmd_coverage_summary(client: Client, args: argparse.Namespace) -> int:
    name = args.name if "/" in args.name else f"sessions/{args.name}"
    output.emit(client.coverage.get_coverage_summary(name=name), args)
    return 0


def cmd_serve(argv: list[str]) -> int:
    from machineserver.server.app import main as server_main

    server_main(argv)
    return 0


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msctl", description="MachineServer command line: every RPC, plus friendly verbs.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--target", default=os.environ.get("MSCTL_TARGET", DEFAULT_TARGET),
                        help=f"server address (env MSCTL_TARGET, default {DEFAULT_TARGET})")
    parser.add_argument("--json", action="store_true",
                        help="machine-readable JSON output, one line per message (same as -o json; "
                        "before or after the subcommand)")
    parser.add_argument("-o", "--output", dest="output_format", choices=output.FORMATS,
                        help="output format: table (for people, the default), json or yaml; "
                        "before or after the subcommand")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of unary calls, seconds")
    parser.add_argument("--api-key", default=os.environ.get("MSCTL_API_KEY"), help="API key (env MSCTL_API_KEY)")
    parser.add_argument("--token", default=os.environ.get("MSCTL_TOKEN"),
                        help="a JWT bearer token (env MSCTL_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (the system's root certificates)")
    parser.add_argument("--tls-ca", default=os.environ.get("MSCTL_TLS_CA"),
                        help="PEM CA certificates to check the server with (implies --tls; env MSCTL_TLS_CA)")
    parser.add_argument("--tls-cert", default=os.environ.get("MSCTL_TLS_CERT"),
                        help="PEM client certificate chain for mTLS (with --tls-key; env MSCTL_TLS_CERT)")
    parser.add_argument("--tls-key", default=os.environ.get("MSCTL_TLS_KEY"),
                        help="PEM private key of --tls-cert (env MSCTL_TLS_KEY)")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND")

    sub.add_parser("serve", help="start a MachineServer (flags as `machineserver --help`)", add_help=False)
    p = sub.add_parser("caps", help="backends, their availability and boards")
    p.set_defaults(handler=cmd_caps)
    p = sub.add_parser("boards", help="board templates in a short table (arch, cpu, memory, backends)")
    p.add_argument("--page-size", type=int, default=1000)
    p.set_defaults(handler=cmd_boards)
    p = sub.add_parser("console", help="follow a session's console output until it exits, faults or fails",
                       description="Print a session's console, following it until the session exits, faults "
                       "or fails.", epilog=console.EXIT_HELP)
    console.add_flags(p)
    p.set_defaults(handler=cmd_console)

    prog = sub.add_parser("program", help="upload and list programs")
    psub = prog.add_subparsers(dest="command", metavar="COMMAND")
    p = psub.add_parser("upload", help="upload an ELF, BIN or Intel HEX file")
    p.add_argument("file")
    p.add_argument("--format", default="", choices=["", "elf", "bin", "ihex", "hex"])
    p.add_argument("--load-address", type=lambda s: int(s, 0), default=0, help="for BIN")
    p.add_argument("--sources", help="its source files for coverage HTML: a folder (its source files are sent "
                   "as a tar.gz) or a .tar.gz/.tar/.zip; the server never reads sources from its own disk")
    p.set_defaults(handler=cmd_program_upload)
    p = psub.add_parser("list", help="programs as a table")
    p.add_argument("--page-size", type=int, default=100)
    p.set_defaults(handler=cmd_program_list)

    access.add_verbs(sub)
    rpc.add_rpc_commands(sub, session_completer=complete.session_names)
    cov_group = sub.choices["coverage"]
    csub = next(a for a in cov_group._actions if isinstance(a, argparse._SubParsersAction))
    p = csub.add_parser("export", help="write a coverage report: lcov, html (.tar.gz), cobertura, json")
    p.add_argument("name", help="a session (sessions/ID or ID) or coverageReports/ID")
    p.add_argument("--format", default="lcov", choices=sorted(COVERAGE_FORMATS))
    p.add_argument("--source-root", help="prefix for source paths, so they resolve where you read the report")
    p.add_argument("--sources", help="html: the source files to show (a folder or an archive), instead of those "
                   "uploaded with the program")
    p.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    p.set_defaults(handler=cmd_coverage_export)
    complete.complete_sessions(p, "name")
    p = csub.add_parser("summary", help="line/function/branch coverage per file, as a table")
    p.add_argument("name", help="a session (sessions/ID or ID) or coverageReports/ID")
    p.set_defaults(handler=cmd_coverage_summary)
    complete.complete_sessions(p, "name")
    session_group = sub.choices["session"]
    ssub = next(a for a in session_group._actions if isinstance(a, argparse._SubParsersAction))
    p = ssub.add_parser("create", help="create a session (uploads --program if it is a file)")
    p.add_argument("--board", help="board template, e.g. lm3s6965evb")
    p.add_argument("--board-config", help="an inline board config file (YAML/JSON)")
    p.add_argument("--backend", help="unicorn, qemu, ... (default: the server's)")
    p.add_argument("--program", help="a file to upload and load, or programs/ID")
    p.add_argument("--format", default="", choices=["", "elf", "bin", "ihex", "hex"])
    p.add_argument("--load-address", type=lambda s: int(s, 0), default=0)
    p.add_argument("--display-name")
    p.add_argument("--id", help="session id (default: generated)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", type=_key_value)
    p.add_argument("--power-on", action="store_true")
    p.add_argument("--run", action="store_true", help="power on and run")
    p.add_argument("--coverage", action="store_true", help="start the machine ready to collect coverage")
    p.add_argument("--remote", metavar="ADDRESS",
                   help="with --backend gdbremote: the GDB server to drive, HOST:PORT or unix:/path")
    p.add_argument("--remote-console", metavar="ENDPOINT",
                   help="with --remote: the target's console, tcp:HOST:PORT, unix:/path or serial:/dev/ttyX")
    p.set_defaults(handler=cmd_session_create)
    p = ssub.add_parser("list", help="sessions as a table")
    p.add_argument("--filter")
    p.add_argument("--page-size", type=int, default=100)
    p.set_defaults(handler=cmd_session_list)
    telemetry_group = sub.choices["telemetry"]
    watch.add_parser(next(a for a in telemetry_group._actions if isinstance(a, argparse._SubParsersAction)))
    cosim_group = sub.choices["cosim"]
    cosim.add_verbs(next(a for a in cosim_group._actions if isinstance(a, argparse._SubParsersAction)))
    audit_group = sub.choices["audit"]
    audit.add_verbs(next(a for a in audit_group._actions if isinstance(a, argparse._SubParsersAction)))
    job_group = sub.choices["job"]
    jobs.add_verbs(next(a for a in job_group._actions if isinstance(a, argparse._SubParsersAction)))
    capsule_group = sub.choices["capsule"]
    capsule.add_verbs(next(a for a in capsule_group._actions if isinstance(a, argparse._SubParsersAction)))
    rpc.describe_interactive_debugger(sub.choices["debug"], debugger.HELP)
    complete.complete_commands_and_sessions(sub.choices["debug"])
    complete.complete_sessions(sub.choices["console"], "session")
    return parser


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"wants KEY=VALUE, got {text!r}")
    return key, value


def _debug_session_argv(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], str] | None:
    """``msctl [opts] debug SESSION``: the interactive debugger, when the word after
    ``debug`` is not one of the DebugService commands."""
    if "debug" not in argv:
        return None
    i = argv.index("debug")
    if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
        return None
    group = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["debug"]
    commands = next(a for a in group._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv[i + 1] in commands:
        return None
    return argv[:i], argv[i + 1]


def connect(args: argparse.Namespace) -> Client:
    """A client with the global options' target, deadline, credentials and TLS."""
    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return Client.connect(args.target, timeout=args.timeout, api_key=args.api_key or None,
                          bearer_token=args.token or None, tls=args.tls or bool(args.tls_ca),
                          root_certificates=read(args.tls_ca), private_key=read(args.tls_key),
                          certificate_chain=read(args.tls_cert))


def _known_boards(client: Client, exc: errors.MachineServerError) -> str | None:
    """For a board template the server does not know: the ones it does, in one line
    (as the server lists backends for a backend typo); None for any other error."""
    info = exc.detail(error_details_pb2.ResourceInfo)
    if not isinstance(exc, errors.NotFound) or info is None or info.resource_type != "board template":
        return None
    try:
        templates = client.capabilities.list_board_templates(page_size=1000).board_templates
    except errors.MachineServerError:
        return None  # the caller may not list them; the error itself still stands
    return ", ".join(sorted(t.name.removeprefix("boardTemplates/") for t in templates))


def _os_error(exc: OSError) -> str:
    """``path: No such file or directory``: an OSError in one line."""
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _run_with_client(args: argparse.Namespace, handler: Handler) -> int:
    """Connect, run ``handler``, and turn what goes wrong into one line on stderr and
    an exit status: 1 for an error the server answers, 2 for a mistake in the input."""
    try:
        client = connect(args)
    except (OSError, ValueError) as exc:
        print(f"msctl: {_os_error(exc) if isinstance(exc, OSError) else exc}", file=sys.stderr)
        return 2
    try:
        return handler(client, args)
    except errors.MachineServerError as exc:
        print(f"msctl: {exc}", file=sys.stderr)
        for field, why in exc.field_violations:
            print(f"  field {field}: {why}", file=sys.stderr)
        if (boards := _known_boards(client, exc)) is not None:
            print(f"  known boards: {boards}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except rpc.UsageError as exc:
        print(f"msctl: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file named on the command line: missing, unreadable, a folder
        print(f"msctl: {_os_error(exc)}", file=sys.stderr)
        return 2
    finally:
        client.close()


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv, with the output format (``--json``, ``-o FORMAT``) taken from anywhere
    in it: ``args.output_format`` (table, json or yaml) and ``args.json``."""
    rest, chosen = output.split_output_flags(argv)
    args = parser.parse_args(rest)
    args.output_format = chosen or output.DEFAULT_FORMAT
    args.json = args.output_format == "json"
    return args


def _main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        return cmd_serve(argv[1:])
    parser = build_parser()
    argcomplete.autocomplete(parser)  # a shell's completion request (_ARGCOMPLETE set) ends here
    interactive = _debug_session_argv(parser, argv)
    if interactive is not None:
        session = interactive[1]
        return _run_with_client(parse_args(parser, interactive[0]), lambda client, _: debugger.run(client, session))
    args = parse_args(parser, argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        (getattr(args, "group_parser", None) or parser).print_help()
        return 2
    return _run_with_client(args, handler)


def main(argv: list[str] | None = None) -> int:
    """msctl's entry point: the exit status. Ctrl-C in any command (streams included)
    ends it with one line and 130, the shell's status for SIGINT."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print("msctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
