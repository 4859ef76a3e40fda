"""What a machine builder may use (see :mod:`agentbox_harness.registry`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agentbox_harness.session import HarnessSession
from agentbox_harness.workspace import Workspace


@dataclass
class BackendContext:
    """What a builder may use: the session, the test's workspace and the dimension values
    (``memory_mib`` in MiB: the ``vm_memory`` fixture's GiB x 1024)."""

    session: HarnessSession
    workspace: Workspace
    image: Callable[[], str]
    memory_mib: int
    cpus: int
    storage: str
    boot: str = "restore"
    """``restore`` or ``cold``: how a qemu guest starts (the session's ``--agentbox-boot``, ``cold``
    for a test marked ``cold_boot``)."""
