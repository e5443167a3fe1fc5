"""``msctl job ...``: regression jobs over JobService.

``run suite.yaml`` uploads the suite's program files, creates the job and follows it with a
live progress bar until every run has a verdict; ``watch`` follows a job created earlier;
``results`` shows its runs as a table, ``junit -o report.xml`` writes its JUnit XML;
``list``, ``get`` and ``cancel`` are the rest. A job is named ``jobs/ID`` or ``ID``.

Exit status of ``run`` and ``watch``: 0 when every run PASSED, 1 when a run FAILED,
ERRORED or was CANCELLED, 2 when the suite file cannot be used or the server refused or
failed a call (no verdict to report), 130 on Ctrl-C. Ctrl-C leaves the job running on the
server (it belongs to the server, not to this terminal) and prints how to follow or cancel
it; ``--cancel-on-interrupt`` cancels it instead.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import duration_pb2
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from machineserver.cli import output, render
from machineserver.sdk import Client, errors
from machineserver.v1 import job_pb2 as pb

PREFIX = "jobs/"
SUITE_HELP = """\
The suite file (YAML) is the job's matrix: every program x board x backend x variant is one
run. Relative paths are relative to the suite file; unknown keys are refused.

  display_name: nightly smoke        # default: the file's name
  labels: {ci: nightly}
  programs:                          # files to upload (ELF, Intel HEX, BIN) or programs/ID
    - hello.elf
    - {path: crc32.bin, format: bin, load_address: 0x0, sources: ../src}
    - programs/3f2a9c...
  boards: [lm3s6965evb, mps2-an385]
  backends: [unicorn, qemu]          # default: the server's default backend
  variants:                          # default: one variant with no changes, "default"
    - name: baseline
    - name: typed
      console_input: "hi there\\nq"   # sent once the run starts
      memory_patches:                # written before the run starts
        - {address: 0x20000000, data: "de ad be ef"}   # hex bytes, or text: "..."
    - {name: warm, snapshot: snapshots/ID}             # fork every run from this snapshot
  criteria:
    pass_regex: "Hello from"         # Python re syntax, searched in the console
    fail_regex: "PANIC|hardfault"
    expected_exit_code: 0            # the semihosting exit code
    max_instructions: 5000000        # budget in instructions and/or virtual time
    max_virtual_time: 2s             # 500ms, 2s, 1m, or a number of seconds
    host_timeout: 60s                # host-time guard (server default 60 s)
    coverage: true                   # merged into one coverage report for the job
    retries: 1                       # retries of a run that ERRORED (engine or node died)
  resources: {cpus: 1, memory: 512Mi, gpus: 0, custom: {board-farm=stm32: 1}}

