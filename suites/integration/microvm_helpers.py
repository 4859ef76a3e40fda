"""Shared pieces of the microvm integration tests: a loop-mounted btrfs and tiny synthetic images.

Everything created here is removed again, also when a test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def need_root_and(*tools: str) -> None:
    """Skip with a precise reason unless root and every tool are here."""
    if os.geteuid() != 0:
        pytest.skip("needs root for loop mounts and fuse-overlayfs")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH")


def run(argv: list[str], timeout: float = 300) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)} failed: {proc.stderr.strip()}"
    return proc.stdout.strip()


@contextmanager
def loop_btrfs(where: Path, size: str = "1G") -> Iterator[Path]:
    """A fresh btrfs on a sparse file, loop-mounted with user_subvol_rm_allowed; always unmounted."""
    need_root_and("mkfs.btrfs", "btrfs", "mount", "umount")
    image = where / "btrfs.img"
    mnt = where / "btrfs"
    mnt.mkdir(parents=True)
    run(["truncate", "-s", size, str(image)])
    run(["mkfs.btrfs", "-q", str(image)])
    run(["mount", "-o", "loop,user_subvol_rm_allowed", str(image), str(mnt)])
    try:
        yield mnt
    finally:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point.startswith(str(mnt) + "/"):  # fuse mounts a failed test left inside
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=120).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=120)
        image.unlink(missing_ok=True)


def buildah_containers() -> set[str]:
    return set(run(["buildah", "containers", "-q"]).split())


@contextmanager
def synthetic_image(*, guest_inits: int = 1, payload_mib: int = 0) -> Iterator[str]:
    """``localhost/agentbox-microvm-synth:<random>``: busybox, ``guest_inits`` fake
    guest-init executables under nix/store/*/bin, and ``payload_mib`` of data."""
    need_root_and("buildah", "busybox")
    tag = f"localhost/agentbox-microvm-synth:{uuid.uuid4().hex[:12]}"
    ctr = run(["buildah", "from", "scratch"])
    try:
        root = Path(run(["buildah", "mount", ctr]))
        (root / "bin").mkdir()
        shutil.copy2(shutil.which("busybox") or "", root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        (root / "etc").mkdir()
        (root / "etc" / "os-release").write_text("ID=synthetic\n")
        for i in range(guest_inits):
            gi = root / "nix" / "store" / f"{i}x-agentbox-guest-init" / "bin" / "agentbox-guest-init"
            gi.parent.mkdir(parents=True)
            gi.write_text("#!/bin/sh\necho fake guest init\n")
            gi.chmod(0o755)
        if payload_mib:
            data = root / "payload"
            data.mkdir()
            chunk = os.urandom(1024 * 1024)
            for i in range(payload_mib):
                (data / f"blob{i}").write_bytes(chunk[i % 256:] + chunk[: i % 256])
        run(["buildah", "umount", ctr])
        run(["buildah", "commit", "-q", ctr, tag], timeout=1800)
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, timeout=120)
    try:
        yield tag
    finally:
        subprocess.run(["buildah", "rmi", "-f", tag], capture_output=True, timeout=300)
