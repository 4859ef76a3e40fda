"""The background ``/nix`` overlay prep on the nix disk (reference 7.5).

Steps (profile labels ``nix-prep:*``): require-tools, find-disk,
prepare-run-dirs, mount-disk, preseed-upper, mount-overlay,
create-socket-dir, start-daemon. Ready means the daemon was spawned; the
socket is checked by waiters (``libkrun nix wait``).
"""

from __future__ import annotations

import glob
import os
import subprocess
from enum import Enum
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.disks import Expand, find_contract_disk
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.profile import Profile
from agentbox_guest_init.proc import ROOT, Runner, check, etc_entries, is_mounted, require_tools, run_tool, under

PRESEEDED = ".agentbox-nix-preseeded"
ATTEMPTED = ".agentbox-nix-preseed-attempted"
NIX_DAEMON = "nix-daemon"
BUILD_GROUP = "nixbld"


class Preseed(Enum):
    """The three states an upper dir can be found in."""

    COMPLETED = "completed"
    LEGACY_SEEDED = "legacy-seeded"
    FRESH_OR_RETRY = "fresh-or-retry"


def classify(upper: Path) -> Preseed:
    """Which preseed case ``upper`` is in (checked before any dir is created)."""
    if (upper / PRESEEDED).exists():
        return Preseed.COMPLETED
    if not (upper / ATTEMPTED).exists() and ((upper / "var/nix/db").exists()
                                             or (upper / "var/nix/profiles").exists()):
        return Preseed.LEGACY_SEEDED
    return Preseed.FRESH_OR_RETRY


def group_id(name: str, root: Path = ROOT) -> int | None:
    """The gid of group ``name`` in ``<root>/etc/group``."""
    for fields in etc_entries(root, "group"):
        if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    return None


def repair(upper: Path, root: Path = ROOT) -> None:
    """``upper/var/nix`` exists; ``upper/store`` is ``:nixbld`` 1775; var dirs 0755."""
    (upper / "var/nix").mkdir(parents=True, exist_ok=True)
    gid = group_id(BUILD_GROUP, root)
    if gid is not None:
        os.chown(upper / "store", -1, gid)
    os.chmod(upper / "store", 0o1775)
    os.chmod(upper / "var", 0o755)
    os.chmod(upper / "var/nix", 0o755)


def _sentinel(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o644)


def preseed(upper: Path, work: Path, lower_var: Path, *, runner: Runner = run_tool,
            root: Path = ROOT) -> Preseed:
    """Prepare the overlay upper dir; copy the image's ``/nix/var`` into it exactly once."""
    case = classify(upper)
    for d in (upper, work, upper / "store", upper / "var"):
        d.mkdir(parents=True, exist_ok=True)
    if case is Preseed.COMPLETED:
        repair(upper, root)
        (upper / ATTEMPTED).unlink(missing_ok=True)
    elif case is Preseed.LEGACY_SEEDED:
        repair(upper, root)
        _sentinel(upper / PRESEEDED, "preseeded\n")
    elif lower_var.is_dir():
        _sentinel(upper / ATTEMPTED, "attempted\n")
        check(runner, ["cp", "-a", "--no-clobber", f"{lower_var}/.", str(upper / "var")],
              "failed to preseed libkrun upperdir /nix/var from image lowerdir")
        repair(upper, root)
        _sentinel(upper / PRESEEDED, "preseeded\n")
        (upper / ATTEMPTED).unlink(missing_ok=True)
    else:
        repair(upper, root)
    return case


def overlay_mounted(root: Path = ROOT) -> bool:
    """``/nix`` is already an overlay (a second prep does not stack another)."""
    for line in under(root, "/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == "/nix" and parts[2] == "overlay":
            return True
    return False


def start_daemon() -> None:
    """Spawn ``nix-daemon --daemon`` in its own session (output to this worker's log)."""
    try:
        subprocess.Popen([NIX_DAEMON, "--daemon"], stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise GuestError(f"failed to start nix-daemon: {exc.strerror}") from None


def prep(genv: GuestEnv, prof: Profile | None = None, *, runner: Runner = run_tool,
         expand: Expand = glob.glob) -> None:
    """Mount the nix disk, overlay it over ``/nix``, start nix-daemon (root only)."""
    prof = prof or Profile("libkrun nix prep", genv)
    if os.geteuid() != 0:
        raise GuestError("libkrun /nix overlay prep must run as root")
    prof.step("nix-prep:require-tools", lambda: require_tools("blkid", "mount", "findmnt", NIX_DAEMON))
    disk = prof.step("nix-prep:find-disk", lambda: find_contract_disk(
        genv, "nix", "libkrun /nix btrfs disk not found", runner=runner, expand=expand))
    mnt = Path(c.NIX_DISK_MOUNT)
    prof.step("nix-prep:prepare-run-dirs", lambda: mnt.mkdir(parents=True, exist_ok=True))

    def mount_disk() -> None:
        if not is_mounted(mnt, runner):
            check(runner, ["mount", "-t", "btrfs", disk, str(mnt)], "failed to mount libkrun /nix btrfs disk")

    prof.step("nix-prep:mount-disk", mount_disk)
    upper, work = mnt / "upper", mnt / "work"
    prof.step("nix-prep:preseed-upper", lambda: preseed(upper, work, Path("/nix/var"), runner=runner))

    def mount_overlay() -> None:
        if not overlay_mounted():
            check(runner, ["mount", "-t", "overlay", "overlay", "-o",
                           f"lowerdir=/nix,upperdir={upper},workdir={work}", "/nix"],
                  "failed to mount libkrun overlay at /nix")

    prof.step("nix-prep:mount-overlay", mount_overlay)
    prof.step("nix-prep:create-socket-dir",
              lambda: Path(c.NIX_DAEMON_SOCKET).parent.mkdir(parents=True, exist_ok=True))
    prof.step("nix-prep:start-daemon", start_daemon)
    prof.emit()