A program's sources (a folder or an archive) go up with it for coverage HTML; --sources
gives them for every uploaded program that names none.
"""
# verdict -> (label, rich style)
VERDICTS: dict[int, tuple[str, str]] = {
    pb.RUN_VERDICT_QUEUED: ("QUEUED", "dim"),
    pb.RUN_VERDICT_RUNNING: ("RUNNING", "cyan"),
    pb.RUN_VERDICT_PASSED: ("PASSED", "green"),
    pb.RUN_VERDICT_FAILED: ("FAILED", "red"),
    pb.RUN_VERDICT_ERRORED: ("ERRORED", "magenta"),
    pb.RUN_VERDICT_CANCELLED: ("CANCELLED", "yellow"),
}
ENDED_VERDICTS = (pb.RUN_VERDICT_PASSED, pb.RUN_VERDICT_FAILED, pb.RUN_VERDICT_ERRORED, pb.RUN_VERDICT_CANCELLED)
EXIT_PASSED, EXIT_NOT_PASSED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class SuiteError(Exception):
    """A suite file that cannot be used; the message names the file and the place."""


# ---------------------------------------------------------------------- suite files


@dataclass
class ProgramFile:
    path: Path
    format: str = ""
    load_address: int = 0
    sources: str | None = None


@dataclass
class Suite:
    path: Path
    request: pb.CreateJobRequest
    # the matrix's programs in order: programs/ID as given, or a file still to upload
    programs: list[str | ProgramFile] = field(default_factory=list)


def _mapping(value: object, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: wants a mapping ({', '.join(allowed)}), got {type(value).__name__}")
    unknown = [str(k) for k in value if k not in allowed]
    if unknown:
        raise SuiteError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(allowed)})")
    missing = [k for k in required if value.get(k) in (None, "")]
    if missing:
        raise SuiteError(f"{where}.{missing[0]}: is required")
    return value


def _number(value: object, where: str, *, integer: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SuiteError(f"{where}: wants a number, got {value!r}")
    try:
        n: float = int(value.strip(), 0) if isinstance(value, str) and integer else float(value)
    except ValueError:
        raise SuiteError(f"{where}: wants a number, got {value!r}") from None
    if integer and n != int(n):
        raise SuiteError(f"{where}: wants a whole number, got {value!r}")
    if n < 0:
        raise SuiteError(f"{where}: must not be negative, got {value!r}")
    return n


def _text(value: object, where: str) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise SuiteError(f"{where}: wants text, got {value!r}")
    return str(value)


def _strings(value: object, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise SuiteError(f"{where}: wants a list of names, got {type(value).__name__}")
    return [_text(v, f"{where}[{i}]") for i, v in enumerate(items)]


DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h)?\s*$")
SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(k|ki|m|mi|g|gi|t|ti)?b?\s*$", re.IGNORECASE)
SIZES = {None: 1, "k": 10**3, "ki": 2**10, "m": 10**6, "mi": 2**20, "g": 10**9, "gi": 2**30, "t": 10**12, "ti": 2**40}


def _duration(value: object, where: str) -> duration_pb2.Duration:
    match = DURATION.match(str(value)) if not isinstance(value, bool) else None
    if match is None:
        raise SuiteError(f"{where}: wants a duration such as 500ms, 2s, 1m (or seconds), got {value!r}")
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(float(match[1]) * SECONDS[match[2]] * 1e9))
    return d


def _bytes_size(value: object, where: str) -> int:
    match = SIZE.match(str(value)) if not isinstance(value, bool) else None
    if match is None:
        raise SuiteError(f"{where}: wants a size such as 512Mi, 2G (or bytes), got {value!r}")
    unit = match[2].lower() if match[2] else None
    return round(float(match[1]) * SIZES[unit])


class _SuiteParser:
    def __init__(self, path: Path) -> None:
        self.path = path

    def program(self, raw: object, i: int) -> str | ProgramFile:
        where = f"programs[{i}]"
        if isinstance(raw, str) and raw.startswith("programs/"):
            return raw
        d = {"path": raw} if isinstance(raw, str) else _mapping(raw, where, ("path", "format", "load_address",
                                                                             "sources"), ("path",))
        text = _text(d["path"], f"{where}.path")
        if text.startswith("programs/"):
            return text
        file = (self.path.parent / text).resolve()
        if not file.is_file():
            raise SuiteError(f"{where}: no such file: {text} (looked for {file})")
        fmt = _text(d.get("format") or "", f"{where}.format").lower()
        if fmt not in ("", "elf", "bin", "ihex", "hex"):
            raise SuiteError(f"{where}.format: one of elf, bin, ihex, hex, got {fmt!r}")
        sources = None
        if d.get("sources"):
            src = (self.path.parent / _text(d["sources"], f"{where}.sources")).resolve()
            if not src.exists():
                raise SuiteError(f"{where}.sources: no such folder or archive: {d['sources']} (looked for {src})")
            sources = str(src)
        return ProgramFile(file, fmt, int(_number(d.get("load_address", 0), f"{where}.load_address")), sources)

    def variant(self, raw: object, i: int) -> pb.JobVariant:
        where = f"variants[{i}]"
        d = _mapping(raw, where, ("name", "console_input", "memory_patches", "snapshot"), ("name",))
        v = pb.JobVariant(name=_text(d["name"], f"{where}.name"),
                          console_input=_text(d.get("console_input") or "", f"{where}.console_input").encode(),
                          snapshot=_text(d.get("snapshot") or "", f"{where}.snapshot"))
        patches = d.get("memory_patches") or []
        if not isinstance(patches, list):
            raise SuiteError(f"{where}.memory_patches: wants a list of {{address, data}}")
        for j, p in enumerate(patches):
            pw = f"{where}.memory_patches[{j}]"
            pd = _mapping(p, pw, ("address", "data", "text"), ("address",))
            if ("data" in pd) == ("text" in pd):
                raise SuiteError(f"{pw}: wants exactly one of data (hex bytes) or text")
            if "data" in pd:
                try:
                    data = bytes.fromhex(_text(pd["data"], f"{pw}.data").removeprefix("hex:"))
                except ValueError:
                    raise SuiteError(f"{pw}.data: wants hex bytes such as \"de ad be ef\", got {pd['data']!r}") from None
            else:
                data = _text(pd["text"], f"{pw}.text").encode()
            v.memory_patches.add(address=int(_number(pd["address"], f"{pw}.address")), data=data)
        return v

    def criteria(self, raw: object) -> pb.RunCriteria:
        d = _mapping(raw, "criteria", ("pass_regex", "fail_regex", "expected_exit_code", "max_instructions",
                                       "max_virtual_time", "host_timeout", "coverage", "retries"))
        c = pb.RunCriteria(pass_regex=_text(d.get("pass_regex") or "", "criteria.pass_regex"),
                           fail_regex=_text(d.get("fail_regex") or "", "criteria.fail_regex"),
                           max_instructions=int(_number(d.get("max_instructions", 0), "criteria.max_instructions")),
                           retries=int(_number(d.get("retries", 0), "criteria.retries")))
        for key in ("pass_regex", "fail_regex"):
            try:
                re.compile(getattr(c, key))
            except re.error as exc:
                raise SuiteError(f"criteria.{key}: not a regular expression: {exc}") from None
        if d.get("expected_exit_code") is not None:
            code = d["expected_exit_code"]
            if isinstance(code, bool) or not isinstance(code, int):
                raise SuiteError(f"criteria.expected_exit_code: wants a whole number, got {code!r}")
            c.expected_exit_code = code
        for key in ("max_virtual_time", "host_timeout"):
            if d.get(key) is not None:
                getattr(c, key).CopyFrom(_duration(d[key], f"criteria.{key}"))
        if "coverage" in d:
            if not isinstance(d["coverage"], bool):
                raise SuiteError(f"criteria.coverage: wants true or false, got {d['coverage']!r}")
            c.coverage = d["coverage"]
        return c

    def resources(self, raw: object) -> pb.RunResources:
        d = _mapping(raw, "resources", ("cpus", "memory", "gpus", "custom"))
        r = pb.RunResources(cpus=_number(d.get("cpus", 0), "resources.cpus", integer=False),
                            gpus=_number(d.get("gpus", 0), "resources.gpus", integer=False))
        if d.get("memory") is not None:
            r.memory_bytes = _bytes_size(d["memory"], "resources.memory")
        custom = d.get("custom") or {}
        if not isinstance(custom, dict):
            raise SuiteError("resources.custom: wants a mapping of label to amount")
        for key, amount in custom.items():
            r.custom[str(key)] = _number(amount, f"resources.custom.{key}", integer=False)
        return r


SUITE_KEYS = ("display_name", "labels", "programs", "boards", "backends", "variants", "criteria", "resources")


def load_suite(path_text: str) -> Suite:
    """The suite file, checked: every problem raises SuiteError naming the file and place."""
    path = Path(path_text)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SuiteError(f"{path_text}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path_text}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start}): is it the suite YAML?") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SuiteError(f"{path_text}: bad YAML: {where}{' '.join(str(problem).split())}") from None
    try:
        return _suite(path, raw)
    except SuiteError as exc:
        raise SuiteError(f"{path_text}: {exc}") from None


def _suite(path: Path, raw: object) -> Suite:
    if raw is None:
        raise SuiteError("the file is empty (it wants programs and boards)")
    d = _mapping(raw, "suite", SUITE_KEYS, ("programs", "boards"))
    parser = _SuiteParser(path)
    if not isinstance(d["programs"], list):
        raise SuiteError("programs: wants a list of files or programs/ID")
    programs = [parser.program(p, i) for i, p in enumerate(d["programs"])]
    labels = d.get("labels") or {}
    if not isinstance(labels, dict):
        raise SuiteError("labels: wants a mapping of text to text")
    variants = d.get("variants") or []
    if not isinstance(variants, list):
        raise SuiteError("variants: wants a list of {name, console_input, memory_patches, snapshot}")
    request = pb.CreateJobRequest(
        display_name=_text(d.get("display_name") or path.stem, "display_name"),
        matrix=pb.JobMatrix(boards=_strings(d["boards"], "boards"),
                            backends=_strings(d.get("backends") or [], "backends"),
                            variants=[parser.variant(v, i) for i, v in enumerate(variants)]),
        criteria=parser.criteria(d.get("criteria") or {}),
        resources=parser.resources(d.get("resources") or {}),
        labels={str(k): _text(v, f"labels.{k}") for k, v in labels.items()},
    )
    return Suite(path, request, programs)


def upload_programs(client: Client, suite: Suite, sources: str | None, say: Console) -> list[str]:
    """The matrix's program names: files uploaded (with their sources), names as given."""
    names = []
    for p in suite.programs:
        if isinstance(p, str):
            names.append(p)
            continue
        resp = client.upload_program(p.path, format=p.format, load_address=p.load_address,
                                     sources=p.sources or sources)
        note = " (already stored)" if resp.deduplicated else ""
        say.print(f"uploaded {p.path.name} -> {resp.program.name}{note}", highlight=False)
        names.append(resp.program.name)
    return names


