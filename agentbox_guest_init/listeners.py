"""Listening sockets the guest agent serves extra channels on (stdlib only: runs in the guest).

- :func:`vsock_listener`: a vsock port (the host reaches it through the VMM:
  libkrun's ``krun_add_vsock_port2`` bridges a host unix socket to it);
- :func:`tcp_listener`: a TCP port (a krun-podman guest's port, published by
  Podman on the host's 127.0.0.1; every connection authenticates first);
- :func:`accept_forever`: one daemon thread accepting connections, each served
  by its own thread and closed when the handler returns;
- :class:`PreauthGate`: how many connections of a listener may be waiting to
  authenticate at once, and how many bytes they may hold in all (a connection
  over either limit is closed at once; one that authenticated no longer counts).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

BACKLOG = 8
PREAUTH_CONNECTIONS = 8
"""Connections that may be waiting to authenticate at once, per listener."""
PREAUTH_TOTAL_BYTES = 64 << 10
"""Bytes all connections of a listener may hold before they authenticated, together."""


class PreauthGate:
    """The pre-authentication budget of one listener: at most ``connections`` unauthenticated
    connections at once, holding at most ``total_bytes`` of buffered input together."""

    def __init__(self, connections: int = PREAUTH_CONNECTIONS, total_bytes: int = PREAUTH_TOTAL_BYTES) -> None:
        self.connections, self.total_bytes = connections, total_bytes
        self.waiting = 0
        self.buffered = 0
        self.peak_buffered = 0
        """The most bytes held at once (for the tests' accounting)."""
        self.refused = 0
        self._lock = threading.Lock()

    def admit(self) -> Admission | None:
        """A slot for a new connection, or None when every slot is taken (close the connection)."""
        with self._lock:
            if self.waiting >= self.connections:
                self.refused += 1
                return None
            self.waiting += 1
        return Admission(self)

    def _hold(self, old: int, new: int) -> bool:
        with self._lock:
            if self.buffered - old + new > self.total_bytes:
                return False
            self.buffered += new - old
            self.peak_buffered = max(self.peak_buffered, self.buffered)
            return True

    def _leave(self, held: int) -> None:
        with self._lock:
            self.waiting -= 1
            self.buffered -= held


class Admission:
    """One connection's place in a :class:`PreauthGate` until it authenticated or closed."""

    def __init__(self, gate: PreauthGate) -> None:
        self.gate = gate
        self.held = 0
        self.released = False
        self._lock = threading.Lock()

    def hold(self, nbytes: int) -> bool:
        """Record that this connection now buffers ``nbytes``; False when that would take the gate's
        total over its limit (close the connection)."""
        with self._lock:
            if self.released:
                return True
            if not self.gate._hold(self.held, nbytes):
                return False
            self.held = nbytes
            return True

    def release(self) -> None:
        """The connection authenticated or closed: free its slot and bytes (idempotent)."""
        with self._lock:
            if self.released:
                return
            self.released = True
            self.gate._leave(self.held)
            self.held = 0


def vsock_listener(port: int) -> socket.socket:
    """A vsock socket listening on ``port`` for any CID (OSError without a vsock transport)."""
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        s.bind((socket.VMADDR_CID_ANY, port))
        s.listen(BACKLOG)
    except OSError:
        s.close()
        raise
    return s


def tcp_listener(port: int) -> socket.socket:
    """A TCP socket listening on ``port`` on every guest address."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(BACKLOG)
    except OSError:
        s.close()
        raise
    return s


Handler = Callable[[socket.socket, Admission | None], object]
"""Serves one accepted connection; its admission (None without a gate) is released after it returns."""


def _serve_one(conn: socket.socket, handler: Handler, admission: Admission | None) -> None:
    try:
        handler(conn, admission)
    finally:
        if admission is not None:
            admission.release()
        conn.close()


def accept_forever(listener: socket.socket, handler: Handler, name: str,
                   gate: PreauthGate | None = None) -> threading.Thread:
    """Accept on ``listener`` in a daemon thread named ``name``; each connection is handed to
    ``handler`` on a thread of its own and closed after it. With a ``gate``, a connection that finds
    every pre-authentication slot taken is closed at once, before any byte of it is read."""

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            admission = gate.admit() if gate is not None else None
            if gate is not None and admission is None:
                conn.close()
                continue
            threading.Thread(target=_serve_one, args=(conn, handler, admission), name=f"{name}-conn",
                             daemon=True).start()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
