"""The guest's console log, bounded: a guest that prints without end cannot fill the host's disk.

The VMM writes the console into a pipe or socket; :class:`ConsoleRecorder` copies
it into ``console.log`` in a thread. When ``console.log`` reaches half the cap it
becomes ``console.log.1`` (replacing the previous one) and a new ``console.log``
starts, so the two files together never hold more than the cap, and the newest
output is always there. The cap is ``AGENTBOX_CONSOLE_LOG_MAX`` bytes (default
32 MiB; at least 64 KiB).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import BinaryIO, Final

from agentbox_runtime.errors import InputError

ENV_MAX: Final = "AGENTBOX_CONSOLE_LOG_MAX"
DEFAULT_MAX: Final = 32 << 20
MIN_MAX: Final = 64 << 10
CHUNK: Final = 65536


def log_cap() -> int:
    """The cap in bytes from ``AGENTBOX_CONSOLE_LOG_MAX`` (default 32 MiB); a bad value is an
    :class:`InputError` naming it."""
    raw = os.environ.get(ENV_MAX, "").strip()
    if not raw:
        return DEFAULT_MAX
    if not raw.isdigit() or int(raw) < MIN_MAX:
        raise InputError(f"{ENV_MAX}={raw!r} is not accepted: give a number of bytes, at least {MIN_MAX}")
    return int(raw)


def rotated(path: Path) -> Path:
    """Where the older half of ``path`` goes (``console.log.1``)."""
    return path.with_name(path.name + ".1")


class ConsoleRecorder:
    """Copy one console stream (a socket, or the read end of a pipe) into ``path``, capped.

    ``start()`` runs the copy in a daemon thread until the stream ends; ``join()`` waits
    for it. :meth:`write` is the same copy for callers that already hold the bytes."""

    def __init__(self, path: Path, cap: int | None = None) -> None:
        self.path = path
        self.half = max(MIN_MAX, cap if cap is not None else log_cap()) // 2
        self.dropped_files = 0
        self._out: BinaryIO = open(path, "ab")  # noqa: SIM115 - the recorder's file, closed by _rotate or the copy's end
        self._size = self._out.tell()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating whenever the current file reaches half the cap."""
        with self._lock:
            while data:
                room = self.half - self._size
                if room <= 0:
                    self._rotate()
                    continue
                piece, data = data[:room], data[room:]
                self._out.write(piece)
                self._out.flush()
                self._size += len(piece)

    def _rotate(self) -> None:
        self._out.close()
        os.replace(self.path, rotated(self.path))
        self.dropped_files += 1
        self._out = open(self.path, "wb")  # noqa: SIM115 - as in __init__
        self._size = 0

    def start(self, source: socket.socket | int) -> ConsoleRecorder:
        """Copy from ``source`` (a connected socket, or a readable fd the recorder then owns)."""
        self._thread = threading.Thread(target=self._copy, args=(source,), name=f"console {self.path}",
                                        daemon=True)
        self._thread.start()
        return self

    def _copy(self, source: socket.socket | int) -> None:
        try:
            while True:
                try:
                    chunk = source.recv(CHUNK) if isinstance(source, socket.socket) else os.read(source, CHUNK)
                except OSError:
                    break
                if not chunk:
                    break
                self.write(chunk)
        finally:
            if isinstance(source, socket.socket):
                source.close()
            else:
                os.close(source)
            with self._lock:
                self._out.close()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the stream to end."""
        if self._thread is not None:
            self._thread.join(timeout)


class ConsoleListener:
    """A unix socket the VMM connects to at start (qemu ``-chardev socket,server=off``); the
    connection is recorded by a :class:`ConsoleRecorder`."""

    def __init__(self, sock_path: Path, log_path: Path, cap: int | None = None) -> None:
        self.sock_path = sock_path
        self.recorder = ConsoleRecorder(log_path, cap)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock_path.unlink(missing_ok=True)
        self._listener.bind(str(sock_path))
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._accept, name=f"console accept {sock_path}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return  # closed before the VMM connected
        finally:
            self._listener.close()
        self.recorder.start(conn)

    def close(self, timeout: float = 2.0) -> None:
        """Stop waiting for a connection and let the copy finish (up to ``timeout`` s)."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout)
        self.recorder.join(timeout)
        self.sock_path.unlink(missing_ok=True)