# ---------------------------------------------------------------------- output


def job_name(text: str) -> str:
    return text if text.startswith(PREFIX) else PREFIX + text


def _console(stderr: bool = False) -> Console:
    """Rich output; not to a terminal: no colour, wide enough that table rows stay one line."""
    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    return Console(stderr=stderr, width=max(probe.width, 240), no_color=True, highlight=False)


def verdict_label(verdict: int) -> str:
    return VERDICTS.get(verdict, ("UNSPECIFIED", ""))[0]


def state_label(state: int) -> str:
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def _seconds(d: duration_pb2.Duration) -> str:
    return f"{d.ToNanoseconds() / 1e9:.3f} s" if d.seconds or d.nanos else ""


def counts_text(c: pb.JobCounts) -> str:
    done = c.passed + c.failed + c.errored + c.cancelled
    text = (f"{done}/{c.total} done: {c.queued} queued, {c.running} running, {c.passed} passed, "
            f"{c.failed} failed, {c.errored} errored")
    if c.cancelled:
        text += f", {c.cancelled} cancelled"
    if c.retries:
        text += f", {c.retries} retries"
    return text


def exit_status(job: pb.Job) -> int:
    c = job.counts
    passed = job.state == pb.JOB_STATE_DONE and c.passed == c.total
    return EXIT_PASSED if passed else EXIT_NOT_PASSED


