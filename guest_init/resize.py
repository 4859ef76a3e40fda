"""``libkrun resize --target nix|containers``: grow the btrfs filesystem to the disk (reference 7.12)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from guest_init import contract as c
from guest_init.disks import find_disk, is_mounted, run
from guest_init.env import GuestEnv

Run = Callable[[list[str], str], None]


def resize(target: str, genv: GuestEnv, *, runner: Run = run, mounted: Callable[[str], bool] = is_mounted,
           finder: Callable[[str, str, str], str] = find_disk) -> None:
    """Mount privately under /run/agentbox/resize-<target>, ``btrfs filesystem resize max``, unmount."""
    if target == "nix":
        label, disk_id, pref, what = genv.nix_disk_label, genv.nix_disk_id, c.NIX_DISK.preferred_device, "/nix"
    else:
        label, disk_id = genv.containers_disk_label, genv.containers_disk_id
        pref, what = c.CONTAINERS_DISK.preferred_device, "container storage"
    device = finder(label, disk_id, pref)
    mp = f"{c.RUN_DIR}/resize-{target}"
    Path(mp).mkdir(parents=True, exist_ok=True)
    was_mounted = mounted(mp)
    if not was_mounted:
        runner(["mount", "-t", "btrfs", device, mp], f"failed to mount libkrun {what} btrfs disk")
    runner(["btrfs", "filesystem", "resize", "max", mp], f"failed to resize libkrun {what} btrfs filesystem")
    if not was_mounted:
        runner(["umount", mp], f"failed to unmount libkrun {what} resize mount")
