"""A guest image's root as a read-only ext4 block image, for snapshot templates.

A snapshot cannot hold a 9p root (QEMU refuses to migrate while a 9p export is
mounted), so a template boots from this image instead, read-only on
virtio-scsi under an overlay whose upper layer is guest memory
(:mod:`agentbox_runtime.vmm.snapshot`). It is built once per image digest and
guest-init (``mkfs.ext4 -d``, about 6 s for the 930 MB stock image), without a
journal or metadata checksums, owned by root and never written after: every restored guest reads the
same bytes the template read.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from filelock import FileLock

from agentbox_guest_init import contract
from agentbox_runtime.errors import AgentboxError

FORMAT = "2"
"""Bumped when the image's make-up changes (part of its file name, so an old one is never reused)."""
#: Free room on top of the tree's size (ext4 metadata; the image is never written).
SLACK = 1.15
EXTRA_BYTES = 128 << 20
BUILD_TIMEOUT_S = 600.0


def tree_bytes(root: Path) -> int:
    """The apparent size of every file under ``root`` (symlinks not followed)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*filenames, *dirnames):
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def guest_init_hash(rootfs: Path, guest_init: Path) -> str:
    """A digest of the guest-init executable ``guest_init`` (inside ``rootfs``) and every file of
    its store directory: a changed guest-init is a changed root image and snapshot."""
    h = hashlib.sha256(str(guest_init.relative_to(rootfs)).encode())
    store_dir = guest_init.parent.parent
    for dirpath, dirnames, filenames in os.walk(store_dir):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            h.update(str(path.relative_to(store_dir)).encode() + b"\0")
            if path.is_file() and not path.is_symlink():
                h.update(path.read_bytes())
    return h.hexdigest()[:20]


def build(rootfs: Path, out: Path) -> None:
    """Write the ext4 image of ``rootfs`` to ``out`` (through a temporary file: ``out`` appears
    whole or not at all)."""
    size = int(tree_bytes(rootfs) * SLACK) + EXTRA_BYTES
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    argv = ["mkfs.ext4", "-q", "-F", "-L", contract.SNAPSHOT_ROOT_LABEL, "-O", "^has_journal,^metadata_csum", "-i", "8192",
            "-E", "root_owner=0:0", "-d", str(rootfs), str(tmp), f"{size // 1024}k"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        tmp.unlink(missing_ok=True)
        raise AgentboxError(f"cannot build the snapshot root image of {rootfs}: {exc}") from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise AgentboxError(f"mkfs.ext4 -d {rootfs} failed (exit {proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    tmp.chmod(0o444)
    os.replace(tmp, out)


def ensure(rootfs: Path, key: str, cache: Path) -> Path:
    """The root image of ``rootfs`` under ``cache``, built once for ``key`` (image digest and
    guest-init); concurrent callers (xdist workers) wait for one build."""
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = cache / f"root-{key}-v{FORMAT}.img"
    with FileLock(str(cache / f".root-{key}.lock"), timeout=BUILD_TIMEOUT_S):
        if not out.exists():
            build(rootfs, out)
    return out
