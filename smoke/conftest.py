"""The operator checklists as executable suites (``./harness smoke`` runs them).

Every test uses the public fixtures only. At the end, a summary table lists
the backend, the accelerator and the outcome of every checklist item.
"""

from __future__ import annotations

import time

import pytest

from agentbox_harness.machine import BOOTS

RESULTS: list[tuple[str, str, float]] = []
SETUP: dict[str, float] = {}
STARTED = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "setup":
        SETUP[report.nodeid] = report.duration  # boots happen here: the summary shows them
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        RESULTS.append((report.nodeid, report.outcome, report.duration))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    smoke = [r for r in RESULTS if r[0].startswith("smoke/")]
    if not smoke:
        return
    from agentbox_harness.session import harness

    h = harness(config)
    tr = terminalreporter
    tr.section("agentbox smoke summary")
    tr.write_line(f"backend: {h.backend}   accelerator: {h.accelerator}   timeout scale: {h.timeout_scale}")
    width = max(len(n) for n, _, _ in smoke)
    tr.write_line(f"{'item':<{width}}  {'outcome':<8} {'setup':>7} {'call':>7}")
    for nodeid, outcome, duration in smoke:
        tr.write_line(f"{nodeid:<{width}}  {outcome:<8} {SETUP.get(nodeid, 0.0):6.1f}s {duration:6.1f}s")
    counts = {o: sum(1 for _, oo, _ in smoke if oo == o) for o in ("passed", "skipped", "failed")}
    boots = "" if hasattr(config, "workerinput") or config.getoption("numprocesses", None) else \
        f", {BOOTS['started']} guest boots"
    tr.write_line(f"total: {counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed "
                  f"in {time.monotonic() - STARTED:.0f}s{boots}")
