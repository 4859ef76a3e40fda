"""Interactive programs on a real pseudo-terminal in the guest, driven through the agent.

Backends whose console is not a terminal the host can reach (libkrun's console is
the helper's stdio, which carries the agent) still give a test a real tty: the
agent starts the program on a fresh pty (``pty_spawn``, with the host terminal's
window size) and the host polls it with ``pty_io`` (input in, output out), tells it
of a new window size with ``pty_resize``, then ``pty_close``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import select
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agentbox_guest_init.protocol import b64

MAX_WAIT_S = 5.0
MAX_SESSIONS = 16
READ_MAX = 1 << 16


@dataclass
class Session:
    """One program on a pty."""

    proc: subprocess.Popen[bytes]
    master: int


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on either end of a pty; a changed size sends SIGWINCH to its foreground process group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtySessions:
    """The agent's open pty sessions, by id."""

    def __init__(self) -> None:
        self.sessions: dict[int, Session] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()

    def spawn(self, argv: list[str], env: Mapping[str, str], cwd: str | None, rows: int, cols: int,
              demote: Callable[[], None]) -> dict[str, Any]:
        """Start ``argv`` as a session leader with the new pty as its controlling terminal."""
        if not argv:
            raise ValueError("pty_spawn needs a non-empty argv")
        with self.lock:
            if len(self.sessions) >= MAX_SESSIONS:
                raise ValueError(f"at most {MAX_SESSIONS} pty sessions at once")
        master, slave = os.openpty()
        set_winsize(slave, rows, cols)

        def child() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            demote()

        try:
            proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=dict(env), cwd=cwd,
                                    preexec_fn=child, close_fds=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        sid = next(self.ids)
        with self.lock:
            self.sessions[sid] = Session(proc, master)
        return {"ok": True, "pty": sid, "pid": proc.pid}

    def _get(self, sid: object) -> Session:
        with self.lock:
            session = self.sessions.get(sid) if isinstance(sid, int) else None
        if session is None:
            raise ValueError(f"no pty session {sid!r}")
        return session

    def resize(self, sid: object, rows: int, cols: int) -> dict[str, Any]:
        """Give the session's pty a new window size (checked by the caller,
        :func:`agentbox_guest_init.protocol.winsize`); the program's foreground process group gets SIGWINCH."""
        set_winsize(self._get(sid).master, rows, cols)
        return {"ok": True}

    def io(self, sid: object, data: bytes, wait_s: float) -> dict[str, Any]:
        """Write ``data``, then return what the program printed within ``wait_s``
        (sooner once something arrived) and its exit status once it ended."""
        s = self._get(sid)
        view = memoryview(data)
        while view:
            view = view[os.write(s.master, view):]
        out = bytearray()
        ready, _, _ = select.select([s.master], [], [], max(0.0, min(wait_s, MAX_WAIT_S)))
        while ready and len(out) < READ_MAX:
            try:
                chunk = os.read(s.master, READ_MAX - len(out))
            except OSError:  # EIO: every holder of the pty's other end is gone
                chunk = b""
            if not chunk:
                break
            out += chunk
            ready, _, _ = select.select([s.master], [], [], 0.02)
        status = s.proc.poll()
        return {"ok": True, "data": b64(bytes(out)), "exit_status": status if status is None else
                (128 - status if status < 0 else status)}

    def close(self, sid: object) -> dict[str, Any]:
        """Kill the session's process group and free its pty."""
        s = self._get(sid)
        with self.lock:
            self.sessions.pop(sid, None)  # type: ignore[call-overload]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait()
        os.close(s.master)
        return {"ok": True}