class ProgramNames:
    """programs/ID -> its display name (the uploaded file's name), looked up once each."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.known: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        if name not in self.known:
            try:
                self.known[name] = self.client.sessions.get_program(name=name).program.display_name or name
            except errors.MachineServerError:
                self.known[name] = name
        return self.known[name]


def _run_label(run: pb.JobRun, programs: ProgramNames) -> str:
    return " ".join(x for x in (programs(run.program), run.board, run.backend, run.variant) if x)


def all_runs(client: Client, name: str, filter_text: str = "") -> Iterator[pb.JobRun]:
    token = ""
    while True:
        resp = client.jobs.list_job_runs(parent=name, page_size=500, page_token=token, filter=filter_text)
        yield from resp.runs
        token = resp.next_page_token
        if not token:
            return


def short_node(node: str) -> str:
    """A Ray node id (56 hex digits) cut to its first 12, as Ray's own tools show it."""
    head, sep, rest = node.partition(" ")
    if len(head) > 16 and all(c in "0123456789abcdef" for c in head):
        head = head[:12]
    return head + sep + rest


def runs_table(runs: list[pb.JobRun], programs: ProgramNames, title: str | None = None) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
    for header, justify in (("RUN", "right"), ("PROGRAM", "left"), ("BOARD", "left"), ("BACKEND", "left"),
                            ("VARIANT", "left"), ("VERDICT", "left"), ("EXIT", "right"),
                            ("INSTRUCTIONS", "right"), ("HOST TIME", "right"), ("NODE", "left"),
                            ("REASON", "left")):
        table.add_column(header, justify=justify, no_wrap=header != "REASON")  # type: ignore[arg-type]
    for r in runs:
        label, style = VERDICTS.get(r.verdict, ("UNSPECIFIED", ""))
        attempts = f" ({r.attempts} attempts)" if r.attempts > 1 else ""
        table.add_row(r.name.rsplit("/", 1)[-1], programs(r.program), r.board, r.backend, r.variant,
                      f"[{style}]{label}[/]" if style else label,
                      str(r.exit_code) if r.HasField("exit_code") else "", f"{r.instructions:,}",
                      _seconds(r.host_time), short_node(r.node), r.failure_reason + attempts)
    return table


