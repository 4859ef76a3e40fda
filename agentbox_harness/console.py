"""A machine's console: the full log on disk plus a pexpect child on the live stream.

``machine.console.log`` is the path of the whole console log (kernel and
guest-init output; kept as an artifact). ``machine.console.child`` attaches a
pexpect child to the command console (connected on first use; raises when the
backend has none). The waits poll the log and fail early on a kernel panic:
``wait_for_text`` (a line anywhere since boot), ``wait_for_console_text`` (the
NixOS test driver's: output not consumed by the previous such wait) and
``wait_until_matches`` (the whole log, multi-line).
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
    _consumed: int = field(default=0, repr=False)
    """Characters of the log that ``wait_for_console_text`` has consumed."""

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
        """The whole console log so far, lines ending in ``\n`` (a serial console's ``\r\n`` too, so
        a regex's ``$`` means the end of a line)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")

    def wait_for_text(self, pattern: str, *, timeout: float | None = None) -> str:
        """Wait until ``pattern`` (a regex) appears in the console log; the matching line.

        Fails at once when a kernel panic shows up; the error carries the log tail."""
        text, m = self._wait(pattern, timeout, since=0, what="on the console")
        start = text.rfind("\n", 0, m.start()) + 1
        end = text.find("\n", m.end())
        return text[start:end if end >= 0 else len(text)]

    def wait_for_console_text(self, pattern: str, *, timeout: float | None = None) -> str:
        """Wait until ``pattern`` (a regex, searched across lines as the NixOS test driver does)
        appears in console output not yet consumed by an earlier ``wait_for_console_text``; the
        matched text. The first wait of a boot sees the console from the start; each match
        consumes the output up to its end, so waiting twice for the same text needs it printed twice."""
        text, m = self._wait(pattern, timeout, since=self._consumed, what="in new console output")
        self._consumed = m.end()
        return m.group(0)

    def wait_until_matches(self, pattern: str, *, timeout: float | None = None) -> str:
        """Wait until the whole console log of this boot matches ``pattern`` (a regex searched
        with ``re.MULTILINE``); the matched text. Consumes nothing."""
        _text, m = self._wait(pattern, timeout, since=0, what="on the console", flags=re.MULTILINE)
        return m.group(0)

    def _wait(self, pattern: str, timeout: float | None, *, since: int, what: str,
              flags: int = 0) -> tuple[str, re.Match[str]]:
        """Poll the log until ``pattern`` matches at or after character ``since``; (text, match).
        A kernel panic anywhere in the log fails at once; a timeout shows the last text seen."""
        regex = re.compile(pattern, flags)
        found: list[tuple[str, re.Match[str]]] = []

        def seen(_last_try: bool) -> bool:
            text = self.text()
            for bad in FAILURE_PATTERNS:
                if re.search(bad, text):
                    raise ConsoleError(f"{self.name}: console shows '{bad}' while waiting for {pattern!r}:\n"
                                       f"{self.tail()}")
            m = regex.search(text, since if since <= len(text) else 0)  # a rotated log starts over
            if m:
                found.append((text, m))
            return bool(found)

        try:
            retry(seen, timeout=(self.default_timeout if timeout is None else timeout) * self.timeout_scale,
                  interval=0.5)
        except WaitTimeout as exc:
            raise ConsoleError(f"{self.name}: {exc}: waiting for {pattern!r} {what}; console tail:\n"
                               f"{self.tail()}") from None
        return found[0]

    def close(self) -> None:
        """Close the live child (the log stays)."""
        if self._child is not None:
            self._child.close(force=True)
            self._child = None
