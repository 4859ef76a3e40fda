"""``libkrun resize --target nix|containers``: grow the btrfs filesystem to its disk (reference 7.12).

Order: find the disk, ``mkdir`` the private mount point
``/run/agentbox/resize-<target>``, ``findmnt`` it, mount when it was not
mounted, ``btrfs filesystem resize max``, unmount only what this step
mounted. Any failure exits non-zero so the host reports it as retryable.
"""

from __future__ import annotations

import glob
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.disks import Expand, find_contract_disk
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.proc import ROOT, Runner, check, is_mounted, run_tool, under

WHAT = {"nix": "/nix", "containers": "container storage"}


def mount_point(target: str) -> str:
    """The private resize mount point of ``target``."""
    return f"{c.RUN_DIR}/resize-{target}"


def resize(target: str, genv: GuestEnv, *, runner: Runner = run_tool, root: Path = ROOT,
           expand: Expand = glob.glob) -> None:
    """Grow the ``target`` disk's btrfs filesystem to the size of its (grown) disk."""
    what = WHAT[target]
    device = find_contract_disk(genv, target, f"libkrun {what} btrfs disk not found", runner=runner,
                                expand=expand)
    mp = mount_point(target)
    under(root, mp).mkdir(parents=True, exist_ok=True)
    was_mounted = is_mounted(mp, runner)
    if not was_mounted:
        check(runner, ["mount", "-t", "btrfs", device, mp], f"failed to mount libkrun {what} btrfs disk")
    try:
        check(runner, ["btrfs", "filesystem", "resize", "max", mp],
              f"failed to resize libkrun {what} btrfs filesystem")
    except Exception:
        if not was_mounted:
            runner(["umount", mp])  # best effort: the resize error is the one to report
        raise
    if not was_mounted:
        check(runner, ["umount", mp], f"failed to unmount libkrun {what} resize mount")
