"""Console logs on disk (store/console_files.py) and the log that writes them behind
(core/console.py): absolute offsets kept across a reopen, the bound on the file, atomic
trims, a damaged file set aside, deletion."""

from __future__ import annotations

from pathlib import Path

from machineserver.server.core.console import ConsoleLog
from machineserver.server.store.console_files import HEADER, ConsoleFile, ConsoleStore, slack_for


def test_file_keeps_offsets_and_is_bounded(tmp_path: Path) -> None:
    retain = 1000
    f = ConsoleFile(tmp_path / "s.log", retain)
    assert f.load() == (0, b"")  # no file yet
    written = b""
    for i in range(400):
        chunk = f"line {i:04d}\n".encode()  # 10 bytes each: 4000 bytes in all
        f.append(chunk, len(written))
        written += chunk
        # never more than retain + slack of output on disk, plus the header
        assert (tmp_path / "s.log").stat().st_size <= HEADER.size + retain + slack_for(retain)
    f.close()
    start, data = ConsoleFile(tmp_path / "s.log", retain).load()
    assert start == len(written) - retain and data == written[-retain:]
    assert not list(tmp_path.glob(".*.tmp"))  # trims leave no temporary file behind


def test_a_damaged_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "s.log").write_bytes(b"not a console log")
    assert ConsoleFile(tmp_path / "s.log", 100).load() == (0, b"")
    assert (tmp_path / "s.damaged").read_bytes() == b"not a console log"


def test_store_lists_and_removes_and_clears_a_crashed_trim(tmp_path: Path) -> None:
    root = tmp_path / "console"
    store = ConsoleStore(root)
    store.file("s-1", 100).append(b"x", 0)
    (root / ".s-1-abc.tmp").write_bytes(b"half a trim")
    store = ConsoleStore(root)  # a restart
    assert store.session_ids() == {"s-1"} and not list(root.glob(".*.tmp"))
    store.remove("s-1")
    assert store.session_ids() == set()


async def test_log_writes_behind_and_reloads_with_absolute_offsets(tmp_path: Path) -> None:
    store = ConsoleStore(tmp_path)
    log = ConsoleLog(64, store.file("s", 64))
    for i in range(20):
        log.append(f"{i:02d}:".encode())  # 3 bytes each: 60 bytes, all retained
    log.append(b"tail" * 3)  # 72 bytes: the first 8 dropped from memory and file
    await log.flush()
    assert log.end == 72 and log.read(0).dropped == 8
    await log.close()

    again = ConsoleLog(64, store.file("s", 64))
    assert again.end == 72  # offsets go on where they were
    chunk = again.read(0)
    assert (chunk.offset, chunk.dropped) == (8, 8) and chunk.data == log.read(8).data
    again.append(b"!")
    await again.flush()
    assert again.read(72).data == b"!"
    await again.discard()
    assert store.session_ids() == set()