# ---------------------------------------------------------------------- following a job


def follow(client: Client, name: str, *, cancel_on_interrupt: bool = False, quiet: bool = False) -> pb.Job:
    """Follows the job until it ends (WatchJob), with a progress bar on a terminal and one
    line per finished run elsewhere; returns the job as it ended. KeyboardInterrupt
    propagates after the job was cancelled (cancel_on_interrupt) or left running."""
    out = _console()
    programs = ProgramNames(client)
    started = time.monotonic()
    job: pb.Job | None = None
    try:
        if out.is_terminal and not quiet:
            job = _follow_live(client, name, out, programs)
        else:
            job = _follow_lines(client, name, out, programs, quiet)
    except KeyboardInterrupt:  # one line (plain: rich would wrap it), then 130
        if not cancel_on_interrupt:
            print(f"msctl: interrupted: {name} goes on running on the server; follow it with "
                  f"`msctl job watch {name}`, stop it with `msctl job cancel {name}`", file=sys.stderr)
            raise
        try:
            cancelled = client.jobs.cancel_job(name=name).job
        except errors.MachineServerError as exc:
            print(f"msctl: interrupted: could not cancel {name}: {exc}", file=sys.stderr)
        else:
            print(f"msctl: interrupted: cancelled {name} ({state_label(cancelled.state)}, "
                  f"{counts_text(cancelled.counts)})", file=sys.stderr)
        raise
    if job is None or job.state == pb.JOB_STATE_RUNNING:  # the stream ended early: ask for the last word
        job = client.jobs.get_job(name=name).job
    if not quiet:
        took = (job.end_time.ToNanoseconds() - job.create_time.ToNanoseconds()) / 1e9 if job.HasField("end_time") \
            else time.monotonic() - started
        out.print(f"{job.name} {state_label(job.state)} after {took:.1f} s: {counts_text(job.counts)}", highlight=False)
        if job.coverage_report:
            out.print(f"coverage: {job.coverage_report}  (msctl coverage export {job.coverage_report} --format lcov)",
                      highlight=False)
        bad = list(all_runs(client, name, "verdict=FAILED")) + list(all_runs(client, name, "verdict=ERRORED"))
        if bad:
            render.print_table(runs_table(bad, programs, title="runs that did not pass"), out)
    return job


