"""The one bounded retry primitive: every wait of the runtime and the harness uses it."""

from __future__ import annotations

import time
from collections.abc import Callable

from agentbox_runtime.errors import AgentboxError


class WaitTimeout(AgentboxError, TimeoutError):
    """A wait ran out of time; the message carries what was last seen (``describe()``)."""


def retry(fn: Callable[[bool], bool], *, timeout: float, interval: float = 0.5,
          describe: Callable[[], str] = lambda: "") -> None:
    """Call ``fn(last_try)`` until it returns True; ``last_try`` is True on the final call, so ``fn``
    can raise its own error with the details it holds. ``fn`` may also raise to stop early (the
    thing waited for died). After ``timeout`` seconds: :class:`WaitTimeout` with ``describe()``."""
    deadline = time.monotonic() + timeout
    while True:
        last = time.monotonic() + interval >= deadline
        if fn(last):
            return
        if last:
            raise WaitTimeout(f"timed out after {timeout:.1f}s. {describe()}".strip())
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
