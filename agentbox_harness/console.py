"""A machine's console: the full log on disk plus a pexpect child on the live stream.

``machine.console.log`` is the path of the whole console log (kernel and
guest-init output; kept as an artifact). ``machine.console.child`` attaches a
pexpect child to the command console (connected on first use; raises when the
backend has none). ``wait_for_text`` polls the log, so it sees everything
printed since boot, and fails early on a kernel panic.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentbox_harness.wait import WaitTimeout, retry

FAILURE_PATTERNS = (r"Kernel panic", r"end Kernel panic")


def read_tail(path: Path | None, lines: int = 30, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a (possibly still growing) log; empty when absent."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


class ConsoleError(AssertionError):
    """The console showed a failure pattern or has no live stream."""


@dataclass
class Console:
    """The console of one machine (see the module docstring)."""

    name: str
    log: Path | None
    connect: Callable[[], Any] | None = None
    timeout_scale: float = 1.0
    default_timeout: float = 60.0
    _child: Any = field(default=None, repr=False)

    @property
    def child(self) -> Any:
        """A ``pexpect.spawn`` on the command console (created on first use)."""
        if self._child is None or not self._child.isalive():
            if self.connect is None:
                raise ConsoleError(f"{self.name} has no live console stream on this backend; "
                                   f"its log is {self.log}")
            self._child = self.connect()
        return self._child

    def tail(self, lines: int = 30) -> str:
        """The last lines of the console log."""
        return read_tail(self.log, lines)

    def text(self) -> str:
        """The whole console log so far."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_bytes().decode("utf-8", "replace")

    def wait_for_text(self, pattern: str, *, timeout: float | None = None) -> str:
        """Wait until ``pattern`` (a regex) appears in the console log; the matching line.

        Fails at once when a kernel panic shows up; the error carries the log tail."""
        regex = re.compile(pattern)
        found: list[str] = []

        def seen(_last_try: bool) -> bool:
            text = self.text()
            for bad in FAILURE_PATTERNS:
                if re.search(bad, text):
                    raise ConsoleError(f"{self.name}: console shows '{bad}' while waiting for {pattern!r}:\n"
                                       f"{self.tail()}")
            m = regex.search(text)
            if m:
                start = text.rfind("\n", 0, m.start()) + 1
                end = text.find("\n", m.end())
                found.append(text[start:end if end >= 0 else len(text)])
            return bool(found)

        try:
            retry(seen, timeout=(self.default_timeout if timeout is None else timeout) * self.timeout_scale,
                  interval=0.5)
        except WaitTimeout as exc:
            raise ConsoleError(f"{self.name}: {exc}: waiting for {pattern!r} on the console; console tail:\n"
                               f"{self.tail()}") from None
        return found[0]

    def close(self) -> None:
        """Close the live child (the log stays)."""
        if self._child is not None:
            self._child.close(force=True)
            self._child = None
