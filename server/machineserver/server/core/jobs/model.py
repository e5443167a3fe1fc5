"""What a run is and what it gives back: plain, picklable data that crosses to wherever the
run executes (the server's worker processes, or a Ray actor on another node), and the one
interface every run engine offers.

A run is self-contained: the board as its YAML text (a worker needs no catalog), the program
and the snapshot by content hash (the engine ships each blob once: a Ray engine puts it in the
object store, the local engine reads the server's blob store), the variant's input and memory
patches, and the criteria that decide the verdict.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


class Verdict(enum.IntEnum):
    """The numbers are the proto's RunVerdict."""

    QUEUED = 1
    RUNNING = 2
    PASSED = 3
    FAILED = 4
    ERRORED = 5
    CANCELLED = 6

    @property
    def final(self) -> bool:
        return self in (Verdict.PASSED, Verdict.FAILED, Verdict.ERRORED, Verdict.CANCELLED)


@dataclass(frozen=True)
class MemoryPatch:
    address: int
    data: bytes


@dataclass(frozen=True)
class Variant:
    name: str = "default"
    console_input: bytes = b""
    memory_patches: tuple[MemoryPatch, ...] = ()
    snapshot_sha256: str = ""  # start from this snapshot blob ("" : boot)
    snapshot_id: str = ""  # its record, for reports


@dataclass(frozen=True)
class Criteria:
    pass_regex: str = ""
    fail_regex: str = ""
    expected_exit_code: int | None = None
    max_instructions: int = 0  # 0: no instruction budget
    max_virtual_ns: int = 0  # 0: no virtual-time budget
    host_timeout_s: float = 60.0  # the host-time guard on top
    coverage: bool = False
    retries: int = 0  # attempts after an ERRORED one


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    memory_bytes: int = 0
    gpus: float = 0.0
    custom: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ProgramRef:
    sha256: str  # the blob's hash: the engine fetches the bytes by it
    format: str  # "elf" | "bin" | "ihex"
    load_address: int = 0
    program_id: str = ""  # "programs/x", for reports


@dataclass(frozen=True)
class RunSpec:
    job_id: str
    index: int  # the run's number in its job (0-based)
    attempt: int  # 1 for the first
    program: ProgramRef
    board: str  # the template's name
    board_yaml: str  # the resolved board, as the catalog holds it
    backend: str
    variant: Variant
    criteria: Criteria
    resources: Resources = field(default_factory=Resources)

    @property
    def key(self) -> str:
        return f"{self.job_id}/{self.index}"


@dataclass(frozen=True)
class RunResult:
    verdict: Verdict  # PASSED, FAILED, ERRORED or CANCELLED
    console_tail: bytes = b""  # the last CONSOLE_TAIL_BYTES
    exit_code: int | None = None
    instructions: int = 0
    virtual_ns: int = 0
    host_s: float = 0.0
    node: str = "local"
    failure_reason: str = ""
    # the run's coverage as executed-instruction addresses with their counts (empty unless
    # criteria.coverage): the server maps them to lines with the program's debug info
    coverage: Mapping[int, int] = field(default_factory=dict)
    retryable: bool = False  # ERRORED by the engine or node (not by the program): retry it


MAX_REGEX_BYTES = 1024  # a job's pass or fail regex
CONSOLE_TAIL_BYTES = 4096


class BlobSource(Protocol):
    """Where an engine reads program and snapshot bytes by hash."""

    def read(self, sha256: str) -> bytes: ...


class RunEngine(Protocol):
    """Executes runs. ``execute`` yields each run with its result as it ends (in any order), runs
    at most as many at once as the engine has room for, and stops the runs still going when
    the iteration is closed (cancel reaches running work). A run whose worker or node dies
    comes back ERRORED with ``retryable`` set: the caller decides whether to retry."""

    name: str  # "local" | "ray"

    def execute(self, specs: list[RunSpec], blobs: BlobSource,
                on_start: Callable[[RunSpec, str], None] | None = None
                ) -> AsyncIterator[tuple[RunSpec, RunResult]]: ...

    async def cancel(self, job_id: str) -> None: ...

    def nodes(self) -> list[Mapping[str, object]]:
        """The nodes runs go to (ClusterNode's fields: node_id, address, alive, resources,
        available, gpus, is_head)."""
        ...

    async def aclose(self) -> None: ...
