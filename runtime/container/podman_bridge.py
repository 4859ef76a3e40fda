"""Container mode's binding to a Podman command runner.

TEMPORARY BRIDGE: ``runtime.podman`` (the project's one Podman runner) had
not landed when container mode was written. :class:`CliPodman` implements
the :class:`~runtime.container.podman_api.PodmanRunner` calls with the
reference conventions (section 10) so container mode works; once
``runtime.podman`` exists this class should delegate to it (same method
names), and nothing else in container mode changes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from runtime.errors import AgentboxError

MISSING = "podman is not installed or not available on PATH"
CALL_TIMEOUT_S = 300.0


class CliPodman:
    """``podman [--log-level=debug] <args>`` through subprocess."""

    def __init__(self, debug: bool = False, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.prefix = ["podman", "--log-level=debug"] if debug else ["podman"]
        self.timeout_s = timeout_s

    def argv(self, args: Sequence[str]) -> list[str]:
        """The full command line for ``args``."""
        return [*self.prefix, *args]

    def capture(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run with stdin null; raw result; a timeout becomes exit status 124."""
        try:
            return subprocess.run(self.argv(args), stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError as exc:
            raise AgentboxError(MISSING) from exc
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            return subprocess.CompletedProcess(
                exc.cmd, 124, out, err + f"\ntimed out after {self.timeout_s:.0f}s")

    def output(self, args: Sequence[str], context: str) -> str:
        """Run with stdin null; stdout; non-zero raises ``<context>[: <stderr>]``."""
        proc = self.capture(args)
        if proc.returncode != 0:
            detail = proc.stderr.strip()
            raise AgentboxError(f"{context}: {detail}" if detail else context)
        return proc.stdout

    def status(self, args: Sequence[str]) -> int:
        """Run with stdio inherited; the exit status."""
        return self.spawn(args).wait()

    def spawn(self, args: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start with stdio inherited and return the process."""
        try:
            return subprocess.Popen(self.argv(args))
        except FileNotFoundError as exc:
            raise AgentboxError(MISSING) from exc
