"""Grow a persistent raw disk (host side of ``agentbox libkrun resize``, reference 5.4).

Order: refuse while a running guest uses the image (fail closed), grow the
file (validation, grow-only, sparse), then run the guest maintenance step
(``btrfs filesystem resize max``) through a :class:`MaintenanceRunner`. A
failure after the host grew the file is reported as retryable; nothing is
ever shrunk or rolled back.
"""

from __future__ import annotations


from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agentbox_runtime.disks import LIBKRUN_CONTAINERS, LIBKRUN_NIX, RawDisk, Runner, grow
from agentbox_runtime.state import check_state_dir, maintenance_lock
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.live_disks import RunningContainers, refuse_if_live

TARGETS = {"nix": LIBKRUN_NIX, "containers": LIBKRUN_CONTAINERS}


@dataclass(frozen=True)
class ResizePlan:
    """What the maintenance step must grow."""

    disk: RawDisk
    path: Path
    old_size: int
    new_size: int


class MaintenanceRunner(Protocol):
    """Boots the one-shot guest that runs ``agentbox-guest-init libkrun resize``."""

    def run(self, plan: ResizePlan) -> int:
        """Run the guest step; return its exit status (raise if it cannot start)."""
        ...


class GuestStepFailed(AgentboxError):
    """The host grew the image but the guest step failed; rerunning is safe."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_code = status if 0 < status < 256 else 1


def retry_message(target: str, path: Path, status: int | None) -> str:
    """The reference's retryable failure text (``status`` None: failed to start)."""
    what = f"exited with status {status}" if status is not None else "failed to start"
    return (f"libkrun resize guest step for {target} {what} after host raw image '{path}' was "
            "enlarged; fix the reported guest error and rerun the same resize command. "
            "The raw image will not be shrunk or reset automatically.")


def resize(target: str | RawDisk, size: int, state_root: Path, runner: MaintenanceRunner, *,
           containers: RunningContainers | None = None, tools: Runner | None = None,
           extra_users: tuple[str, ...] = (),
           before_grow: Callable[[], None] | None = None) -> ResizePlan:
    """Grow the ``target`` image under ``state_root`` to ``size`` bytes and run the guest step.

    ``before_grow`` runs after the image was validated and before it grows:
    the place to check that the maintenance guest can start at all."""
    disk = target if isinstance(target, RawDisk) else TARGETS[target]
    path = disk.path(state_root)
    check_state_dir(state_root)  # symlinks, owner and mode refused before anything else
    with maintenance_lock(state_root, f"resize {disk.file_name}"):
        refuse_if_live(path, "resize", containers, extra_users)
        old = grow(disk, path, size, tools, before_grow=before_grow)
        plan = ResizePlan(disk, path, old, size)
        try:
            status = runner.run(plan)
        except AgentboxError as exc:
            raise GuestStepFailed(retry_message(disk.spec.key, path, None), 1) from exc
    if status != 0:
        raise GuestStepFailed(retry_message(disk.spec.key, path, status), status)
    return plan
