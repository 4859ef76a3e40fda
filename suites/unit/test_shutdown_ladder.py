"""The one shutdown ladder, on real processes: each rung bounded by a share of one timeout, the report
says which rung worked and what each took; the same entry point for a child and a bare pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from agentbox_runtime.processes import same_process, start_time
from agentbox_runtime.vmm.shutdown import KILL_MIN_S, Plan, stop


def spawn(script: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    time.sleep(0.2)  # let the shell install its traps
    return proc


@pytest.mark.parametrize("timeout", [0.0, 1.0, 10.0, 60.0, 240.0])
@pytest.mark.parametrize("poweroff", [True, False])
def test_the_rungs_share_the_timeout(timeout: float, poweroff: bool) -> None:
    plan = Plan.of(timeout, poweroff=poweroff)
    assert plan.total_s == pytest.approx(max(timeout, KILL_MIN_S))
    assert plan.kill_s >= KILL_MIN_S and plan.term_s >= 0
    assert (plan.poweroff_s > 0) == (poweroff and timeout > KILL_MIN_S + 1)


def test_an_exited_process_is_reported_as_exited() -> None:
    proc = spawn("exit 3")
    proc.wait(10)
    report = stop(proc)
    assert (report.rung, report.returncode, report.forced, report.steps) == ("exited", 3, False, ())


def test_a_guest_that_powers_off_when_asked_ends_on_the_poweroff_rung() -> None:
    proc = spawn("trap 'exit 0' USR1; while :; do sleep 0.05; done")
    report = stop(proc, timeout=10, poweroff=lambda _budget: os.kill(proc.pid, signal.SIGUSR1))
    assert (report.rung, report.forced, report.returncode) == ("poweroff", False, 0)
    assert [(s.rung, s.note) for s in report.steps] == [("poweroff", "asked")]


def test_a_refused_poweroff_goes_on_to_terminate_at_once() -> None:
    def refuses(_budget: float) -> None:
        raise OSError("agent gone")

    report = stop(spawn("exec sleep 60"), timeout=30, poweroff=refuses)
    assert report.rung == "terminate" and report.returncode == -15 and report.forced
    assert report.steps[0].rung == "poweroff" and "agent gone" in report.steps[0].note
    assert report.steps[0].elapsed_s < report.steps[0].budget_s  # no wait for a guest that was not asked


def test_a_vmm_level_terminate_is_tried_first_and_sigterm_backs_it_up() -> None:
    budgets: list[float] = []

    def refuses(budget: float) -> None:
        budgets.append(budget)
        raise OSError("QMP socket gone")

    report = stop(spawn("exec sleep 60"), timeout=10, terminate=refuses)
    assert report.rung == "terminate" and report.returncode == -15
    assert budgets == [report.steps[0].budget_s] and "SIGTERM (request failed: QMP socket gone)" in report.describe("x")


def test_a_wedged_process_is_killed_within_the_timeout_plan() -> None:
    """Ignores SIGTERM and never powers off: every rung is tried, each within its budget."""
    proc = spawn("trap '' TERM; while :; do sleep 0.1; done")
    report = stop(proc, timeout=5, poweroff=lambda _budget: None)
    assert (report.rung, report.forced, report.returncode) == ("kill", True, -9)
    assert [s.rung for s in report.steps] == ["poweroff", "terminate", "kill"]
    plan = Plan.of(5, poweroff=True)
    assert [s.budget_s for s in report.steps] == pytest.approx([plan.poweroff_s, plan.term_s, plan.kill_s], abs=1e-3)
    assert report.budget_s == pytest.approx(5.0, abs=1e-2)
    assert "stopped by kill" in report.describe("VMM")


def test_a_stopped_vmm_is_killed() -> None:
    """A VMM frozen with SIGSTOP (a wedged guest) cannot run its SIGTERM handler; SIGKILL ends it."""
    proc = spawn("trap 'exit 0' TERM; while :; do sleep 0.1; done")
    os.kill(proc.pid, signal.SIGSTOP)
    report = stop(proc, timeout=3)
    assert report.rung == "kill" and report.returncode == -9


def orphan(script: str) -> tuple[int, str]:
    """A process that is not our child (its shell parent exits at once), with its start time."""
    out = subprocess.run(["sh", "-c", f"setsid sh -c '{script}' >/dev/null 2>&1 & echo $!"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    pid = int(out.strip())
    time.sleep(0.3)  # let it install its traps
    start = start_time(pid)
    assert start is not None
    return pid, start


def test_a_bare_pid_goes_down_the_same_ladder() -> None:
    pid, start = orphan("exec sleep 60")
    report = stop(pid, start=start, timeout=10)
    assert (report.rung, report.returncode) == ("terminate", None)
    assert not same_process(pid, start)


def test_a_foreign_process_ignoring_sigterm_is_killed() -> None:
    pid, start = orphan("trap \"\" TERM; while :; do sleep 0.1; done")
    report = stop(pid, start=start, timeout=3)
    assert report.rung == "kill" and report.forced
    assert not same_process(pid, start)


def test_a_reused_pid_is_never_signalled() -> None:
    """The recorded start time no longer matches: the process there now is someone else's."""
    pid, start = orphan("exec sleep 60")
    try:
        report = stop(pid, start=str(int(start) - 1), timeout=2)
        assert report.rung == "exited"
        assert same_process(pid, start), "a process that merely reuses the pid was signalled"
    finally:
        stop(pid, start=start, timeout=5)

