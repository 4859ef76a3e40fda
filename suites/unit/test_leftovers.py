"""A machine's own teardown check (issue 25): what its boot held on the host must be gone after its
stop, or the stop fails in one line naming each leak; what --preserve-debug kept is not a leak."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentbox_harness.leftovers import Holdings, present
from agentbox_harness.machine import Machine, MachineError, Preserved, Result
from agentbox_runtime.processes import start_time


@dataclass
class LeakyDouble(Machine):
    """Its boot is a host process (and whatever else ``held`` names); ``_stop`` ends the process
    only when ``stops`` says so."""

    held: Holdings = field(default_factory=Holdings)
    proc: subprocess.Popen[bytes] | None = None
    stops: bool = True

    def _start(self) -> None:
        self.proc = subprocess.Popen(["sleep", "60"])

    def holdings(self) -> Holdings:
        assert self.proc is not None
        own = (("VMM process", self.proc.pid, start_time(self.proc.pid)),)
        return Holdings(processes=own + self.held.processes, mounts=self.held.mounts, paths=self.held.paths)

    def _stop(self, timeout: float) -> None:
        if self.stops and self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def _execute(self, argv: list[str], *, user: str | None, env: dict[str, str] | None, cwd: str | None,
                 timeout: float, stdin: bytes | None) -> Result:
        raise AssertionError("not used")


def test_a_clean_stop_passes_the_check(tmp_path: Path) -> None:
    m = LeakyDouble(name="clean", held=Holdings(paths=(str(tmp_path / "gone"),)))
    m.start()
    m.shutdown(timeout=1)


def test_a_process_left_running_fails_the_stop_in_one_line() -> None:
    m = LeakyDouble(name="leaky", stops=False, timeout_scale=0.1)
    m.start()
    assert m.proc is not None
    try:
        with pytest.raises(MachineError) as failure:
            m.shutdown(timeout=1)
        assert str(failure.value) == f"leaky: left behind after its stop: VMM process (pid {m.proc.pid})"
    finally:
        m.proc.kill()
        m.proc.wait()


def test_a_path_and_a_mount_left_are_named_and_what_was_kept_is_not(tmp_path: Path) -> None:
    left, kept = tmp_path / "sockets", tmp_path / "task"
    left.mkdir()
    (kept / "rootfs").mkdir(parents=True)
    held = Holdings(paths=(str(left), str(kept)))
    assert present(held, keep=[str(kept)]) == [f"path {left}"]
    if os.geteuid() != 0:
        return
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(left)], check=True)
    try:
        found = present(Holdings(mounts=(str(tmp_path),)), keep=[])
        assert found == [f"mount {left}"]
    finally:
        subprocess.run(["umount", str(left)], check=True)
    assert present(Holdings(mounts=(str(tmp_path),)), keep=[]) == []


def test_preserved_paths_are_not_leaks(tmp_path: Path) -> None:
    task = tmp_path / "task"
    task.mkdir()
    m = LeakyDouble(name="kept", held=Holdings(paths=(str(task),)))
    m.start()
    m.preserved.append(Preserved(["kept"], (str(task),)))
    m.shutdown(timeout=1)
