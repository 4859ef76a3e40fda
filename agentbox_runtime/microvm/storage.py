"""Task rootfs storage backends (reference 9.5): btrfs-snapshot, fuse-overlay, reflink, auto.

Every backend first resets a stale task dir. ``auto`` tries btrfs-snapshot,
then fuse-overlay; explicit backends never fall back. Any failure inside a
backend resets the task dir before returning.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.microvm.image_cache import remove_tree
from agentbox_runtime.errors import error_chain

TIMEOUT_S = 1800.0


def _buildah_prefix() -> list[str]:
    """Rootless snapshot commands run inside ``buildah unshare``; root runs them directly."""
    return [] if os.geteuid() == 0 else ["buildah", "unshare"]


def available(policy: str) -> bool:
    if policy == "btrfs-snapshot":
        return shutil.which("buildah") is not None and shutil.which("btrfs") is not None
    if policy == "reflink":
        return shutil.which("cp") is not None
    if policy == "fuse-overlay":
        return shutil.which("fuse-overlayfs") is not None
    return False


def select(policy: str) -> str:
    """Check the policy's tools; the error texts are the reference's."""
    if policy == "auto":
        if not (available("btrfs-snapshot") or available("fuse-overlay")):
            raise AgentboxError("experimental microvm storage auto requires buildah+btrfs for snapshots "
                                "or fuse-overlayfs on PATH")
        return policy
    messages = {"btrfs-snapshot": "requires buildah and btrfs on PATH", "reflink": "requires cp on PATH",
                "fuse-overlay": "requires fuse-overlayfs on PATH"}
    if policy not in messages:
        raise AgentboxError(f"unknown microvm storage '{policy}'; accepted: auto, btrfs-snapshot, fuse-overlay, reflink")
    if not available(policy):
        raise AgentboxError(f"experimental microvm storage --storage {policy} {messages[policy]}")
    return policy


@dataclass
class TaskRootfs:
    """A materialized task rootfs and how to clean it up."""

    mode: str
    root: Path
    task_dir: Path
    preserve: bool = False

    def hint(self) -> str:
        if self.mode == "btrfs-snapshot":
            return (f"btrfs snapshot task rootfs is preserved; delete it with `buildah unshare btrfs subvolume "
                    f"delete '{self.root}'` before deleting '{self.task_dir}'")
        if self.mode == "fuse-overlay":
            return (f"fuse-overlay task rootfs is still mounted; unmount it with `fusermount3 -u '{self.root}'` "
                    f"before deleting '{self.task_dir}'")
        return ""

    def unmount(self) -> None:
        """Unmount a fuse-overlay root (fusermount3, fusermount, umount)."""
        if self.mode != "fuse-overlay" or not is_mounted(self.root):
            return
        errors = []
        for argv in (["fusermount3", "-u"], ["fusermount", "-u"], ["umount"]):
            try:
                proc = subprocess.run([*argv, str(self.root)], capture_output=True, text=True, timeout=60)
            except FileNotFoundError:
                errors.append(f"{argv[0]}: not found")
                continue
            if proc.returncode == 0 and not is_mounted(self.root):
                return
            errors.append(f"{argv[0]}: {proc.stderr.strip()}")
        raise AgentboxError(f"failed to unmount fuse-overlayfs task rootfs '{self.root}': {'; '.join(errors)}")

    def cleanup(self) -> None:
        """Delete the task rootfs and task dir (after unmount)."""
        if self.mode == "btrfs-snapshot" and self.root.exists():
            proc = subprocess.run([*_buildah_prefix(), "btrfs", "subvolume", "delete", str(self.root)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise AgentboxError(f"failed to delete btrfs snapshot task rootfs '{self.root}': {proc.stderr.strip()}")
        try:
            remove_tree(self.task_dir)
        except OSError as exc:
            raise AgentboxError(f"failed to clean up microvm task state dir '{self.task_dir}': {exc}") from None


def is_mounted(path: Path) -> bool:
    target = str(path)
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if line.split()[4] == target:
                return True
    except OSError:
        pass
    return False


def reset_task_dir(task_dir: Path) -> None:
    snap = task_dir / "rootfs-btrfs-snapshot"
    if snap.exists():
        subprocess.run([*_buildah_prefix(), "btrfs", "subvolume", "delete", str(snap)], capture_output=True, timeout=300)
    fuse = task_dir / "rootfs-fuse-overlay"
    if is_mounted(fuse):
        TaskRootfs("fuse-overlay", fuse, task_dir).unmount()
    remove_tree(task_dir)


def _chain(context: str, cause: str) -> AgentboxError:
    """``context`` caused by ``cause`` (the middle links of the reference error chains)."""
    outer = AgentboxError(context)
    outer.__cause__ = AgentboxError(cause)
    return outer


def _btrfs_snapshot(src: Path, task_dir: Path) -> TaskRootfs:
    root = task_dir / "rootfs-btrfs-snapshot"
    task_dir.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([*_buildah_prefix(), "btrfs", "subvolume", "snapshot", str(src), str(root)],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        raise AgentboxError("buildah is not installed or not available on PATH; btrfs-snapshot storage requires "
                            "buildah unshare") from None
    if proc.returncode != 0:
        raise AgentboxError(f"failed to materialize microvm task rootfs with btrfs snapshot from '{src}'; refresh "
                            "the microvm image cache if this cache entry was created before btrfs snapshot support") \
            from _chain(f"failed to snapshot microvm task rootfs from '{src}' to '{root}'",
                        f"buildah unshare btrfs subvolume snapshot failed from '{src}' to '{root}': "
                        f"{proc.stderr.strip()}")
    return TaskRootfs("btrfs-snapshot", root, task_dir)


def _reflink(src: Path, task_dir: Path) -> TaskRootfs:
    root = task_dir / "rootfs-reflink"
    root.mkdir(parents=True)
    proc = subprocess.run(["cp", "-a", "--reflink=always", f"{src}/.", str(root)], capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise AgentboxError(f"failed to materialize microvm task rootfs with required reflinks from '{src}'") \
            from _chain(f"failed to reflink-copy microvm task rootfs from '{src}' to '{root}'",
                        f"cp -a --reflink=always failed from '{src}' to '{root}': {proc.stderr.strip()[:500]}")
    return TaskRootfs("reflink", root, task_dir)


def _fuse_overlay(src: Path, task_dir: Path) -> TaskRootfs:
    root, upper, work = (task_dir / "rootfs-fuse-overlay", task_dir / "upper-fuse-overlay",
                         task_dir / "work-fuse-overlay")
    for d in (root, upper, work):
        d.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={src},upperdir={upper},workdir={work}", str(root)],
                              capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise AgentboxError("experimental microvm storage --storage fuse-overlay requires fuse-overlayfs on PATH") from None
    if proc.returncode != 0:
        raise AgentboxError(f"failed to materialize microvm task rootfs with fuse-overlayfs from '{src}'") from \
            _chain(f"failed to mount microvm task rootfs from lower '{src}' to merged '{root}'",
                   f"fuse-overlayfs mount failed for '{root}' (lower={src}, upper={upper}, work={work}): "
                   f"{proc.stderr.strip()}")
    return TaskRootfs("fuse-overlay", root, task_dir)


BACKENDS = {"btrfs-snapshot": _btrfs_snapshot, "reflink": _reflink, "fuse-overlay": _fuse_overlay}


def materialize(policy: str, src: Path, task_dir: Path, preserve: bool = False) -> TaskRootfs:
    """A clean task rootfs of ``src`` under ``task_dir`` with the selected backend."""
    reset_task_dir(task_dir)
    if policy != "auto":
        try:
            handle = BACKENDS[policy](src, task_dir)
        except AgentboxError:
            reset_task_dir(task_dir)
            raise
        handle.preserve = preserve
        return handle
    try:
        if not available("btrfs-snapshot"):
            raise AgentboxError("btrfs is not available for snapshot materialization")
        handle = _btrfs_snapshot(src, task_dir)
    except AgentboxError as first:
        try:
            reset_task_dir(task_dir)
        except (AgentboxError, OSError) as exc:
            raise AgentboxError(f"failed to clean partial btrfs-snapshot microvm task rootfs after: {first}") from exc

        if not available("fuse-overlay"):
            raise AgentboxError(f"auto microvm storage failed: btrfs-snapshot materialization failed "
                                f"({error_chain(first)}); fuse-overlayfs is not available on PATH") from None
        try:
            handle = _fuse_overlay(src, task_dir)
        except AgentboxError as second:
            reset_task_dir(task_dir)
            raise AgentboxError(f"auto microvm storage failed: btrfs-snapshot materialization failed "
                                f"({error_chain(first)}); fuse-overlay materialization failed "
                                f"({error_chain(second)})") from None
    handle.preserve = preserve
    return handle
