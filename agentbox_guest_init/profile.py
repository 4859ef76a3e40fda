"""Guest profile report (reference 11).

Timing is measured whenever ``AGENTBOX_GUEST_PROFILE=1``; the report is
printed on stderr only when ``AGENTBOX_GUEST_DEBUG=1`` is set too::

    agentbox-guest-init profile: <section>
      <label>: <ms with 3 decimals>ms
      total: <ms>ms
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO, TypeVar

from agentbox_guest_init.contract import ENV_GUEST_DEBUG, ENV_GUEST_PROFILE, flag_is_set
from agentbox_guest_init.env import GuestEnv

T = TypeVar("T")


class Profile:
    """Step timings of one section (``libkrun enter``, ``microvm enter``, ``libkrun nix prep``, ...)."""

    def __init__(self, section: str, genv: GuestEnv, clock: Callable[[], float] = time.perf_counter) -> None:
        self.section, self.clock = section, clock
        self.enabled, self.report = genv.profile, genv.profile and genv.debug
        self.rows: list[tuple[str, float]] = []
        self.labels: list[str] = []
        self.started = clock()

    @classmethod
    def from_env(cls, section: str, env: Mapping[str, str]) -> Profile:
        """A profile switched by the raw environment (before the contract is parsed)."""
        return cls(section, GuestEnv(profile=flag_is_set(env.get(ENV_GUEST_PROFILE)),
                                     debug=flag_is_set(env.get(ENV_GUEST_DEBUG))))

    def step(self, label: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` as the step ``label``; a failed step is still recorded."""
        self.labels.append(label)
        t = self.clock()
        try:
            return fn()
        finally:
            if self.enabled:
                self.rows.append((label, (self.clock() - t) * 1000))

    def render(self) -> str:
        """The report text (no trailing newline)."""
        lines = [f"agentbox-guest-init profile: {self.section}"]
        lines += [f"  {label}: {ms:.3f}ms" for label, ms in self.rows]
        lines.append(f"  total: {(self.clock() - self.started) * 1000:.3f}ms")
        return "\n".join(lines)

    def emit(self, stream: TextIO | None = None) -> None:
        """Print the report on stderr when both profile and debug are set."""
        if self.report:
            print(self.render(), file=stream or sys.stderr, flush=True)
