"""Source bundles for coverage HTML: the server never reads source files from its own
disk, so the client sends them (with a program upload, or with a coverage export) as a
tar.gz, tar or zip archive of the files under the paths the program's debug info names
(relative paths, or absolute ones without their leading "/")."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

# what a directory bundle takes: the files a debug line table names
SOURCE_SUFFIXES = frozenset({
    ".c", ".h", ".cc", ".cpp", ".cxx", ".c++", ".hh", ".hpp", ".hxx", ".inl", ".ipp",
    ".s", ".S", ".sx", ".asm", ".inc", ".def", ".rs", ".zig", ".ino", ".m", ".mm", ".f", ".f90",
})


def source_bundle(source: str | os.PathLike[str] | bytes) -> bytes:
    """A bundle from ``source``: bytes as they are (an archive); a file's bytes (an
    archive: .tar.gz, .tar, .zip); a directory as a tar.gz of its source files (by
    suffix, see SOURCE_SUFFIXES; hidden folders and symlinks left out) under their paths
    relative to it."""
    if isinstance(source, bytes):
        return source
    path = Path(source)
    if not path.is_dir():
        return path.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                full = Path(root) / name
                if full.suffix in SOURCE_SUFFIXES and full.is_file() and not full.is_symlink():
                    tar.add(full, arcname=full.relative_to(path).as_posix(), recursive=False)
    return buf.getvalue()
