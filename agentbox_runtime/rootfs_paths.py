"""Paths inside an untrusted image rootfs, resolved as the guest would see them.

An image is untrusted: its symlinks and the paths its files name (``modules.dep``
entries, ``/bin/busybox``) may point anywhere. :func:`resolve_in_root` follows
symlinks component by component with the rootfs as ``/`` (an absolute link
target restarts at the rootfs, never at the host's root) and refuses any path
whose ``..`` would climb above the rootfs, so the host never reads a file
outside the image on an image's say-so.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from agentbox_runtime.errors import AgentboxError

MAX_LINKS = 40


class EscapesRoot(AgentboxError):
    """A path in the image leaves the image root (or loops)."""


def relative_entry(entry: str, what: str) -> str:
    """``entry`` (a path an image file names) if it is relative with no ``..``; raises otherwise."""
    parts = PurePosixPath(entry).parts
    if not entry or entry.startswith("/") or ".." in parts:
        raise EscapesRoot(f"refusing {what} entry {entry!r}: image paths must be relative and stay inside the image")
    return entry


def resolve_in_root(root: Path, path: str | PurePosixPath) -> Path:
    """The host path of guest path ``path`` under ``root``, symlinks followed inside ``root``.

    Raises :class:`EscapesRoot` when ``..`` climbs above ``root`` or symlinks loop. A
    missing final (or intermediate) component is returned as is, for the caller to find missing."""
    pending = list(PurePosixPath("/", path).parts[1:])
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                raise EscapesRoot(f"refusing image path {str(path)!r}: '..' leaves the image root {root}")
            resolved.pop()
            continue
        host = root.joinpath(*resolved, part)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            return root.joinpath(*resolved, part, *pending)
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_LINKS:
                raise EscapesRoot(f"refusing image path {str(path)!r}: too many symlinks")
            target = os.readlink(host)
            if target.startswith("/"):
                resolved = []
            pending = list(PurePosixPath(target).parts[1 if target.startswith("/") else 0:]) + pending
            continue
        resolved.append(part)
    return root.joinpath(*resolved)
