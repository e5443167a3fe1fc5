"""Coverage HTML never leaks the server's files (issue 14, "Server files leak through
coverage export"): a probe ELF whose DWARF names /etc/passwd, a secret file by absolute
path and by a relative ``../..`` path, exported as HTML through a real server; sources
come only from the client (with the program, or with the export), or from inside a
configured source root (symlinks and ``..`` out of it not followed). Bad bundles (zip
bomb, too many members, traversal names) are INVALID_ARGUMENT.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, Client, errors
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig
from machineserver.server.core import coverage_export, sources
from machineserver.server.core.errors import InvalidArgument
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import session_pb2 as spb
from tests.helpers.firmware import FIRMWARE
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN, require_tool

BOARD = "mps2-an385"
SECRET_TOKEN = "MS-SECRET-7f3a9c-do-not-leak"
PROBE_MARKER = "PROBE-SOURCE-FROM-CLIENT-41d2"
PASSWD_MARK = "root:x:0:0"


# --------------------------------------------------------------------------- the probe


def _probe_source(secret_abs: str, secret_rel: str) -> str:
    """main's lines named as /etc/passwd, the secret (absolute, then relative with ..),
    and src/probe_main.c: all four files have covered lines."""
    return f"""#include "fw.h"
static volatile int sink;
int main(void)
{{
#line 1 "/etc/passwd"
    sink = 1;
    sink = 2;
#line 1 "{secret_abs}"
    sink = 3;
    sink = 4;
#line 1 "{secret_rel}"
    sink = 5;
    sink = 6;
#line 1 "src/probe_main.c"
    sink = 7;
    sink = 8;
    return 0;
}}
"""


@pytest.fixture(scope="module")
def secret_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("secret")
    (d / "secret.c").write_text(f"int secret = 1; /* {SECRET_TOKEN} */\n" * 4)
    return d


@pytest.fixture(scope="module")
def probe_elf(tmp_path_factory: pytest.TempPathFactory, secret_dir: Path) -> bytes:
    require_tool("arm-none-eabi-gcc")
    out = tmp_path_factory.mktemp("probe")
    secret = secret_dir / "secret.c"
    rel = os.path.relpath(secret, os.getcwd())  # as the in-process server's cwd sees it
    assert rel.startswith("..")
    src = out / "probe.c"
    src.write_text(_probe_source(str(secret), rel))
    board = FIRMWARE / "boards" / BOARD
    cmd = [
        "arm-none-eabi-gcc", "-mcpu=cortex-m3", "-mthumb", "-mfloat-abi=soft", "-std=c11", "-O0", "-g",
        "-ffreestanding", "-nostdlib", "-fno-builtin", "-ffunction-sections", "-fdata-sections",
        f"-fdebug-prefix-map={out}=.",  # comp_dir ".": the relative name stays relative
        f"-I{FIRMWARE / 'common'}", f"-I{board}",
        str(FIRMWARE / "common" / "startup_cortexm.c"), str(FIRMWARE / "common" / "semihost_arm.c"),
        str(FIRMWARE / "common" / "fw.c"), str(board / "uart.c"), str(src),
        "-nostartfiles", "-Wl,--gc-sections", "-Wl,--no-warn-rwx-segments", f"-L{board}",
        "-T", str(FIRMWARE / "common" / "cortexm.ld"), "-o", str(out / "probe.elf"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=out)
    assert done.returncode == 0, done.stderr
    return (out / "probe.elf").read_bytes()


# --------------------------------------------------------------------------- helpers


def _chunks(elf: bytes, bundle: bytes = b"") -> Iterator[spb.UploadProgramRequest]:
    yield spb.UploadProgramRequest(metadata=spb.ProgramMetadata(display_name="probe"))
    for off in range(0, len(elf), 32 * 1024):
        yield spb.UploadProgramRequest(chunk=elf[off:off + 32 * 1024])
    for off in range(0, len(bundle), 16 * 1024):
        yield spb.UploadProgramRequest(sources_chunk=bundle[off:off + 16 * 1024])


def tar_of(files: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


async def _report(client: AsyncClient, program: str) -> str:
    s = (await client.sessions.create_session(
        board_template=BOARD, program=program, backend="unicorn", power_on=True, options={"coverage": True},
    )).session
    await client.coverage.start_coverage(name=s.name)
    stop = (await client.debug.continue_(name=s.name, wait=True, timeout=60)).stop
    assert stop.reason == cpb.STOP_REASON_EXIT and stop.exit_code == 0, stop
    return str((await client.coverage.stop_coverage(name=s.name)).report.name)


async def _html(client: AsyncClient, report: str, bundle: bytes = b"", source_root: str = "") -> dict[str, str]:
    msgs = [m async for m in client.coverage.export_coverage(
        name=report, format="COVERAGE_FORMAT_HTML", sources=bundle, source_root=source_root)]
    data = b"".join(m.chunk for m in msgs)
    out: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member)
            if f is not None:
                out[member.name] = f.read().decode(errors="replace")
    return out


def _everything(archive: dict[str, str]) -> str:
    return "\n".join(archive.values())


@pytest.fixture
async def server_with_roots(tmp_path: Path, secret_dir: Path) -> AsyncIterator[RunningServer]:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "src").mkdir()
    (allowed / "src" / "probe_main.c").write_text("\n" * 6 + f"    sink = 7; /* {PROBE_MARKER}-root */\n")
    os.symlink(secret_dir / "secret.c", allowed / "secret.c")  # a link out of the root
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning",
                       coverage_source_roots=(str(allowed),))
    running = await start(cfg)
    try:
        yield running
    finally:
        await running.stop(0.5)


# --------------------------------------------------------------------------- the leak


async def test_html_never_reads_paths_the_dwarf_or_client_names(client: AsyncClient, probe_elf: bytes,
                                                                  secret_dir: Path) -> None:
    program = (await client.sessions.upload_program(_chunks(probe_elf))).program
    assert list(program.source_files) == []
    report = await _report(client, program.name)
    summary = await client.coverage.get_coverage_summary(name=report)
    paths = {f.path for f in summary.files}
    assert "/etc/passwd" in paths and str(secret_dir / "secret.c") in paths
    assert any(p.startswith("..") and p.endswith("secret.c") for p in paths)
    # also with a source_root a client names: only a text prefix
    for root in ("", "/", "/etc", str(secret_dir)):
        archive = await _html(client, report, source_root=root)
        text = _everything(archive)
        assert PASSWD_MARK not in text and SECRET_TOKEN not in text
        assert "source not provided" in archive["coverage-html/README.txt"]
        assert "coverage-html/index.html" in archive


async def test_no_sources_says_so_per_file_and_keeps_counts(client: AsyncClient, probe_elf: bytes) -> None:
    program = (await client.sessions.upload_program(_chunks(probe_elf))).program
    report = await _report(client, program.name)
    archive = await _html(client, report)
    readme = archive["coverage-html/README.txt"]
    for listed in ("/etc/passwd", "src/probe_main.c"):
        assert listed in readme
    pages = [text for name, text in archive.items()
             if name.endswith(".html") and "probe_main.c" in name + text and "index" not in name]
    probe_pages = [t for t in pages if "source not provided" in t]
    assert probe_pages, "the per-file page says its source was not provided"
    # and still shows the line counts (genhtml's "lineCov" cells, or our table's)
    assert any(re.search(r'lineCov">\s*1 :|<td>1</td>', t) for t in probe_pages), probe_pages[0][:2000]


async def test_sources_uploaded_with_the_program_appear(client: AsyncClient, probe_elf: bytes) -> None:
    text = "\n" * 6 + f"    sink = 7; /* {PROBE_MARKER} */\n    sink = 8;\n"
    bundle = tar_of({"src/probe_main.c": text.encode(),
                     "etc/passwd": b"client-side text named passwd\n"}, gz=True)
    resp = await client.sessions.upload_program(_chunks(probe_elf, bundle))
    assert sorted(resp.program.source_files) == ["etc/passwd", "src/probe_main.c"]
    plain = (await client.sessions.upload_program(_chunks(probe_elf))).program
    assert plain.name != resp.program.name  # the same ELF with sources is another program
    report = await _report(client, resp.program.name)
    archive = await _html(client, report)
    text_all = _everything(archive)
    assert PROBE_MARKER in text_all
    assert "client-side text named passwd" in text_all  # /etc/passwd matched the bundle's etc/passwd
    assert PASSWD_MARK not in text_all and SECRET_TOKEN not in text_all
    got = await client.sessions.get_program(name=resp.program.name)
    assert sorted(got.program.source_files) == ["etc/passwd", "src/probe_main.c"]


async def test_sources_with_the_export_request_win(client: AsyncClient, probe_elf: bytes) -> None:
    program = (await client.sessions.upload_program(_chunks(probe_elf))).program
    report = await _report(client, program.name)
    # a zip, matched by path suffix (the member is just the file name)
    bundle = zip_of({"probe_main.c": ("\n" * 6 + f"/* {PROBE_MARKER}-zip */\n").encode()})
    archive = await _html(client, report, bundle)
    assert PROBE_MARKER + "-zip" in _everything(archive)
    readme = archive["coverage-html/README.txt"]
    assert "  src/probe_main.c\n" not in readme and "  /etc/passwd\n" in readme


async def test_bad_bundles_are_invalid_argument(client: AsyncClient, probe_elf: bytes) -> None:
    zeros = b"\0" * (4 << 20)  # each file under the per-file limit: the ratio guard refuses
    bomb = zip_of({f"src/bomb{i}.c": zeros for i in range(8)})
    tgz_bomb = tar_of({f"src/bomb{i}.c": zeros for i in range(8)}, gz=True)
    huge = zip_of({"src/huge.c": b"\0" * (sources.DEFAULT_LIMITS.max_file_bytes + 1)})
    many = tar_of({f"f{i}.c": b"x" for i in range(sources.DEFAULT_LIMITS.max_members + 1)})
    cases = {
        "zip bomb": bomb,
        "tar.gz bomb": tgz_bomb,
        "file over the limit": huge,
        "too many members": many,
        "dot-dot": tar_of({"../../etc/evil.c": b"x"}),
        "absolute": tar_of({"/etc/evil.c": b"x"}),
        "zip dot-dot": zip_of({"a/../../evil.c": b"x"}),
        "not an archive": b"this is not an archive at all" * 40,
    }
    program = (await client.sessions.upload_program(_chunks(probe_elf))).program
    report = await _report(client, program.name)
    for why, bundle in cases.items():
        with pytest.raises(errors.InvalidArgument) as upload_err:
            await client.sessions.upload_program(_chunks(probe_elf, bundle))
        assert "sources_chunk" in str(upload_err.value), why
        with pytest.raises(errors.InvalidArgument) as export_err:
            await _html(client, report, bundle)
        assert "sources" in str(export_err.value), why


async def test_source_roots_bound_what_the_server_reads(server_with_roots: RunningServer, probe_elf: bytes) -> None:
    async with await AsyncClient.connect(f"127.0.0.1:{server_with_roots.port}", timeout=30) as client:
        program = (await client.sessions.upload_program(_chunks(probe_elf))).program
        report = await _report(client, program.name)
        archive = await _html(client, report)
        text = _everything(archive)
        assert PROBE_MARKER + "-root" in text  # src/probe_main.c under the root
        assert PASSWD_MARK not in text and SECRET_TOKEN not in text  # outside, or a link out


# --------------------------------------------------------------------------- bundle reading


def test_member_names_and_matching() -> None:
    bundle = sources.read_bundle(tar_of({"./fw/src/main.c": b"A", "lib/main.c": b"B", "util.c": b"C"}))
    assert bundle.names() == ["fw/src/main.c", "lib/main.c", "util.c"]
    assert bundle.match("fw/src/main.c") == "fw/src/main.c"  # exact
    assert bundle.match("/home/ci/fw/src/main.c") == "fw/src/main.c"  # longest suffix
    assert bundle.match("/x/lib/main.c") == "lib/main.c"
    assert bundle.match("/x/other/main.c") is None  # two equally good: neither
    assert bundle.match("../../util.c") == "util.c"
    assert bundle.match("/etc/passwd") is None
    for bad in ("/abs.c", "a/../../b.c", "C:/x.c", "..\\x.c"):
        with pytest.raises(InvalidArgument):
            sources.normalise_name(bad)


def test_read_under_roots_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "src").mkdir(parents=True)
    (root / "src" / "ok.c").write_text("ok")
    outside = tmp_path / "outside.c"
    outside.write_text("outside")
    os.symlink(outside, root / "link.c")
    roots = [str(root)]
    assert sources.read_under_roots("src/ok.c", roots) == b"ok"
    assert sources.read_under_roots(str(root / "src" / "ok.c"), roots) == b"ok"
    assert sources.read_under_roots("link.c", roots) is None
    assert sources.read_under_roots("../outside.c", roots) is None
    assert sources.read_under_roots("src/../../outside.c", roots) is None
    assert sources.read_under_roots(str(outside), roots) is None
    assert sources.read_under_roots("/etc/passwd", roots) is None
    assert sources.read_under_roots("src/ok.c", []) is None
    assert sources.read_under_roots("src/ok.c", roots, max_bytes=1) is None  # bounded


async def test_builtin_writer_shows_sources_and_says_when_missing(
        client: AsyncClient, probe_elf: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same guarantees from our own HTML writer (genhtml not installed)."""
    real_which = shutil.which
    monkeypatch.setattr(coverage_export.shutil, "which",
                        lambda name, *a, **k: None if name == "genhtml" else real_which(name, *a, **k))
    text = "\n" * 6 + f"    sink = 7; /* {PROBE_MARKER}-builtin */\n"
    resp = await client.sessions.upload_program(_chunks(probe_elf, zip_of({"src/probe_main.c": text.encode()})))
    report = await _report(client, resp.program.name)
    archive = await _html(client, report)
    assert "built-in" in archive["coverage-html/README.txt"]
    everything = _everything(archive)
    assert PROBE_MARKER + "-builtin" in everything
    assert PASSWD_MARK not in everything and SECRET_TOKEN not in everything
    passwd_page = next(t for n, t in archive.items() if n.startswith("coverage-html/files/") and "/etc/passwd" in t)
    assert "source not provided" in passwd_page and "<td>1</td><td>1</td>" in passwd_page


