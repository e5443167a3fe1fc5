"""A job's results as JUnit XML: one testsuite per job, one testcase per run (classname
``program/board/backend``, name the variant), ``failure`` for FAILED, ``error`` for
ERRORED, ``skipped`` for CANCELLED or not yet run, the reason and the console tail in
them; properties: node, instructions, attempts."""

from __future__ import annotations

import datetime
import re
import xml.etree.ElementTree as ET

from machineserver.server.core.jobs.model import Verdict
from machineserver.server.core.jobs.records import JobRecord, RunRecord, counts_of

# characters XML 1.0 cannot hold (a console may print anything)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _text(data: bytes | str) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return _NOT_XML.sub("\ufffd", text)


def render(job: JobRecord, runs: list[RunRecord]) -> bytes:
    counts = counts_of(runs)
    suite = ET.Element("testsuite", {
        "name": job.display_name or job.name,
        "tests": str(counts["total"]),
        "failures": str(counts["failed"]),
        "errors": str(counts["errored"]),
        "skipped": str(counts["cancelled"] + counts["queued"] + counts["running"]),
        "time": f"{sum(r.host_s for r in runs):.3f}",
        "timestamp": datetime.datetime.fromtimestamp(job.create_time, datetime.UTC).isoformat(timespec="seconds"),
    })
    props = ET.SubElement(suite, "properties")
    for key, value in (("job", job.name), ("engine", job.engine), ("coverage_report", job.coverage_report)):
        ET.SubElement(props, "property", {"name": key, "value": value})
    root = ET.Element("testsuites", {"name": job.name})
    root.append(suite)
    for run in runs:
        case = ET.SubElement(suite, "testcase", {
            "classname": f"{run.program}/{run.board}/{run.backend}",
            "name": run.variant,
            "time": f"{run.host_s:.3f}",
        })
        cprops = ET.SubElement(case, "properties")
        for key, value in (("node", run.node), ("instructions", str(run.instructions)),
                           ("attempts", str(run.attempts)), ("run", run.name),
                           ("exit_code", "" if run.exit_code is None else str(run.exit_code))):
            ET.SubElement(cprops, "property", {"name": key, "value": value})
        verdict = Verdict(run.verdict)
        tail = _text(run.console)
        if verdict is Verdict.FAILED:
            ET.SubElement(case, "failure", {"message": _text(run.failure_reason), "type": "FAILED"}).text = tail
        elif verdict is Verdict.ERRORED:
            ET.SubElement(case, "error", {"message": _text(run.failure_reason), "type": "ERRORED"}).text = tail
        elif verdict is not Verdict.PASSED:
            ET.SubElement(case, "skipped", {"message": _text(run.failure_reason) or verdict.name.lower()})
        if tail:
            ET.SubElement(case, "system-out").text = tail
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))
