"""Which process a recorded pid is, and signalling exactly that process.

A pid recorded earlier (a VMM in a task record, a preserved guest, a container's shim) may have
exited and been reused. A process is named here by its pid *and* its start time (field 22 of
``/proc/<pid>/stat``, clock ticks since boot); :func:`same_process` checks both, and
:func:`send_signal` signals through a pidfd held across that check, so a reused pid is never hit.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), None if gone."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def session_members(sid: int) -> list[tuple[int, str]]:
    """``(pid, start time)`` of every live process in session ``sid`` (a VMM started with
    ``start_new_session`` leads one: the helper, the qemu it runs, their helpers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and len(fields) > 19 and fields[3] == str(sid) and fields[0] != "Z":
            out.append((int(entry.name), fields[19]))
    return out


def alive(pid: int) -> bool:
    """``pid`` names a process (any owner; a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def same_process(pid: int, start: object) -> bool:
    """``pid`` is alive (a zombie is not) and, when ``start`` is known, is the process that was recorded
    (not a reused pid)."""
    if not alive(pid) or (start is not None and start_time(pid) != start):
        return False
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def send_signal(pid: int, start: object, sig: int, *, group: bool = False) -> bool:
    """Send ``sig`` to ``pid`` (to its process group when ``group``) only while it is the recorded
    process; False when it is not (gone, reused, or not ours to signal)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            return False
        pidfd = -1  # a kernel without pidfds: the start time is checked just before the signal
    try:
        if not same_process(pid, start):
            return False
        if group:
            os.killpg(pid, sig)
        elif pidfd >= 0:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if pidfd >= 0:
            os.close(pidfd)
