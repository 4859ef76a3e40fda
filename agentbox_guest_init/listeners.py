"""Listening sockets the guest agent serves extra channels on (stdlib only: runs in the guest).

- :func:`vsock_listener`: a vsock port (the host reaches it through the VMM:
  libkrun's ``krun_add_vsock_port2`` bridges a host unix socket to it);
- :func:`tcp_listener`: a TCP port (a krun-podman guest's port, published by
  Podman on the host's 127.0.0.1; every connection authenticates first);
- :func:`accept_forever`: one daemon thread accepting connections, each served
  by its own thread and closed when the handler returns.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

BACKLOG = 8


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


def _serve_one(conn: socket.socket, handler: Callable[[socket.socket], object]) -> None:
    try:
        handler(conn)
    finally:
        conn.close()


def accept_forever(listener: socket.socket, handler: Callable[[socket.socket], object], name: str) -> threading.Thread:
    """Accept on ``listener`` in a daemon thread named ``name``; each connection is handed to
    ``handler`` on a thread of its own and closed after it."""

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_serve_one, args=(conn, handler), name=f"{name}-conn", daemon=True).start()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
