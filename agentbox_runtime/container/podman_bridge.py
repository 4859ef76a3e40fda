"""Container mode's binding to the Podman command runner.

:class:`CliPodman` is :class:`agentbox_runtime.podman.Podman`, the project's one
Podman runner, under the name container mode was written against.
"""

from __future__ import annotations

from agentbox_runtime.podman import MISSING, Podman

CliPodman = Podman

__all__ = ["CliPodman", "MISSING"]
