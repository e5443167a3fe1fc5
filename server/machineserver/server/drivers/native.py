"""Small C helpers the drivers compile on first use (the QEMU TCG plugin, Unicorn's block
counter): found compiler, per-user cache keyed by source + compiler + flags, written to a
temp file and renamed so concurrent servers never load half a library."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CFLAGS = ("-shared", "-fPIC", "-O2")
COMPILE_TIMEOUT = 60.0


def cache_dirs() -> list[Path]:
    """Where built libraries go: the per-user cache, else a per-user temp directory."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(base) / "machineserver", Path(tempfile.gettempdir()) / f"machineserver-{os.getuid()}"]


def compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def build(source: Path, cc: str, dest_dir: Path) -> Path:
    """Compile ``source`` into a shared object in ``dest_dir`` (cached by content).
    RuntimeError when it does not compile; OSError when dest_dir is not writable."""
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise RuntimeError(f"source missing: {exc}") from None
    key = hashlib.sha256(text + b"\0" + cc.encode() + b"\0" + " ".join(CFLAGS).encode())
    dest = dest_dir / f"{source.stem}-{key.hexdigest()[:20]}.so"
    if dest.exists():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=dest_dir)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([cc, *CFLAGS, "-o", tmp, str(source)], capture_output=True,
                                  text=True, timeout=COMPILE_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"cannot run {cc}: {exc}") from None
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()][-3:]
            raise RuntimeError(f"{cc} failed to build {source.name}: " + " | ".join(lines))
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest


def build_cached(source: Path, what: str) -> tuple[Path | None, str]:
    """(the built library, "") or (None, why not), trying each cache directory."""
    cc = compiler()
    if cc is None:
        return None, f"no host C compiler (gcc) to build {what}"
    errors = []
    for d in cache_dirs():
        try:
            return build(source, cc, d), ""
        except OSError as exc:  # not writable: try the next one
            errors.append(f"{d}: {exc}")
        except RuntimeError as exc:
            return None, str(exc)
    return None, f"cannot write {what}: " + "; ".join(errors)