def test_msctl_sends_sources(server_process: ServerProcess, probe_elf: bytes, tmp_path: Path) -> None:
    """msctl program upload --sources FOLDER and coverage export --sources ARCHIVE."""
    elf = tmp_path / "probe.elf"
    elf.write_bytes(probe_elf)
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "probe_main.c").write_text("\n" * 6 + f"/* {PROBE_MARKER}-cli */\n")
    (tree / "src" / "probe.o").write_bytes(b"\0ELF not a source")
    env = dict(os.environ, MSCTL_TARGET=server_process.target)

    def msctl(*args: str) -> str:
        done = subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    program = json.loads(msctl("--json", "program", "upload", str(elf), "--sources", str(tree)))["program"]
    assert program["source_files"] == ["src/probe_main.c"]
    with Client.connect(server_process.target, timeout=30) as client:
        s = client.sessions.create_session(board_template=BOARD, program=program["name"], backend="unicorn",
                                           power_on=True, options={"coverage": True}).session
        client.coverage.start_coverage(name=s.name)
        client.debug.continue_(name=s.name, wait=True, timeout=60)
        report = client.coverage.stop_coverage(name=s.name).report.name
    out = tmp_path / "report.tar.gz"
    msctl("coverage", "export", report, "--format", "html", "-o", str(out))
    assert PROBE_MARKER + "-cli" in _tar_text(out.read_bytes())
    (tmp_path / "other.zip").write_bytes(zip_of({"src/probe_main.c": ("\n" * 6 + "/* OTHER-TEXT */\n").encode()}))
    msctl("coverage", "export", report, "--format", "html", "--sources", str(tmp_path / "other.zip"), "-o", str(out))
    text = _tar_text(out.read_bytes())
    assert "OTHER-TEXT" in text and PROBE_MARKER + "-cli" not in text


def _tar_text(data: bytes) -> str:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return "\n".join(f.read().decode(errors="replace") for m in tar.getmembers()
                         if (f := tar.extractfile(m)) is not None)
