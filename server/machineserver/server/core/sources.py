"""Source bundles: the source files a client sends for coverage HTML (with a program, or
with an export request), and the only ways the server finds source text.

The server never reads a path that a client or a program's debug info names, except
inside a configured source root (:func:`read_under_roots`). A bundle is a tar, tar.gz or
zip archive read in memory, never extracted to disk, with bounds on everything a crafted
archive could inflate (:class:`BundleLimits`): members, total and per-file bytes, the
compression ratio. Member names are normalised (relative, no ``..``, no drive letters).

Matching a path from the debug info to a member: the exact relative path first (an
absolute one with its leading "/" dropped), then the member whose path is the longest
suffix of it, by whole components (``/home/ci/fw/src/main.c`` finds ``src/main.c`` or
``main.c``); two members matching equally well match neither (no wrong source is shown).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from machineserver.server.core.errors import InvalidArgument


@dataclass(frozen=True)
class BundleLimits:
    max_members: int = 2000  # archive entries of any kind
    max_total_bytes: int = 64 << 20  # all files, uncompressed
    max_file_bytes: int = 8 << 20  # one file, uncompressed
    max_ratio: int = 100  # uncompressed / compressed, above ratio_floor bytes
    ratio_floor: int = 1 << 20  # archives smaller than this once inflated are not ratio-checked
    max_name_chars: int = 512


DEFAULT_LIMITS = BundleLimits()
_TAR_OVERHEAD = 1024  # a tar member's header and padding, at most (pax headers aside)


@dataclass
class SourceBundle:
    """Source files by normalised relative path."""

    files: dict[str, bytes] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.files)

    def __bool__(self) -> bool:
        return bool(self.files)

    def match(self, path: str) -> str | None:
        """The member holding the file that the debug info calls ``path`` (see the module
        docstring); None when none does, or two do equally well."""
        parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts:
            return None
        if ".." not in parts:
            exact = "/".join(parts)
            if exact in self.files:
                return exact
        best: list[str] = []
        best_len = 0
        for name in self.files:
            mparts = name.split("/")
            if mparts[-1] != parts[-1] or len(mparts) > len(parts):
                continue
            if parts[len(parts) - len(mparts):] != mparts:
                continue
            if len(mparts) > best_len:
                best, best_len = [name], len(mparts)
            elif len(mparts) == best_len:
                best.append(name)
        return best[0] if len(best) == 1 else None

    def text_for(self, path: str) -> bytes | None:
        name = self.match(path)
        return None if name is None else self.files[name]


def _bad(field_name: str, why: str) -> InvalidArgument:
    return InvalidArgument(field_name, f"source bundle: {why}")


def normalise_name(name: str, limits: BundleLimits = DEFAULT_LIMITS, field_name: str = "sources") -> str | None:
    """A member's name as a relative path; None for the archive's own folder entries
    ("./"); InvalidArgument for an absolute path, ``..``, a drive letter or a NUL."""
    if len(name) > limits.max_name_chars:
        raise _bad(field_name, f"a member name is longer than {limits.max_name_chars} characters")
    if "\x00" in name:
        raise _bad(field_name, f"member name {name!r} holds a NUL")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) >= 2 and unified[1] == ":"):
        raise _bad(field_name, f"member {name!r} has an absolute path; give paths relative to the "
                   "bundle (absolute ones without their leading '/')")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _bad(field_name, f"member {name!r} has '..' in its path")
    return "/".join(parts) or None


class _Budget:
    def __init__(self, limits: BundleLimits, field_name: str, packed_size: int) -> None:
        self.limits = limits
        self.field_name = field_name
        self.packed_size = max(packed_size, 1)
        self.members = 0
        self.total = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise _bad(self.field_name, f"more than {self.limits.max_members} members")

    def file(self, name: str, size: int) -> None:
        lim = self.limits
        if size > lim.max_file_bytes:
            raise _bad(self.field_name, f"member {name!r} is {size} bytes, more than the limit of "
                       f"{lim.max_file_bytes} per file")
        self.total += size
        if self.total > lim.max_total_bytes:
            raise _bad(self.field_name, f"more than {lim.max_total_bytes} bytes of files in all")
        self.ratio(self.total)

    def ratio(self, inflated: int) -> None:
        lim = self.limits
        if inflated > lim.ratio_floor and inflated > lim.max_ratio * self.packed_size:
            raise _bad(self.field_name, f"it inflates more than {lim.max_ratio} times its size "
                       "(a compression bomb?)")


def read_bundle(data: bytes, limits: BundleLimits = DEFAULT_LIMITS, field_name: str = "sources") -> SourceBundle:
    """The files of a tar, tar.gz or zip archive, bounded by ``limits``; InvalidArgument
    naming ``field_name`` and why for anything else."""
    if not data:
        return SourceBundle()
    budget = _Budget(limits, field_name, len(data))
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _read_zip(data, budget)
    if data.startswith(b"\x1f\x8b"):
        data = _gunzip(data, budget)
    return _read_tar(data, budget)


def _gunzip(data: bytes, budget: _Budget) -> bytes:
    lim = budget.limits
    cap = lim.max_total_bytes + lim.max_members * _TAR_OVERHEAD + 10240
    out: list[bytes] = []
    size = 0
    rest = data
    while rest:
        inflater = zlib.decompressobj(wbits=31)
        try:
            chunk = inflater.decompress(rest, cap - size + 1)
        except zlib.error as exc:
            raise _bad(budget.field_name, f"bad gzip data ({exc})") from None
        size += len(chunk)
        budget.ratio(size)
        if size > cap:
            raise _bad(budget.field_name, f"it inflates to more than {cap} bytes")
        if not inflater.eof:
            raise _bad(budget.field_name, "truncated gzip data")
        out.append(chunk)
        rest = inflater.unused_data
        if rest.strip(b"\x00") == b"":  # padding after the last member
            break
    return b"".join(out)


def _read_tar(data: bytes, budget: _Budget) -> SourceBundle:
    bundle = SourceBundle()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                budget.member()
                name = normalise_name(info.name, budget.limits, budget.field_name)
                if name is None or not info.isreg():
                    continue  # folders, links and devices are never followed or made
                budget.file(name, info.size)
                member = tar.extractfile(info)
                if member is None:
                    continue
                content = member.read(info.size)
                if len(content) != info.size:
                    raise _bad(budget.field_name, f"member {name!r} is truncated")
                bundle.files[name] = content
    except tarfile.TarError as exc:
        raise _bad(budget.field_name, f"not a tar, tar.gz or zip archive ({exc})") from None
    return bundle


def _read_zip(data: bytes, budget: _Budget) -> SourceBundle:
    bundle = SourceBundle()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > budget.limits.max_members:
                raise _bad(budget.field_name, f"more than {budget.limits.max_members} members")
            for info in infos:
                budget.member()
                name = normalise_name(info.filename, budget.limits, budget.field_name)
                if name is None or info.is_dir():
                    continue
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind and kind != stat.S_IFREG:
                    continue  # a symlink or device stored by zip -y: never followed
                if info.flag_bits & 0x1:
                    raise _bad(budget.field_name, f"member {name!r} is encrypted")
                budget.file(name, info.file_size)  # declared; the read below is bounded by it
                with zf.open(info) as member:
                    content = member.read(info.file_size + 1)
                if len(content) != info.file_size:
                    raise _bad(budget.field_name, f"member {name!r} is not the size it declares")
                bundle.files[name] = content
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error,
            ValueError, OSError) as exc:
        raise _bad(budget.field_name, f"not a readable zip archive ({exc})") from None
    return bundle


# --------------------------------------------------------------------------- source roots


def inside(path: str, root: str) -> bool:
    """Whether ``path`` (already resolved) lies inside ``root`` (already resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_under_roots(path: str, roots: Sequence[str], max_bytes: int = DEFAULT_LIMITS.max_file_bytes) -> bytes | None:
    """The file that the debug info calls ``path``, read only when its real path (symlinks
    and ``..`` resolved) lies inside one of the configured ``roots``; a relative ``path``
    is looked up under each root. None otherwise (and for anything not a regular file, or
    larger than ``max_bytes``). Blocks on the disk."""
    if not roots or not path or "\x00" in path:
        return None
    for root in roots:
        if not root:
            continue
        real_root = os.path.realpath(root)
        candidate = path if os.path.isabs(path) else os.path.join(real_root, path)
        real = os.path.realpath(candidate)
        if not inside(real, real_root):
            continue
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
                continue
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(max_bytes + 1)
            if len(data) <= max_bytes:
                return data
        finally:
            os.close(fd)
    return None

