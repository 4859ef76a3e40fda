"""The one stop path on a real guest of every VM backend (issue 25).

A stop is the guest's own poweroff (the agent syncs and exits, PID 1 powers the VM off) and the
report says so; it happens once (the runtime task and the VMM handle answer a second stop with the
first report, never a second ladder); a wedged guest (its VMM frozen with SIGSTOP) is forced down
within the plan made from the verb's timeout, which the report's steps show; and the machine's
teardown finds nothing of its boot left (processes, mounts, sockets, containers), or fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from agentbox_harness.machine import Machine
from agentbox_runtime.backend_caps import BACKEND_NAMES, caps
from agentbox_runtime.vmm.shutdown import Plan

pytestmark = [pytest.mark.vm, pytest.mark.slow]

VM_NAMES = [name for name in BACKEND_NAMES if caps(name).vm]
WEDGED_TIMEOUT_S = 10.0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def guest_root_process(m: Machine) -> int:
    """The host process that is the guest: the VMM (qemu, the libkrun helper), or for krun-podman
    the container's process (the VM under crun with libkrun, the stand-in runtime's shim here)."""
    if m.vmm_pid is not None:
        return m.vmm_pid
    out = subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", getattr(m, "container", "")],
                         capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip())


@pytest.mark.parametrize("agentbox_backend", VM_NAMES, indirect=True)
def test_a_stop_is_the_guests_own_poweroff_and_happens_once(agentbox_backend: str, machine_factory) -> None:  # type: ignore[no-untyped-def]
    m = machine_factory("stop")
    task = getattr(m, "task", None)
    m.shutdown(timeout=120)
    report = m.stop_reports[-1]
    assert report.rung == "poweroff", report.describe("VMM")
    assert [(s.rung, s.note) for s in report.steps] == [("poweroff", "asked")], report.describe("VMM")
    m.shutdown(timeout=120)
    assert m.stop_reports == [report], "a second shutdown stopped again"
    if task is not None:  # the runtime's task and VMM handle: the first report, never a second ladder
        assert task.stop(5) is task.stop_report and task.stop_report.rung == "poweroff"
        assert task.handle.shutdown(5).rung == "poweroff"


@pytest.mark.parametrize("agentbox_backend", VM_NAMES, indirect=True)
def test_a_wedged_guest_is_forced_down_within_the_timeout(agentbox_backend: str, machine_factory) -> None:  # type: ignore[no-untyped-def]
    m = machine_factory("wedged")
    frozen = descendants(guest_root_process(m))
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    with pytest.warns(UserWarning, match="did not power off"):
        m.shutdown(timeout=WEDGED_TIMEOUT_S)  # the teardown check inside proves every frozen process gone
    report = m.stop_reports[-1]
    # krun-podman's terminate rung is `podman stop`, whose own SIGKILL ends a frozen VM
    assert report.rung == ("terminate" if agentbox_backend == "krun-podman" else "kill"), report.describe("VMM")
    assert report.steps[0].rung == "poweroff" and report.steps[0].note.startswith("request failed")
    plan = Plan.of(m.scaled(WEDGED_TIMEOUT_S), poweroff=True)
    planned = {"poweroff": plan.poweroff_s, "terminate": plan.term_s, "kill": plan.kill_s}
    for step in report.steps:
        assert step.budget_s == pytest.approx(planned[step.rung], abs=1e-2), report.describe("VMM")
        assert step.elapsed_s <= step.budget_s + 5, report.describe("VMM")  # a request never outlives its rung
    assert report.budget_s <= plan.total_s + 1e-2
