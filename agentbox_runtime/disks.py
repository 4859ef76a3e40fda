"""Persistent raw btrfs disk images: create, validate, grow (reference 5.1, 5.2, 5.4).

A managed image is a sparse 64 GiB file formatted with ``mkfs.btrfs -L <label>``.
An existing path is reused only when it is a regular file of at least the
default size that ``blkid`` reports as btrfs; anything else is refused, never
reformatted. Growth is grow-only and sparse.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from agentbox_guest_init.contract import CONTAINERS_DISK, NIX_DISK, DiskSpec
from agentbox_runtime.errors import AgentboxError, InputError

DEFAULT_SIZE = 64 << 30
SIZE_HINT = "64G"
TOOL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RawDisk:
    """One managed image: file name, guest-facing spec and diagnostic name."""

    file_name: str
    spec: DiskSpec
    diag: str

    def path(self, state_root: Path) -> Path:
        return state_root / self.file_name


LIBKRUN_NIX = RawDisk("libkrun-nix.raw", NIX_DISK, "libkrun /nix raw image")
LIBKRUN_CONTAINERS = RawDisk("libkrun-containers.raw", CONTAINERS_DISK,
                             "libkrun container storage raw image")
MICROVM_NIX = RawDisk("microvm-nix.raw", NIX_DISK, "microvm persistent /nix dev cache disk")
MICROVM_CONTAINERS = RawDisk("microvm-containers.raw", CONTAINERS_DISK,
                             "microvm persistent container-store dev cache disk")
LIBKRUN_DISKS = (LIBKRUN_NIX, LIBKRUN_CONTAINERS)
MICROVM_DISKS = (MICROVM_NIX, MICROVM_CONTAINERS)


class Outcome(Enum):
    CREATED = "created"
    REUSED = "reused"


class Runner(Protocol):
    """Runs a host tool; the real one is :class:`SubprocessRunner`."""

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]: ...


class SubprocessRunner:
    """Runs tools with a timeout; a missing binary raises FileNotFoundError."""

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, timeout=TOOL_TIMEOUT_S)


def _detail(proc: subprocess.CompletedProcess[str]) -> str:
    err = proc.stderr.strip()
    return f": {err}" if err else ""


def filesystem_type(path: Path, diag: str, runner: Runner) -> str:
    """``blkid -o value -s TYPE <path>`` (empty when blkid finds nothing)."""
    try:
        proc = runner.run(["blkid", "-o", "value", "-s", "TYPE", str(path)])
    except FileNotFoundError:
        raise AgentboxError(
            f"blkid is required to validate the existing {diag}; install util-linux and retry"
        ) from None
    if proc.returncode == 2 and not proc.stdout.strip():
        return ""  # blkid: nothing recognised
    if proc.returncode != 0:
        raise AgentboxError(f"failed to detect filesystem type for '{path}'{_detail(proc)}")
    return proc.stdout.strip()


def filesystem_label(path: Path, diag: str, runner: Runner) -> str:
    """``blkid -o value -s LABEL <path>`` (empty when there is none)."""
    try:
        proc = runner.run(["blkid", "-o", "value", "-s", "LABEL", str(path)])
    except FileNotFoundError:
        raise AgentboxError(f"blkid is required to validate the existing {diag}; install util-linux and retry") from None
    if proc.returncode == 2 and not proc.stdout.strip():
        return ""
    if proc.returncode != 0:
        raise AgentboxError(f"failed to read the filesystem label of '{path}'{_detail(proc)}")
    return proc.stdout.strip()


def validate(disk: RawDisk, path: Path, runner: Runner, min_size: int = DEFAULT_SIZE) -> int:
    """Check an existing image; return its size. Raises :class:`InputError`."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"existing {disk.diag} path '{path}' is not a regular file; refusing to overwrite it")
    if st.st_size < min_size:
        raise InputError(
            f"existing {disk.diag} '{path}' is {st.st_size} bytes, below the required {min_size} "
            f"bytes; stop the VM, extend it with 'truncate -s {SIZE_HINT} {path}', then retry")
    fstype = filesystem_type(path, disk.diag, runner)
    if fstype != "btrfs":
        raise InputError(
            f"existing {disk.diag} '{path}' has filesystem type '{fstype or 'unknown'}', "
            "expected btrfs; refusing to reformat automatically")
    return st.st_size


def _set_length(path: Path, flags: int, size: int, open_error: str, size_error: str) -> None:
    """Open ``path`` with ``flags`` and set its length (sparse); errors carry the given texts.

    A file this call created exclusively (``O_EXCL``) is removed again if its
    length cannot be set."""
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise AgentboxError(f"{open_error}: {exc}") from None
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        if flags & os.O_EXCL:
            path.unlink(missing_ok=True)
        raise AgentboxError(f"{size_error}: {exc}") from None
    finally:
        os.close(fd)


def create(disk: RawDisk, path: Path, runner: Runner, size: int = DEFAULT_SIZE) -> None:
    """Create a sparse image exclusively and format it; delete it if mkfs fails."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _set_length(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, size,
                f"failed to create {disk.diag} '{path}'",
                f"failed to set {disk.diag} '{path}' to {size} bytes")
    try:
        proc = runner.run(["mkfs.btrfs", "-f", "-L", disk.spec.label, str(path)])
    except FileNotFoundError:
        path.unlink(missing_ok=True)
        raise AgentboxError(
            f"mkfs.btrfs is required to create the {disk.diag}; install btrfs-progs and retry"
        ) from None
    if proc.returncode != 0:
        path.unlink(missing_ok=True)
        raise AgentboxError(f"failed to format new {disk.diag} '{path}' as btrfs") from AgentboxError(
            f"mkfs.btrfs failed for '{path}'{_detail(proc)}")


def prepare(disk: RawDisk, state_root: Path, runner: Runner | None = None) -> Outcome:
    """Create the image under ``state_root`` or validate and reuse it."""
    runner = runner or SubprocessRunner()
    path = disk.path(state_root)
    if os.path.lexists(path):
        validate(disk, path, runner)
        return Outcome.REUSED
    create(disk, path, runner)
    return Outcome.CREATED


def prepare_all(disks: Sequence[RawDisk], state_root: Path,
                runner: Runner | None = None) -> list[Outcome]:
    """Prepare several images in order (nix first, then containers)."""
    return [prepare(d, state_root, runner) for d in disks]


def grow(disk: RawDisk, path: Path, target: int, runner: Runner | None = None,
         before_grow: Callable[[], None] | None = None) -> int:
    """Grow an existing valid image to ``target`` bytes (sparse); return the old size.

    Shrinking and equal sizes are refused. Nothing is formatted."""
    runner = runner or SubprocessRunner()
    if not os.path.lexists(path):
        raise InputError(
            f"{disk.diag} '{path}' does not exist; run agentbox libkrun once to create it before resizing")
    current = validate(disk, path, runner)
    label = filesystem_label(path, disk.diag, runner)
    if label != disk.spec.label:
        raise InputError(f"existing {disk.diag} '{path}' has btrfs label '{label or 'none'}', expected "
                         f"'{disk.spec.label}'; refusing to grow a disk that is not this one")
    if target <= current:
        raise InputError(
            f"target size {target} bytes must be greater than existing {disk.diag} size {current} "
            "bytes; shrinking and equal-size resize are refused")
    if before_grow is not None:
        before_grow()
    _set_length(path, os.O_WRONLY, target, f"failed to open {disk.diag} '{path}'",
                f"failed to grow {disk.diag} '{path}' to {target} bytes")
    return current
