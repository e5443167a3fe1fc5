"""JobService: regression jobs (core/jobs/manager.py), their runs, progress, JUnit XML."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf import duration_pb2
from grpc import aio

from machineserver.server.api import convert
from machineserver.server.api.base import CHUNK_SIZE, Servicer
from machineserver.server.core.errors import InvalidArgument
from machineserver.server.core.jobs.matrix import JobRequest, VariantRequest
from machineserver.server.core.jobs.model import Criteria, MemoryPatch, Resources
from machineserver.server.core.jobs.records import JobRecord, RunRecord
from machineserver.v1 import job_pb2 as pb
from machineserver.v1 import job_pb2_grpc as pb_grpc

MAX_DURATION_S = 10 * 365 * 86400


def _nanos(d: duration_pb2.Duration, where: str) -> int:
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 1_000_000_000 or d.seconds > MAX_DURATION_S:
        raise InvalidArgument(where, "must be a non-negative duration")
    return int(d.seconds) * 1_000_000_000 + int(d.nanos)


def _duration_of(ns: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(ns))
    return d


def job_request(req: pb.CreateJobRequest) -> JobRequest:
    c = req.criteria
    host_given = c.HasField("host_timeout")
    criteria = Criteria(
        pass_regex=c.pass_regex, fail_regex=c.fail_regex,
        expected_exit_code=c.expected_exit_code if c.HasField("expected_exit_code") else None,
        max_instructions=c.max_instructions,
        max_virtual_ns=_nanos(c.max_virtual_time, "criteria.max_virtual_time"),
        host_timeout_s=_nanos(c.host_timeout, "criteria.host_timeout") / 1e9 if host_given else 0.0,
        coverage=c.coverage, retries=c.retries)
    if host_given and criteria.host_timeout_s <= 0:
        raise InvalidArgument("criteria.host_timeout", "must be positive when given")
    r = req.resources
    m = req.matrix
    return JobRequest(
        programs=tuple(m.programs), boards=tuple(m.boards), backends=tuple(m.backends),
        variants=tuple(VariantRequest(v.name, v.console_input,
                                      tuple(MemoryPatch(p.address, p.data) for p in v.memory_patches), v.snapshot)
                       for v in m.variants),
        criteria=criteria, host_timeout_given=host_given,
        resources=Resources(r.cpus, r.memory_bytes, r.gpus, dict(r.custom)),
        display_name=req.display_name, labels=dict(req.labels))


def _counts_pb(counts: dict[str, int]) -> pb.JobCounts:
    return pb.JobCounts(**{k: counts.get(k, 0) for k in ("total", "queued", "running", "passed", "failed",
                                                         "errored", "cancelled", "retries")})


def job_pb(job: JobRecord, counts: dict[str, int]) -> pb.Job:
    c = job.criteria
    criteria = pb.RunCriteria(pass_regex=c.get("pass_regex", ""), fail_regex=c.get("fail_regex", ""),
                              max_instructions=c.get("max_instructions", 0),
                              max_virtual_time=_duration_of(c.get("max_virtual_ns", 0)),
                              host_timeout=_duration_of(int(c.get("host_timeout_s", 0) * 1e9)),
                              coverage=c.get("coverage", False), retries=c.get("retries", 0))
    if c.get("expected_exit_code") is not None:
        criteria.expected_exit_code = c["expected_exit_code"]
    r = job.resources
    m = job.matrix
    out = pb.Job(
        name=job.name, display_name=job.display_name,
        matrix=pb.JobMatrix(programs=m.get("programs", []), boards=m.get("boards", []),
                            backends=m.get("backends", []),
                            variants=[pb.JobVariant(name=name, console_input=v.console_input,
                                                    snapshot=f"snapshots/{v.snapshot_id}" if v.snapshot_id else "",
                                                    memory_patches=[pb.MemoryPatch(address=p.address, data=p.data)
                                                                    for p in v.memory_patches])
                                      for name, v in ((n, job.variant_obj(n)) for n in job.variants)]),
        criteria=criteria,
        resources=pb.RunResources(cpus=r.get("cpus", 0.0), memory_bytes=r.get("memory_bytes", 0),
                                  gpus=r.get("gpus", 0.0), custom=r.get("custom", {})),
        state=pb.JobState.ValueType(job.state), counts=_counts_pb(counts),
        coverage_report=f"coverageReports/{job.coverage_report}" if job.coverage_report else "",
        labels=job.labels, engine=job.engine, create_time=convert.timestamp(job.create_time),
        owner=job.owner, tenant=job.tenant)
    if job.end_time is not None:
        out.end_time.CopyFrom(convert.timestamp(job.end_time))
    return out


def run_pb(run: RunRecord) -> pb.JobRun:
    out = pb.JobRun(
        name=run.name, program=f"programs/{run.program}", board=run.board, backend=run.backend,
        variant=run.variant, verdict=pb.RunVerdict.ValueType(run.verdict), console_tail=run.console, instructions=run.instructions,
        virtual_time=_duration_of(run.virtual_ns), host_time=_duration_of(int(run.host_s * 1e9)), node=run.node,
        failure_reason=run.failure_reason, attempts=run.attempts,
        coverage_report=f"coverageReports/{run.coverage_report}" if run.coverage_report else "")
    if run.exit_code is not None:
        out.exit_code = run.exit_code
    if run.start_time is not None:
        out.start_time.CopyFrom(convert.timestamp(run.start_time))
    if run.end_time is not None:
        out.end_time.CopyFrom(convert.timestamp(run.end_time))
    return out


class JobServicer(Servicer, pb_grpc.JobServiceServicer):
    def _job(self, job: JobRecord) -> pb.Job:
        return job_pb(job, self.engine.jobs.counts(job))

    async def CreateJob(
        self, request: pb.CreateJobRequest, context: aio.ServicerContext[pb.CreateJobRequest, pb.CreateJobResponse],
    ) -> pb.CreateJobResponse:
        job = self.engine.jobs.create(job_request(request))
        return pb.CreateJobResponse(job=self._job(job))

    async def GetJob(
        self, request: pb.GetJobRequest, context: aio.ServicerContext[pb.GetJobRequest, pb.GetJobResponse],
    ) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=self._job(self.engine.jobs.get(request.name)))

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: aio.ServicerContext[pb.ListJobsRequest, pb.ListJobsResponse],
    ) -> pb.ListJobsResponse:
        page = self.engine.jobs.list(request.page_size, request.page_token, request.filter)
        return pb.ListJobsResponse(jobs=[self._job(j) for j in page.items], next_page_token=page.next_page_token)

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: aio.ServicerContext[pb.CancelJobRequest, pb.CancelJobResponse],
    ) -> pb.CancelJobResponse:
        job = await self.engine.jobs.cancel(request.name)
        return pb.CancelJobResponse(job=self._job(job))

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: aio.ServicerContext[pb.WatchJobRequest, pb.WatchJobResponse],
    ) -> AsyncIterator[pb.WatchJobResponse]:
        async for job, run in self.engine.jobs.watch(request.name):
            msg = pb.WatchJobResponse(job=self._job(job))
            if run is not None:
                msg.run.CopyFrom(run_pb(run))
            yield msg

    async def ListJobRuns(
        self, request: pb.ListJobRunsRequest,
        context: aio.ServicerContext[pb.ListJobRunsRequest, pb.ListJobRunsResponse],
    ) -> pb.ListJobRunsResponse:
        page = self.engine.jobs.list_runs(request.parent, request.page_size, request.page_token, request.filter)
        return pb.ListJobRunsResponse(runs=[run_pb(r) for r in page.items], next_page_token=page.next_page_token)

    async def ExportJobJunit(
        self, request: pb.ExportJobJunitRequest,
        context: aio.ServicerContext[pb.ExportJobJunitRequest, pb.ExportJobJunitResponse],
    ) -> AsyncIterator[pb.ExportJobJunitResponse]:
        data = self.engine.jobs.junit_xml(request.name)
        for off in range(0, max(len(data), 1), CHUNK_SIZE):
            yield pb.ExportJobJunitResponse(chunk=data[off:off + CHUNK_SIZE])
