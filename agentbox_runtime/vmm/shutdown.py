"""The one shutdown ladder for VMM processes (qemu, the libkrun helper).

Modelled on qemu's ``python/qemu/machine``: each rung is bounded, and the report
says which one stopped the process, so a forced stop is never silent.

1. ``graceful``: the guest powers itself off (the caller already asked, e.g. the
   agent's ``shutdown``); wait up to ``graceful_s``;
2. ``terminate``: a VMM-level request (QMP ``quit``) or SIGTERM; wait up to ``term_s``;
3. ``kill``: SIGKILL (to the process group when the VMM leads one); wait up to ``kill_s``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from agentbox_runtime.errors import AgentboxError


@dataclass(frozen=True)
class StopReport:
    """How a VMM stopped: ``rung`` is ``exited``, ``graceful``, ``terminate`` or ``kill``."""

    rung: str
    returncode: int | None

    @property
    def forced(self) -> bool:
        """True when the VMM had to be terminated or killed (an abnormal shutdown)."""
        return self.rung in ("terminate", "kill")

    def describe(self, what: str) -> str:
        return f"{what} stopped by {self.rung} (exit {self.returncode})"


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:  # an interactive VMM shares the terminal's process group
            os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def _waited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(max(0.0, timeout))
        return True
    except subprocess.TimeoutExpired:
        return False


def stop(proc: subprocess.Popen[bytes], *, graceful_s: float = 10.0, terminate: Callable[[], None] | None = None,
         term_s: float = 10.0, kill_s: float = 30.0) -> StopReport:
    """Stop ``proc`` down the ladder (see the module docstring). ``terminate`` replaces SIGTERM on
    rung 2 (and falls back to it when it raises). Raises AgentboxError if even SIGKILL fails."""
    if proc.poll() is not None:
        return StopReport("exited", proc.returncode)
    if graceful_s > 0 and _waited(proc, graceful_s):
        return StopReport("graceful", proc.returncode)
    try:
        if terminate is None:
            raise OSError("no VMM-level terminate")
        terminate()
    except OSError:
        _signal(proc, signal.SIGTERM)
    if _waited(proc, term_s):
        return StopReport("terminate", proc.returncode)
    _signal(proc, signal.SIGKILL)
    if _waited(proc, kill_s):
        return StopReport("kill", proc.returncode)
    raise AgentboxError(f"VMM process {proc.pid} survived SIGKILL for {kill_s:.0f}s")
