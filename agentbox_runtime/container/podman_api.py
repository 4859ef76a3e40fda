"""What container mode needs from the Podman command runner.

All Podman calls go through ``agentbox_runtime.podman`` (the one runner: debug flag,
missing-binary message, error context). This module only names the three
call shapes container mode uses, so its logic can be typed against them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol


class PodmanRunner(Protocol):
    """The Podman runner as container mode uses it (``podman <args>``)."""

    def output(self, args: Sequence[str], context: str) -> str:
        """Run with stdin null; return stdout; non-zero raises ``<context>[: <stderr>]``."""
        ...

    def capture(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run with stdin null and return the raw result; never raises on non-zero."""
        ...

    def status(self, args: Sequence[str]) -> int:
        """Run with stdio inherited and return the exit status."""
        ...