def _follow_lines(client: Client, name: str, out: Console, programs: ProgramNames, quiet: bool) -> pb.Job | None:
    job = None
    for msg in client.jobs.watch_job(name=name):
        job = msg.job
        if not quiet and msg.HasField("run") and msg.run.verdict in ENDED_VERDICTS:
            c = job.counts
            done = c.passed + c.failed + c.errored + c.cancelled
            reason = f"  {msg.run.failure_reason}" if msg.run.failure_reason else ""
            out.print(f"[{done}/{c.total}] {verdict_label(msg.run.verdict):9} {_run_label(msg.run, programs)}{reason}")
    return job


def _follow_live(client: Client, name: str, out: Console, programs: ProgramNames) -> pb.Job | None:
    job = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[counts]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=out, transient=False) as progress:
        task = progress.add_task(name, total=None, counts="")
        for msg in client.jobs.watch_job(name=name):
            job = msg.job
            c = job.counts
            done = c.passed + c.failed + c.errored + c.cancelled
            summary = (f"[dim]{c.queued} queued[/] [cyan]{c.running} running[/] [green]{c.passed} passed[/] "
                       f"[red]{c.failed} failed[/] [magenta]{c.errored} errored[/]")
            progress.update(task, total=c.total, completed=done, counts=summary)
            if msg.HasField("run") and msg.run.verdict in (pb.RUN_VERDICT_FAILED, pb.RUN_VERDICT_ERRORED):
                label, style = VERDICTS[msg.run.verdict]
                progress.console.print(f"[{style}]{label}[/] {_run_label(msg.run, programs)}  {msg.run.failure_reason}",
                                       highlight=False)
    return job


def write_junit(client: Client, name: str, output: str) -> None:
    out = open(output, "wb") if output != "-" else sys.stdout.buffer
    try:
        for msg in client.jobs.export_job_junit(name=name):
            out.write(msg.chunk)
    finally:
        if out is not sys.stdout.buffer:
            out.close()


