"""The one shutdown ladder for VMM processes (qemu, the libkrun helper, ``podman run`` of a krun task).

Modelled on qemu's ``python/qemu/machine``: each rung is bounded, the bounds come from one
``timeout``, and the report says which rung stopped the process and how long each took, so a
forced stop is never silent.

1. ``poweroff``: the guest's own poweroff (the agent's ``shutdown`` request: it syncs, exits, and
   the guest's PID 1 powers the VM off); the request and the wait share the rung's budget;
2. ``terminate``: a VMM-level request (QMP ``quit``, ``podman stop``) or SIGTERM;
3. ``kill``: SIGKILL (to the process group when the VMM leads one).

:func:`stop` is the one entry point: for a VMM that is our child (a ``Popen``) or one that is not
(a bare pid: a preserved guest, what a dead run left), named by pid and start time so a reused pid
is never hit. ``crash``-style hard kills that must skip the poweroff use ``timeout=0``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from agentbox_runtime.channel import ChannelError
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.processes import same_process, send_signal
from agentbox_runtime.retry import WaitTimeout, retry

KILL_MIN_S = 2.0
"""The kill rung's least wait: the kernel must reap a VMM's memory even when the timeout is tiny."""
TERMINATE_MIN_S = 1.0
"""The terminate rung's least wait when the timeout leaves room for it."""
DEFAULT_TIMEOUT_S = 30.0

Request = Callable[[float], None]
"""A rung's request, given the seconds it may take; raises OSError, AgentboxError or ChannelError when refused."""


@dataclass(frozen=True)
class Plan:
    """How ``timeout`` seconds are split between the rungs (each ends as soon as the process does)."""

    poweroff_s: float
    term_s: float
    kill_s: float

    @classmethod
    def of(cls, timeout: float, *, poweroff: bool) -> Plan:
        """The kill rung gets a fifth (at least :data:`KILL_MIN_S`); of the rest, the poweroff gets
        three fifths when there is a poweroff request, and terminate the remainder (at least
        :data:`TERMINATE_MIN_S` when the timeout leaves room). ``timeout=0`` goes straight to
        SIGTERM and SIGKILL. The sum is ``max(timeout, KILL_MIN_S)``."""
        timeout = max(0.0, timeout)
        kill_s = max(KILL_MIN_S, timeout / 5)
        rest = max(0.0, timeout - kill_s)
        term_s = min(rest, max(TERMINATE_MIN_S, rest * 2 / 5)) if poweroff else rest
        return cls(rest - term_s, term_s, kill_s)

    @property
    def total_s(self) -> float:
        return self.poweroff_s + self.term_s + self.kill_s


@dataclass(frozen=True)
class Step:
    """One rung that was tried: its budget, the seconds it took, and what happened (``note``)."""

    rung: str
    budget_s: float
    elapsed_s: float
    note: str = ""


@dataclass(frozen=True)
class StopReport:
    """How a VMM stopped: ``rung`` is ``exited`` (it had already), ``poweroff``, ``terminate`` or
    ``kill``; ``steps`` are the rungs tried, in order, with their budgets and durations."""

    rung: str
    returncode: int | None
    elapsed_s: float = 0.0
    steps: tuple[Step, ...] = ()

    @property
    def forced(self) -> bool:
        """True when the VMM had to be terminated or killed (an abnormal shutdown)."""
        return self.rung in ("terminate", "kill")

    @property
    def budget_s(self) -> float:
        """The seconds the tried rungs were allowed, together."""
        return sum(step.budget_s for step in self.steps)

    def describe(self, what: str) -> str:
        tried = "; ".join(f"{s.rung} {s.elapsed_s:.1f}/{s.budget_s:.1f}s" + (f" ({s.note})" if s.note else "")
                          for s in self.steps)
        return f"{what} stopped by {self.rung} (exit {self.returncode}) in {self.elapsed_s:.1f}s" + \
            (f": {tried}" if tried else "")


