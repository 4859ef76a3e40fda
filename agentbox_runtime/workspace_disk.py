"""One persistent raw image of a workspace, with what can be done to it: create (or validate and
reuse), validate, grow through a maintenance guest, reset, and who uses it now.

The operations are :mod:`agentbox_runtime.disks`, :mod:`agentbox_runtime.resize` and
:mod:`agentbox_runtime.reset`; this record ties them to one image and also counts the microvm tasks
of this host that attach it (:func:`agentbox_runtime.microvm.maintenance.live_users`) as users, so a
grow or reset is refused while any guest has the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agentbox_runtime import disks
from agentbox_runtime.microvm.maintenance import live_users
from agentbox_runtime.reset import reset_nix
from agentbox_runtime.resize import MaintenanceRunner, ResizePlan, resize
from agentbox_runtime.state import StateLayout


@dataclass(frozen=True)
class WorkspaceDisk:
    """The raw image ``disk`` under a workspace's ``state_root``."""

    disk: disks.RawDisk
    state_root: Path

    @property
    def path(self) -> Path:
        return self.disk.path(self.state_root)

    def create(self) -> disks.Outcome:
        """Create (or validate and reuse) the image."""
        self.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return disks.prepare(self.disk, self.state_root)

    def validate(self) -> int:
        """Check the image; its size."""
        return disks.validate(self.disk, self.path, disks.SubprocessRunner())

    def live_users(self) -> tuple[str, ...]:
        """Running microvm tasks recorded under this state root that attach the image."""
        layout = StateLayout(self.state_root, self.state_root.name, self.state_root.parent, self.state_root)
        return tuple(live_users(layout, self.path))

    def grow(self, size: int, runner: MaintenanceRunner) -> ResizePlan:
        """Grow to ``size`` bytes and run the guest step through ``runner``.

        Refused while a Podman container or a microvm task uses the image; equal and smaller sizes
        are refused; a guest failure is retryable."""
        return resize(self.disk, size, self.state_root, runner, extra_users=self.live_users())

    def reset(self, force: bool = True) -> Path:
        """Delete and recreate the nix image (refused without ``force`` and while live)."""
        return reset_nix(self.state_root, force, extra_users=self.live_users(), disk=self.disk)
