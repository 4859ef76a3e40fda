"""``agentbox libkrun reset-nix --force``: delete and recreate libkrun-nix.raw (reference 5.5)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agentbox_runtime.disks import LIBKRUN_NIX, RawDisk, Runner, SubprocessRunner, create
from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.live_disks import RunningContainers, refuse_if_live
from agentbox_runtime.state import maintenance_lock, open_state_dir


def needs_force(disk: RawDisk = LIBKRUN_NIX) -> str:
    """The refusal printed when ``--force`` is missing."""
    return (f"refusing to reset {disk.diag} without --force; this deletes and recreates "
            f"{disk.file_name} with no backup")



def reset_nix(state_root: Path, force: bool, *, containers: RunningContainers | None = None,
              tools: Runner | None = None, extra_users: tuple[str, ...] = (),
              disk: RawDisk = LIBKRUN_NIX) -> Path:
    """Delete and recreate the /nix image under ``state_root``; return its path.

    ``disk`` is the libkrun image by default (the harness passes the microvm
    one). ``force`` is checked before anything is probed or touched; then a
    running guest that uses the image refuses the reset (fail closed); a path
    that is not a regular file is refused; the containers image is never
    touched. ``extra_users`` names users that other backends know of."""
    if not force:
        raise InputError(needs_force(disk))
    path = disk.path(state_root)
    dir_fd = open_state_dir(state_root)  # every ownership and symlink check before anything destructive
    with maintenance_lock(state_root, f"reset {disk.file_name}"):
        _reset(disk, path, dir_fd, containers, tools, extra_users)
    return path


def _reset(disk: RawDisk, path: Path, dir_fd: int, containers: RunningContainers | None, tools: Runner | None,
           extra_users: tuple[str, ...]) -> None:
    try:
        refuse_if_live(path, "reset", containers, extra_users)
        try:
            st = os.lstat(path.name, dir_fd=dir_fd)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise AgentboxError(f"failed to inspect existing {disk.diag} '{path}': {exc}") from None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"existing {disk.diag} path '{path}' is not a regular "
                                 "file; refusing to reset it")
            try:
                os.unlink(path.name, dir_fd=dir_fd)
            except OSError as exc:
                raise AgentboxError(f"failed to delete existing {disk.diag} '{path}': {exc}") from None
        create(disk, path, tools or SubprocessRunner())
    finally:
        os.close(dir_fd)
