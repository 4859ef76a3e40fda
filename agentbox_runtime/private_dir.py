"""Per-user private directories for runtime files (sockets, generated configs).

Never a predictable shared ``/tmp`` path: the base is ``$XDG_RUNTIME_DIR/agentbox``
when that runtime dir is ours and private, else ``<cache home>/agentbox/run``.
Every directory this module creates or reuses is checked after the fact with
``lstat``: it must be a real directory (not a symlink), owned by the effective
user, and neither group- nor world-accessible. Anything else is refused, so
another local user who created the path first cannot plant sockets, configs or
symlinks in it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agentbox_runtime.errors import AgentboxError


class UnsafeDirectory(AgentboxError):
    """A private directory exists but belongs to someone else, is shared, or is a symlink."""


def check_private(path: Path) -> Path:
    """``path`` if it is a real directory owned by us with no group/other access; raises otherwise."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafeDirectory(f"private directory {path} cannot be checked: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"refusing private directory {path}: it is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"refusing private directory {path}: not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(f"refusing private directory {path}: owned by uid {st.st_uid}, not {os.geteuid()}")
    if st.st_mode & 0o077:
        raise UnsafeDirectory(f"refusing private directory {path}: mode {stat.S_IMODE(st.st_mode):o} "
                              "is group- or world-accessible (accepted: 0700)")
    return path


def ensure_private(path: Path) -> Path:
    """Create ``path`` (0700, parents as needed) or reuse it if it passes :func:`check_private`."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    return check_private(path)


def _runtime_base() -> Path | None:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg or not os.path.isabs(xdg):
        return None
    try:
        check_private(Path(xdg))
    except UnsafeDirectory:
        return None
    return Path(xdg)


SOCKET_DIR_MAX = 72
"""Longest dir :func:`runtime_dir` returns for sockets: unix socket paths are limited to 107 bytes."""


def runtime_dir(*parts: str, for_sockets: bool = False) -> Path:
    """``$XDG_RUNTIME_DIR/agentbox/<parts>`` (else ``<cache>/agentbox/run/<parts>``), each level private.

    With ``for_sockets``, a result longer than :data:`SOCKET_DIR_MAX` moves to
    ``/tmp/agentbox-<uid>/<parts>``, which is checked like every other level (a
    dir someone else created there is refused, never used)."""
    base = _runtime_base()
    if base is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        top = cache / "agentbox" / "run"
    else:
        top = base / "agentbox"
    if for_sockets and len(str(top.joinpath(*parts))) > SOCKET_DIR_MAX:
        top = Path("/tmp") / f"agentbox-{os.geteuid()}"
    elif base is None:
        (cache / "agentbox").mkdir(parents=True, exist_ok=True)  # the user's own cache: not checked
    path = ensure_private(top)
    for part in parts:
        path = ensure_private(path / part)
    return path
