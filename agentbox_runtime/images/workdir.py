"""The temporary directory the Debian root is built in, removed only when nothing is mounted in it.

The apt step bind-mounts the host's /dev into the root. Deleting a root that
still has such a mount would delete host device nodes, so removal first
unmounts whatever is left (lazily, deepest first) and refuses to delete if a
mount survives. Directories left by a build that was killed are cleaned the
same way by the next build (which holds the build lock), if they are ours.

The work dirs live in a private per-user directory, ``$XDG_CACHE_HOME/agentbox/image-build/work``
(0700, checked), not in the shared temp dir; ``$AGENTBOX_BUILD_DIR`` picks another parent.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.images.steps import progress
from agentbox_runtime.private_dir import ensure_private

PREFIX = "agentbox-root-"
UMOUNT_TIMEOUT_S = 60.0


def _unescape(field: str) -> str:
    """Decode the octal escapes (``\\040`` for a space) of /proc/self/mounts."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: Path, mounts: Path = Path("/proc/self/mounts")) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    top = os.path.realpath(path)
    found = []
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) > 1:
            target = _unescape(fields[1])
            if target == top or target.startswith(top.rstrip("/") + "/"):
                found.append(target)
    return sorted(found, key=lambda t: t.count("/"), reverse=True)


def remove(path: Path) -> None:
    """Unmount what is left below ``path``, then delete it; refuse while a mount survives."""
    for target in mounts_under(path):
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=UMOUNT_TIMEOUT_S, check=False)
    remaining = mounts_under(path)
    if remaining:
        raise AgentboxError(f"image build: {path} still has mounts ({', '.join(remaining)}); not deleting it. "
                            "Unmount them, then remove the directory by hand")
    shutil.rmtree(path, ignore_errors=True)


def remove_stale(parent: Path) -> None:
    """Remove work dirs of earlier builds that were killed (call with the build lock held): only real
    directories of ours, so another user's directory of the same name is left alone."""
    for stale in sorted(parent.glob(f"{PREFIX}*")):
        st = os.lstat(stale)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            try:
                remove(stale)
                progress(f"removed {stale} left by an interrupted build")
            except AgentboxError as exc:
                progress(str(exc))


def default_parent() -> Path:
    """``$XDG_CACHE_HOME/agentbox/image-build/work``: private to the user (created 0700, checked)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return ensure_private(Path(base) / "agentbox" / "image-build" / "work")


@contextmanager
def work_dir() -> Iterator[Path]:
    """A fresh directory under ``$AGENTBOX_BUILD_DIR`` (default :func:`default_parent`), removed safely after."""
    override = os.environ.get("AGENTBOX_BUILD_DIR")
    parent = Path(override) if override else default_parent()
    remove_stale(parent)
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    try:
        yield path
    finally:
        remove(path)