# ---------------------------------------------------------------------- verbs


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    err = _console(stderr=True)
    try:
        suite = load_suite(args.suite)
    except SuiteError as exc:
        print(f"msctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        suite.request.matrix.programs.extend(upload_programs(client, suite, args.sources, err))
        job = client.jobs.create_job(suite.request).job
    except (OSError, ValueError) as exc:
        print(f"msctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except errors.MachineServerError as exc:
        _print_error(exc)
        return EXIT_ERROR
    if output.machine_readable(args) and not args.wait:
        output.emit(job, args)
        return EXIT_PASSED
    err.print(f"{job.name}: {job.counts.total} runs ({job.display_name}, engine {job.engine or 'local'})",
              highlight=False)
    if not args.wait:
        print(job.name)
        return EXIT_PASSED
    return _follow_to_end(client, job.name, args)


def _follow_to_end(client: Client, name: str, args: argparse.Namespace) -> int:
    try:
        job = follow(client, name, cancel_on_interrupt=getattr(args, "cancel_on_interrupt", False),
                     quiet=args.json)
        if getattr(args, "output", None):
            write_junit(client, name, args.output)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except errors.MachineServerError as exc:
        _print_error(exc)
        return EXIT_ERROR
    if output.machine_readable(args):
        output.emit(job, args)
    return exit_status(job)


def _print_error(exc: errors.MachineServerError) -> None:
    print(f"msctl: {exc}", file=sys.stderr)
    for fld, why in exc.field_violations:
        print(f"  field {fld}: {why}", file=sys.stderr)


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    try:
        client.jobs.get_job(name=job_name(args.job))  # a job that does not exist: exit 2, not 1
    except errors.MachineServerError as exc:
        _print_error(exc)
        return EXIT_ERROR
    return _follow_to_end(client, job_name(args.job), args)


def cmd_results(client: Client, args: argparse.Namespace) -> int:
    name = job_name(args.job)
    runs = list(all_runs(client, name, args.filter or ""))
    if output.machine_readable(args):
        output.emit(pb.ListJobRunsResponse(runs=runs), args)
        return 0
    render.print_table(runs_table(runs, ProgramNames(client)), _console())
    return 0


def cmd_junit(client: Client, args: argparse.Namespace) -> int:
    write_junit(client, job_name(args.job), args.output)
    if args.output != "-":
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    resp = client.jobs.list_jobs(page_size=args.page_size, filter=args.filter or "")
    if output.machine_readable(args):
        output.emit(resp, args)
        return 0
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("NAME", "DISPLAY NAME", "STATE", "RUNS", "PASSED", "FAILED", "ERRORED", "ENGINE", "CREATED"):
        table.add_column(header, no_wrap=True)
    for j in resp.jobs:
        c = j.counts
        table.add_row(j.name, j.display_name, state_label(j.state), str(c.total), str(c.passed), str(c.failed),
                      str(c.errored), j.engine, j.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"))
    render.print_table(table, _console())
    return 0


def _describe(job: pb.Job) -> None:
    out = _console()
    lines = [f"{job.name}  {job.display_name}", f"  state     {state_label(job.state)}",
             f"  runs      {counts_text(job.counts)}", f"  engine    {job.engine}",
             f"  matrix    {len(job.matrix.programs)} programs x {len(job.matrix.boards)} boards x "
             f"{max(1, len(job.matrix.backends))} backends x {max(1, len(job.matrix.variants))} variants",
             f"  created   {job.create_time.ToDatetime():%Y-%m-%d %H:%M:%S} UTC by {job.owner or '-'}"]
    if job.HasField("end_time"):
        lines.append(f"  ended     {job.end_time.ToDatetime():%Y-%m-%d %H:%M:%S} UTC")
    if job.coverage_report:
        lines.append(f"  coverage  {job.coverage_report}")
    for line in lines:
        out.print(line, highlight=False)


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    resp = client.jobs.get_job(name=job_name(args.job))
    if output.machine_readable(args):
        output.emit(resp, args)
    else:
        _describe(resp.job)
    return 0


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    resp = client.jobs.cancel_job(name=job_name(args.job))
    if output.machine_readable(args):
        output.emit(resp, args)
    else:
        print(f"{resp.job.name} {state_label(resp.job.state)}: {counts_text(resp.job.counts)}")
    return 0


def add_verbs(jsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = jsub.add_parser("run", help="run a suite file: upload its programs, create the job, follow it",
                        description=__doc__.split("\n\n")[2] + "\n\n" + SUITE_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", help="the suite file (YAML)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the job until it ends (default); --no-wait prints its name and returns")
    p.add_argument("-o", "--output", help="write the JUnit XML report here once the job ends")
    p.add_argument("--sources", help="source files (a folder or an archive) for every uploaded program "
                   "whose suite entry names none (coverage HTML)")
    p.add_argument("--cancel-on-interrupt", action="store_true",
                   help="Ctrl-C cancels the job (default: it goes on running on the server)")
    p.set_defaults(handler=cmd_run)
    p = jsub.add_parser("watch", help="follow a job until it ends (progress bar; exit status as `run`)")
    p.add_argument("job", help="jobs/ID or ID")
    p.add_argument("-o", "--output", help="write the JUnit XML report here once the job ends")
    p.add_argument("--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels the job")
    p.set_defaults(handler=cmd_watch)
    p = jsub.add_parser("results", help="a job's runs as a table")
    p.add_argument("job")
    p.add_argument("--filter", help="verdict=FAILED, program=programs/ID, board=B, backend=B, variant=V")
    p.set_defaults(handler=cmd_results)
    p = jsub.add_parser("junit", help="write a job's JUnit XML")
    p.add_argument("job")
    p.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    p.set_defaults(handler=cmd_junit)
    p = jsub.add_parser("list", help="jobs as a table")
    p.add_argument("--filter", help="state=RUNNING, labels.KEY=VALUE")
    p.add_argument("--page-size", type=int, default=100)
    p.set_defaults(handler=cmd_list)
    p = jsub.add_parser("get", help="one job: state, counts, matrix, coverage report")
    p.add_argument("job")
    p.set_defaults(handler=cmd_get)
    p = jsub.add_parser("cancel", help="cancel a job's queued and running runs")
    p.add_argument("job")
    p.set_defaults(handler=cmd_cancel)
