"""The one shutdown ladder, on real processes: each rung bounded, the report says which one worked."""

from __future__ import annotations

import subprocess
import time

from agentbox_runtime.processes import same_process, start_time
from agentbox_runtime.vmm.shutdown import stop, stop_process


def spawn(script: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    time.sleep(0.2)  # let the shell install its traps
    return proc


def test_an_exited_process_is_reported_as_exited() -> None:
    proc = spawn("exit 3")
    proc.wait(10)
    report = stop(proc)
    assert (report.rung, report.returncode, report.forced) == ("exited", 3, False)


def test_a_process_that_powers_off_on_its_own_is_graceful() -> None:
    report = stop(spawn("sleep 0.5; exit 0"), graceful_s=10)
    assert (report.rung, report.forced) == ("graceful", False)


def test_a_running_process_is_terminated_after_the_graceful_wait() -> None:
    report = stop(spawn("exec sleep 60"), graceful_s=0.3, term_s=10)
    assert (report.rung, report.forced) == ("terminate", True) and report.returncode == -15


def test_a_vmm_level_terminate_is_tried_first_and_sigterm_backs_it_up() -> None:
    calls: list[str] = []

    def refuses() -> None:
        calls.append("quit")
        raise OSError("QMP socket gone")

    report = stop(spawn("exec sleep 60"), graceful_s=0, terminate=refuses, term_s=10)
    assert calls == ["quit"] and report.rung == "terminate" and report.returncode == -15


def test_a_process_ignoring_sigterm_is_killed() -> None:
    report = stop(spawn("trap '' TERM; while :; do sleep 0.1; done"), graceful_s=0, term_s=0.5)
    assert (report.rung, report.forced, report.returncode) == ("kill", True, -9)
    assert "stopped by kill" in report.describe("VMM")


def orphan(script: str) -> tuple[int, str]:
    """A process that is not our child (its shell parent exits at once), with its start time."""
    out = subprocess.run(["sh", "-c", f"setsid sh -c '{script}' >/dev/null 2>&1 & echo $!"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    pid = int(out.strip())
    time.sleep(0.3)  # let it install its traps
    start = start_time(pid)
    assert start is not None
    return pid, start


def test_a_process_that_is_not_our_child_goes_down_the_same_ladder() -> None:
    pid, start = orphan("exec sleep 60")
    report = stop_process(pid, start, term_s=10)
    assert (report.rung, report.returncode) == ("terminate", None)
    assert not same_process(pid, start)


def test_a_foreign_process_ignoring_sigterm_is_killed() -> None:
    pid, start = orphan("trap \"\" TERM; while :; do sleep 0.1; done")
    report = stop_process(pid, start, term_s=0.5, kill_s=10)
    assert report.rung == "kill" and report.forced
    assert not same_process(pid, start)


def test_a_reused_pid_is_never_signalled() -> None:
    """The recorded start time no longer matches: the process there now is someone else's."""
    pid, start = orphan("exec sleep 60")
    try:
        report = stop_process(pid, str(int(start) - 1), term_s=1, kill_s=1)
        assert report.rung == "exited"
        assert same_process(pid, start), "a process that merely reuses the pid was signalled"
    finally:
        stop_process(pid, start, term_s=5)
