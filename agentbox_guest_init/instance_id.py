"""The guest's instance id (:data:`agentbox_guest_init.contract.INSTANCE_ID_PATH`): random, one per guest.

The kernel's ``boot_id`` cannot tell guests apart: every guest restored from one
qemu snapshot template shares it. qemu's PID 1 writes a fresh id at every cold
boot and restore; the enter flow writes one where no PID 1 of ours did (libkrun).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agentbox_guest_init import contract


def write(root: Path = Path("/"), *, replace: bool = True) -> None:
    """A new random id under ``root``; with ``replace=False`` only when none exists. Errors are
    ignored (a read-only /run leaves the guest without one)."""
    path = root / contract.INSTANCE_ID_PATH.lstrip("/")
    if not replace and path.exists():
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(os.urandom(16).hex() + "\n")
