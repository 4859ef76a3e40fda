"""Which state under ``--root`` ``agentbox-krun-runtime`` believes.

``kill`` and ``delete`` signal the pid a container's ``state.json`` names, so a record another
local user could write would let them have any process of ours killed. The record is read
only through descriptors opened without following a link, level by level, and believed only
when nobody else can have written it:

- ``--root``: a real directory (not a symlink) owned by the effective user and not writable by
  group or others (it may be readable: ``/run``-style roots are ``0755``);
- ``<root>/agentbox-krun`` and ``<root>/agentbox-krun/<id>``: real directories owned by the
  effective user with mode ``0700`` or stricter (the runtime makes them so);
- ``state.json``: a regular file owned by the effective user, not writable by group or
  others, at most :data:`MAX_STATE_BYTES`, holding the record the runtime writes (its own id, an
  integer pid, the pid's start time as digits or null).

Anything else is refused with one line and nothing is signalled. A container id with no entry
under the root at all is not ours (it may be runc's): the caller gets None.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.private_dir import make_dir_0700

MAX_STATE_BYTES = 64 << 10
STATE_FILE = "state.json"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UntrustedState(AgentboxError):
    """State under ``--root`` that another user could have written: refused, never acted on."""


def _accepted(strict: bool) -> str:
    uid = os.geteuid()
    if strict:
        return f"accepted: a real directory owned by uid {uid} with mode 0700 or stricter"
    return f"accepted: a real directory owned by uid {uid}, not writable by group or others (0700 or 0755)"


def _refuse(path: Path, why: str, accepted: str) -> UntrustedState:
    return UntrustedState(f"refusing the runtime state at {path}: {why}; {accepted}")


def check_dir_fd(fd: int, path: Path, *, strict: bool) -> None:
    """Raise :class:`UntrustedState` unless the directory ``fd`` holds is ours and, with ``strict``,
    private (no group/other bits), else at least not group/other-writable."""
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"it is owned by uid {st.st_uid}", _accepted(strict))
    if st.st_mode & (0o077 if strict else 0o022):
        raise _refuse(path, f"its mode is {stat.S_IMODE(st.st_mode):04o}", _accepted(strict))


def open_dir(name: str | Path, dir_fd: int | None, shown: Path, *, strict: bool) -> int:
    """``name`` (relative to ``dir_fd``) opened as a directory without following a link and checked
    by :func:`check_dir_fd`; the caller closes it. FileNotFoundError passes through."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        is_link = stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
        raise _refuse(shown, "it is a symlink" if is_link else "it is not a directory", _accepted(strict)) from None
    try:
        check_dir_fd(fd, shown, strict=strict)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_root(root: Path) -> None:
    """Make ``--root`` (``0700``) when it is missing, then check it as :func:`read_record` does."""
    make_dir_0700(root)
    os.close(open_dir(root, None, root, strict=False))


def _read_file(dir_fd: int, shown: Path) -> bytes | None:
    try:
        fd = os.open(STATE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise _refuse(shown, why, _file_accepted()) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(shown, "it is not a regular file", _file_accepted())
        if st.st_uid != os.geteuid():
            raise _refuse(shown, f"it is owned by uid {st.st_uid}", _file_accepted())
        if st.st_mode & 0o022:
            raise _refuse(shown, f"its mode is {stat.S_IMODE(st.st_mode):04o}", _file_accepted())
        data = f.read(MAX_STATE_BYTES + 1)
    if len(data) > MAX_STATE_BYTES:
        raise _refuse(shown, f"it is over {MAX_STATE_BYTES} bytes", _file_accepted())
    return data


def _file_accepted() -> str:
    return (f"accepted: a regular file owned by uid {os.geteuid()}, not writable by group or others, "
            f"of at most {MAX_STATE_BYTES} bytes")


def _checked_record(data: bytes, container_id: str, shown: Path) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        record = None
    accepted = "accepted: the record this runtime writes (its id, an integer pid, the pid's start time)"
    if not isinstance(record, dict) or record.get("id") != container_id:
        raise _refuse(shown, f"it is not a record of container {container_id}", accepted)
    pid, start = record.get("pid"), record.get("pid_start")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise _refuse(shown, "its pid is not a non-negative integer", accepted)
    if start is not None and not (isinstance(start, str) and start.isdigit()):
        raise _refuse(shown, "its pid start time is not a number", accepted)
    return record


def read_record(root: Path, subdir: str, container_id: str) -> dict[str, Any] | None:
    """The record of ``container_id`` under ``root/subdir``, or None when there is none (the
    container is not this runtime's). :class:`UntrustedState` when any level could have been
    written by someone else (see the module docstring)."""
    base = root / subdir
    if not os.path.lexists(base / container_id):
        return None
    opened: list[int] = []
    try:
        opened.append(open_dir(root, None, root, strict=False))
        opened.append(open_dir(subdir, opened[-1], base, strict=True))
        opened.append(open_dir(container_id, opened[-1], base / container_id, strict=True))
        data = _read_file(opened[-1], base / container_id / STATE_FILE)
    except FileNotFoundError:
        return None
    finally:
        for fd in opened:
            os.close(fd)
    if data is None:
        return None
    return _checked_record(data, container_id, base / container_id / STATE_FILE)