class _Target:
    """A process to stop: ``wait(t)`` (ended within ``t`` s?), ``send(sig)``, ``returncode()``."""

    def __init__(self, wait: Callable[[float], bool], send: Callable[[int], None],
                 returncode: Callable[[], int | None], what: str) -> None:
        self.wait, self.send, self.returncode, self.what = wait, send, returncode, what


def _child(proc: subprocess.Popen[bytes]) -> _Target:
    def wait(timeout: float) -> bool:
        if proc.poll() is not None or timeout <= 0:
            return proc.returncode is not None
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def send(sig: int) -> None:
        try:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:  # an interactive VMM shares the terminal's process group
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    return _Target(wait, send, lambda: proc.returncode, f"VMM process {proc.pid}")


def _foreign(pid: int, start: object, own_group: bool) -> _Target:
    def wait(timeout: float) -> bool:
        try:
            retry(lambda _last: not same_process(pid, start), timeout=max(0.0, timeout), interval=0.05)
            return True
        except WaitTimeout:
            return False

    def send(sig: int) -> None:
        send_signal(pid, start, sig, group=own_group)  # False: it is gone already, which wait() sees

    return _Target(wait, send, lambda: None, f"VMM process {pid}")


def _rung(target: _Target, rung: str, budget: float, request: Request | None, fallback: int | None) -> Step:
    """Make the rung's request (or send ``fallback`` when there is none or it is refused), then wait
    out what is left of ``budget``."""
    started = time.monotonic()
    note = ""
    try:
        if request is None:
            raise OSError("no request")
        request(budget)
        note = "asked"
    except (OSError, AgentboxError, ChannelError) as exc:
        if fallback is None:
            note = f"request failed: {exc}"
        else:
            target.send(fallback)
            note = signal.Signals(fallback).name + ("" if request is None else f" (request failed: {exc})")
    if note.startswith("request failed"):
        target.wait(0.0)
    else:
        target.wait(budget - (time.monotonic() - started))
    return Step(rung, round(budget, 3), round(time.monotonic() - started, 3), note)


def stop(target: subprocess.Popen[bytes] | int, *, timeout: float = DEFAULT_TIMEOUT_S, start: object = None,
         own_group: bool = False, poweroff: Request | None = None, terminate: Request | None = None) -> StopReport:
    """Stop a VMM down the ladder (see the module docstring), within about ``timeout`` seconds
    (:meth:`Plan.of` splits it; the kill rung waits at least :data:`KILL_MIN_S`).

    ``target``: our child (a ``Popen``; its process group is signalled when it leads one), or a
    bare pid that is not our child, then named by its recorded ``start`` time
    (:func:`agentbox_runtime.processes.start_time`) and signalled as a group when ``own_group``; its
    return code is unknown (None). ``poweroff``: the guest's own poweroff request (rung 1, skipped
    without it). ``terminate``: a VMM-level request that replaces SIGTERM on rung 2 (SIGTERM backs it
    up when it raises). Each request is given its rung's budget in seconds. Raises AgentboxError if
    even SIGKILL does not end the process."""
    proc = _child(target) if isinstance(target, subprocess.Popen) else _foreign(target, start, own_group)
    started = time.monotonic()
    if proc.wait(0.0):
        return StopReport("exited", proc.returncode())
    plan = Plan.of(timeout, poweroff=poweroff is not None)
    steps: list[Step] = []
    for rung, budget, request, fallback in (("poweroff", plan.poweroff_s, poweroff, None),
                                            ("terminate", plan.term_s, terminate, signal.SIGTERM),
                                            ("kill", plan.kill_s, None, signal.SIGKILL)):
        if rung == "poweroff" and (poweroff is None or budget <= 0):
            continue
        steps.append(_rung(proc, rung, budget, request, fallback))
        if proc.wait(0.0):
            return StopReport(rung, proc.returncode(), round(time.monotonic() - started, 3), tuple(steps))
    raise AgentboxError(f"{proc.what} survived SIGKILL for {plan.kill_s:.0f}s")
