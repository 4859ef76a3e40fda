"""The one shutdown ladder for VMM processes (qemu, the libkrun helper).

Modelled on qemu's ``python/qemu/machine``: each rung is bounded, and the report
says which one stopped the process, so a forced stop is never silent.

1. ``graceful``: the guest powers itself off (the caller already asked, e.g. the
   agent's ``shutdown``); wait up to ``graceful_s``;
2. ``terminate``: a VMM-level request (QMP ``quit``) or SIGTERM; wait up to ``term_s``;
3. ``kill``: SIGKILL (to the process group when the VMM leads one); wait up to ``kill_s``.

:func:`stop` walks it for a VMM that is our child; :func:`stop_process` for one that is not (a
preserved guest, what a dead run left), named by pid and start time so a reused pid is never hit.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.processes import same_process, send_signal
from agentbox_runtime.retry import WaitTimeout, retry


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


def _ladder(wait: Callable[[float], bool], send: Callable[[int], None], returncode: Callable[[], int | None], *,
            graceful_s: float, terminate: Callable[[], None] | None, term_s: float, kill_s: float,
            what: str) -> StopReport:
    """The rungs, for any process: ``wait(t)`` says whether it ended within ``t`` s, ``send(sig)``
    signals it (its group when it leads one)."""
    if wait(0.0):
        return StopReport("exited", returncode())
    if graceful_s > 0 and wait(graceful_s):
        return StopReport("graceful", returncode())
    try:
        if terminate is None:
            raise OSError("no VMM-level terminate")
        terminate()
    except OSError:
        send(signal.SIGTERM)
    if wait(term_s):
        return StopReport("terminate", returncode())
    send(signal.SIGKILL)
    if wait(kill_s):
        return StopReport("kill", returncode())
    raise AgentboxError(f"{what} survived SIGKILL for {kill_s:.0f}s")


def stop(proc: subprocess.Popen[bytes], *, graceful_s: float = 10.0, terminate: Callable[[], None] | None = None,
         term_s: float = 10.0, kill_s: float = 30.0) -> StopReport:
    """Stop ``proc`` down the ladder (see the module docstring). ``terminate`` replaces SIGTERM on
    rung 2 (and falls back to it when it raises). Raises AgentboxError if even SIGKILL fails."""
    return _ladder(lambda t: proc.poll() is not None or (t > 0 and _waited(proc, t)),
                   lambda sig: _signal(proc, sig), lambda: proc.returncode, graceful_s=graceful_s,
                   terminate=terminate, term_s=term_s, kill_s=kill_s, what=f"VMM process {proc.pid}")


def stop_process(pid: int, start: object, *, own_group: bool = False, graceful_s: float = 0.0,
                 term_s: float = 10.0, kill_s: float = 30.0) -> StopReport:
    """Stop a VMM that is not our child, named by ``pid`` and its recorded ``start`` time
    (:func:`agentbox_runtime.processes.start_time`), down the same ladder; ``own_group``: it leads
    its process group, which is signalled whole. The return code is unknown (None): only its
    parent could read it. Raises AgentboxError if even SIGKILL fails."""

    def gone(timeout: float) -> bool:
        try:
            retry(lambda _last: not same_process(pid, start), timeout=timeout, interval=0.05)
            return True
        except WaitTimeout:
            return False

    def send(sig: int) -> None:
        send_signal(pid, start, sig, group=own_group)  # False: it is gone already, which gone() sees

    return _ladder(gone, send, lambda: None, graceful_s=graceful_s, terminate=None, term_s=term_s, kill_s=kill_s,
                   what=f"VMM process {pid}")
