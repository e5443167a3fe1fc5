"""What every servicer shares: the engine and chunked streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol, TypeVar

from machineserver.server.core.engine import Engine
from machineserver.server.core.errors import InvalidArgument

CHUNK_SIZE = 64 * 1024


class Servicer:
    """A service's handlers. Who is calling is the core's business (core/identity.py and
    core/tenancy.py: records get their owner and tenant there, and lookups their tenant
    check), so no handler passes an owner."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine


MetadataT = TypeVar("MetadataT", covariant=True)


class ChunkedUploadRequest(Protocol[MetadataT]):
    """A client-stream message of ``oneof content {metadata; chunk}`` (UploadProgramRequest,
    ImportSnapshotRequest)."""

    @property
    def metadata(self) -> MetadataT: ...
    @property
    def chunk(self) -> bytes: ...
    def WhichOneof(self, oneof_group: Literal["content"]) -> Literal["metadata", "chunk"] | None: ...


async def split_upload(
    requests: AsyncIterator[ChunkedUploadRequest[MetadataT]],
) -> tuple[MetadataT, AsyncIterator[bytes]]:
    """A client stream of ``oneof content {metadata; chunk}``: the metadata (which must come
    first) and an iterator over the chunks after it."""
    meta_field = "metadata"
    iterator = requests.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        raise InvalidArgument(meta_field, "the stream is empty; send the metadata first") from None
    if first.WhichOneof("content") != meta_field:
        raise InvalidArgument(meta_field, "the first message must carry the metadata")

    async def chunks() -> AsyncIterator[bytes]:
        async for req in iterator:
            if req.WhichOneof("content") != "chunk":
                raise InvalidArgument(meta_field, "metadata may only come first")
            yield req.chunk

    return first.metadata, chunks()
