"""Host-side helpers every VMM driver shares: the qemu binary and cache dir, short socket dirs, log tails, and
tying a VMM process's life to the process that started it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from pathlib import Path

from agentbox_runtime.private_dir import runtime_dir


def qemu_binary() -> str:
    """``qemu-system-<this machine's architecture>``."""
    return f"qemu-system-{os.uname().machine}"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/agentbox/qemu`` (initramfs bases, decompressed kernels, KVM verdicts)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agentbox" / "qemu"


def socket_dir(task_dir: Path) -> Path:
    """A short private dir for the task's unix sockets (paths are limited to 107 bytes).

    Under the per-user runtime dir (:func:`agentbox_runtime.private_dir.runtime_dir`), never a
    shared /tmp path; a dir that is not ours and private is refused."""
    key = hashlib.sha256(str(task_dir).encode()).hexdigest()[:12]
    return runtime_dir("vm", key, for_sockets=True)


def tail_bytes(path: Path, limit: int) -> bytes:
    """The last ``limit`` bytes of a file (never reads more; empty when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - limit))
            return f.read(limit)
    except OSError:
        return b""


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file (for error messages), continued from its rotated older half
    (``<path>.1``, see :mod:`agentbox_runtime.vmm.console_log`) when the current file is short."""
    if not path.exists():
        return "(no console output)"
    text = tail_bytes(path, 16384).decode("utf-8", "replace")
    older = path.with_name(path.name + ".1")
    if len(text.splitlines()) < lines and older.exists():
        text = tail_bytes(older, 16384).decode("utf-8", "replace") + text
    return "\n".join(text.splitlines()[-lines:]) or "(empty console log)"


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGKILL): qemu dies when the process that started it dies."""
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
