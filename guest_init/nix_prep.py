"""The /nix overlay prep on the nix disk (reference 7.5)."""

from __future__ import annotations

import os
import shutil
import subprocess
from enum import Enum
from pathlib import Path

from guest_init import contract as c
from guest_init.disks import find_disk, is_mounted, require_tools, run
from guest_init.env import GuestEnv, GuestError

PRESEEDED = ".agentbox-nix-preseeded"
ATTEMPTED = ".agentbox-nix-preseed-attempted"


class Preseed(Enum):
    COMPLETED = "completed"
    LEGACY_SEEDED = "legacy-seeded"
    FRESH_OR_RETRY = "fresh-or-retry"


def classify(upper: Path) -> Preseed:
    """Which preseed case an upper dir is in (checked before any dir is created)."""
    if (upper / PRESEEDED).exists():
        return Preseed.COMPLETED
    if not (upper / ATTEMPTED).exists() and ((upper / "var/nix/db").exists()
                                             or (upper / "var/nix/profiles").exists()):
        return Preseed.LEGACY_SEEDED
    return Preseed.FRESH_OR_RETRY


def _repair(upper: Path) -> None:
    (upper / "var/nix").mkdir(parents=True, exist_ok=True)
    try:
        shutil.chown(upper / "store", group="nixbld")
    except (LookupError, OSError):
        pass
    os.chmod(upper / "store", 0o1775)
    os.chmod(upper / "var", 0o755)
    os.chmod(upper / "var/nix", 0o755)


def _sentinel(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o644)


def preseed(upper: Path, work: Path, lower_var: Path = Path("/nix/var")) -> Preseed:
    """Prepare the upper dir; copy the image's /nix/var into it once."""
    case = classify(upper)
    for d in (upper, work, upper / "store", upper / "var"):
        d.mkdir(parents=True, exist_ok=True)
    if case is Preseed.COMPLETED:
        _repair(upper)
        (upper / ATTEMPTED).unlink(missing_ok=True)
    elif case is Preseed.LEGACY_SEEDED:
        _repair(upper)
        _sentinel(upper / PRESEEDED, "preseeded\n")
    elif lower_var.is_dir():
        _sentinel(upper / ATTEMPTED, "attempted\n")
        run(["cp", "-a", "--no-clobber", f"{lower_var}/.", str(upper / "var")],
            "failed to preseed libkrun upperdir /nix/var from image lowerdir")
        _repair(upper)
        _sentinel(upper / PRESEEDED, "preseeded\n")
        (upper / ATTEMPTED).unlink(missing_ok=True)
    else:
        _repair(upper)
    return case


def prep(genv: GuestEnv) -> None:
    """Mount the nix disk, overlay it over /nix, start nix-daemon."""
    if os.geteuid() != 0:
        raise GuestError("libkrun /nix overlay prep must run as root")
    require_tools("blkid", "mount", "findmnt", "nix-daemon")
    try:
        disk = find_disk(genv.nix_disk_label, genv.nix_disk_id, c.NIX_DISK.preferred_device)
    except GuestError:
        raise GuestError(f"libkrun /nix btrfs disk not found (label={genv.nix_disk_label} "
                         f"id={genv.nix_disk_id})") from None
    mnt = Path(c.NIX_DISK_MOUNT)
    mnt.mkdir(parents=True, exist_ok=True)
    if not is_mounted(str(mnt)):
        run(["mount", "-t", "btrfs", disk, str(mnt)], "failed to mount libkrun /nix btrfs disk")
    upper, work = mnt / "upper", mnt / "work"
    preseed(upper, work)
    if not _overlay_mounted():
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir=/nix,upperdir={upper},workdir={work}", "/nix"],
            "failed to mount libkrun overlay at /nix")
    Path(c.NIX_DAEMON_SOCKET).parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.Popen(["nix-daemon", "--daemon"], stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise GuestError(f"failed to start nix-daemon: {exc}") from None


def _overlay_mounted() -> bool:
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == "/nix" and parts[2] == "overlay":
            return True
    return False
