"""One bounded retry primitive used by every wait of the harness."""

from __future__ import annotations

import time
from collections.abc import Callable


class WaitTimeout(AssertionError):
    """A wait ran out of time; the message carries the last output seen."""


def retry(fn: Callable[[bool], bool], *, timeout: float, interval: float = 0.5,
          describe: Callable[[], str] = lambda: "") -> None:
    """Call ``fn(last_try)`` until it returns True; ``last_try`` is True on the final call.

    Raises :class:`WaitTimeout` with ``describe()`` (the last output) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        last = time.monotonic() + interval >= deadline
        if fn(last):
            return
        if last:
            raise WaitTimeout(f"timed out after {timeout:.1f}s. {describe()}".strip())
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
