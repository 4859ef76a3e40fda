"""A minimal QMP client: one command at a time over qemu's monitor socket, every reply checked.

QMP is line-delimited JSON. The server greets with ``{"QMP": ...}``, accepts nothing but
``qmp_capabilities`` first, and may interleave asynchronous ``{"event": ...}`` messages with
replies. :func:`execute` connects, negotiates, sends one command and returns its ``return``
value; an ``error`` reply, a closed socket or no reply within ``timeout`` is a :class:`QmpError`
that says which and shows the last message seen.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from agentbox_runtime.errors import AgentboxError

MAX_LINE = 1 << 20


class QmpError(AgentboxError, OSError):
    """The QMP exchange failed (an ``OSError`` too, so a caller falling back to a signal can catch it)."""


class _Lines:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.buf, self.last = sock, deadline, b"", ""

    def message(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"no QMP reply in time (last message: {self.last or 'none'})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QmpError(f"no QMP reply in time (last message: {self.last or 'none'})") from None
            if not chunk:
                raise QmpError(f"qemu closed the QMP socket (last message: {self.last or 'none'})")
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise QmpError("a QMP message longer than 1 MiB")
        line, self.buf = self.buf.split(b"\n", 1)
        self.last = line.decode(errors="replace")[:300]
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"not a QMP message: {self.last}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"not a QMP message: {self.last}")
        return msg

    def reply(self) -> dict[str, Any]:
        """The next ``return`` or ``error`` message, skipping events."""
        while True:
            msg = self.message()
            if "return" in msg or "error" in msg:
                return msg


def execute(path: Path, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 5.0) -> Any:
    """Run ``command`` (with ``arguments``) on the QMP socket at ``path``; its ``return`` value.
    Raises :class:`QmpError` on an ``error`` reply, a refused or closed socket, or a timeout."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise QmpError(f"cannot connect to QMP at {path}: {exc.strerror or exc}") from None
        lines = _Lines(sock, deadline)
        greeting = lines.message()
        if "QMP" not in greeting:
            raise QmpError(f"no QMP greeting from {path} (got: {lines.last})")
        for name, args in (("qmp_capabilities", None), (command, arguments)):
            request: dict[str, Any] = {"execute": name}
            if args:
                request["arguments"] = args
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = lines.reply()
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                raise QmpError(f"QMP {name} failed: {err.get('class', '?')}: {err.get('desc', lines.last)}")
        return reply["return"]
