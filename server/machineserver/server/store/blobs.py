"""A content-addressed blob directory: ``blobs/sha256/ab/abcdef...``.

Writes go to a temporary file in the same directory, are flushed to disk and renamed into
place, so a reader never sees half a blob and a crash leaves at worst a stray temp file
(removed at the next start). A blob already stored is not written again (:meth:`BlobStore.put`
hashes first). Every method blocks on the disk: async callers run them off the event loop.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class BlobTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"blob larger than {limit} bytes")
        self.limit = limit


class BlobWriter:
    """Receives a blob in chunks; :meth:`commit` hashes it into place."""

    def __init__(self, store: BlobStore, limit: int) -> None:
        self._store = store
        self._limit = limit
        fd, name = tempfile.mkstemp(prefix=".incoming-", dir=store.root)
        self._file = os.fdopen(fd, "wb")
        self._path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._limit and self.size > self._limit:
            self.abort()
            raise BlobTooLarge(self._limit)
        self._hash.update(chunk)
        self._file.write(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> str:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = self._hash.hexdigest()
        target = self._store.path_for(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path, target)
        return digest

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._path.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stray in self.root.glob(".incoming-*"):
            stray.unlink(missing_ok=True)

    def path_for(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest

    def writer(self, limit: int = 0) -> BlobWriter:
        return BlobWriter(self, limit)

    def put(self, data: bytes) -> str:
        """Store ``data``; its digest. Content already stored is only hashed."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path_for(digest)
        if target.is_file():
            return digest
        fd, name = tempfile.mkstemp(prefix=".incoming-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(name, target)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return digest

    def get(self, digest: str) -> bytes:
        return self.path_for(digest).read_bytes()

    def exists(self, digest: str) -> bool:
        return self.path_for(digest).exists()

    def size(self, digest: str) -> int:
        return self.path_for(digest).stat().st_size

    def iter_chunks(self, digest: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        with self.path_for(digest).open("rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def delete(self, digest: str) -> None:
        self.path_for(digest).unlink(missing_ok=True)
