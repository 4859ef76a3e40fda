"""``agentbox libkrun reset-nix --force``: delete and recreate libkrun-nix.raw (reference 5.5)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from runtime.disks import LIBKRUN_NIX, RawDisk, Runner, create
from runtime.errors import AgentboxError, InputError
from runtime.state import ensure_private_dir
from runtime.live_disks import RunningContainers, refuse_if_live

NEEDS_FORCE = ("refusing to reset libkrun /nix raw image without --force; this deletes and "
               "recreates libkrun-nix.raw with no backup")


def reset_nix(state_root: Path, force: bool, *, containers: RunningContainers | None = None,
              tools: Runner | None = None, extra_users: tuple[str, ...] = (), disk: RawDisk = LIBKRUN_NIX) -> Path:
    """Recreate the nix image (``disk``: libkrun by default, or the microvm one).

    ``force`` is checked before anything is probed or touched."""
    if not force:
        raise InputError(NEEDS_FORCE)
    path = disk.path(state_root)
    ensure_private_dir(state_root)
    refuse_if_live(path, "reset", containers, extra_users)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise AgentboxError(f"failed to inspect existing libkrun /nix raw image '{path}': {exc}") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"existing libkrun /nix raw image path '{path}' is not a regular "
                             "file; refusing to reset it")
        try:
            path.unlink()
        except OSError as exc:
            raise AgentboxError(f"failed to delete existing libkrun /nix raw image '{path}': {exc}") from None
    from runtime.disks import SubprocessRunner

    create(disk, path, tools or SubprocessRunner())
    return path
