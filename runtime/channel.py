"""Host side of the guest control channel (the agent of ``agentbox-guest-init agent``).

:class:`AgentClient` speaks the framed protocol of :mod:`guest_init.protocol`
over any byte stream: a connected unix socket (qemu exposes the agent's
virtio-serial port as ``agent.sock``), a pair of pipes such as a
``podman run -i`` process's stdout/stdin, or raw file descriptors. Every call
has a timeout; a timeout error shows the last non-frame bytes seen on the
stream (kernel messages, a shell's complaint), which usually say why.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from guest_init.protocol import FrameReader, b64, encode_frame, unb64, write_all

RUN_MARGIN_S = 10.0  # the channel waits this much longer than a command's own timeout


class ChannelError(RuntimeError):
    """The agent did not answer in time, the stream closed, or the agent reported a failure."""


class ChannelTimeout(ChannelError):
    """No answer within the call's timeout."""


@dataclass(frozen=True)
class RunResult:
    """What a guest command did."""

    exit_status: int
    stdout: bytes
    stderr: bytes
    duration_s: float
    timed_out: bool = False
    signal: int | None = None

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")


def _fd(stream: int | IO[bytes] | socket.socket) -> int:
    return stream if isinstance(stream, int) else stream.fileno()


class AgentClient:
    """Requests written to ``writer``, responses read from ``reader`` (the same object for a socket).

    ``reader``/``writer`` are file descriptors or objects with ``fileno()``.
    Calls may come from several threads; each waits for its own response id.
    """

    def __init__(self, reader: int | IO[bytes] | socket.socket, writer: int | IO[bytes] | socket.socket | None = None,
                 closer: Any = None) -> None:
        self.rfd = _fd(reader)
        self.wfd = self.rfd if writer is None else _fd(writer)
        self.reader = FrameReader()
        self.ids = itertools.count(1)
        self.pending: dict[int, dict[str, Any]] = {}
        self.closer = closer
        self.closed = False
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()

    @classmethod
    def connect_unix(cls, path: Path | str, timeout: float) -> AgentClient:
        """Connect to a unix socket, retrying until ``timeout``."""
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return cls(s, closer=s)
            except OSError as exc:
                last = exc
                s.close()
            if time.monotonic() >= deadline:
                raise ChannelError(f"cannot connect to agent socket {path} within {timeout:g}s: {last}")
            time.sleep(0.1)

    @classmethod
    def over_process(cls, proc: subprocess.Popen[bytes]) -> AgentClient:
        """Talk to an agent running as ``proc`` (stdin and stdout must be pipes)."""
        if proc.stdin is None or proc.stdout is None:
            raise ValueError("the agent process needs stdin=PIPE and stdout=PIPE")
        return cls(proc.stdout, proc.stdin)

    def close(self) -> None:
        """Close the stream this client owns (a socket from :meth:`connect_unix`)."""
        self.closed = True
        if self.closer is not None:
            self.closer.close()

    def noise(self) -> str:
        """The last non-frame bytes seen on the stream."""
        return self.reader.tail()[-2000:].decode("utf-8", "replace")

    def _send(self, message: dict[str, Any]) -> None:
        with self._write_lock:
            try:
                write_all(self.wfd, encode_frame(message))
            except OSError as exc:
                raise ChannelError(f"cannot send '{message.get('op')}' to the agent: {exc}; "
                                   f"last bytes seen on the channel: {self.noise()!r}") from None

    def _pump(self, op: str, rid: int, deadline: float, timeout: float) -> None:
        """Read until response ``rid`` arrived (another thread may read it for us)."""
        while rid not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout(f"agent did not answer '{op}' within {timeout:g}s; last bytes seen on the "
                                     f"channel: {self.noise()!r}")
            if not self._read_lock.acquire(timeout=min(left, 0.2)):
                continue
            try:
                if rid in self.pending:
                    return
                ready, _, _ = select.select([self.rfd], [], [], min(left, 0.2))
                if not ready:
                    continue
                data = os.read(self.rfd, 1 << 16)
                if not data:
                    raise ChannelError(f"agent channel closed while waiting for '{op}'; last bytes seen on the "
                                       f"channel: {self.noise()!r}")
                for frame in self.reader.feed(data):
                    if isinstance(frame.get("id"), int):
                        self.pending[frame["id"]] = frame
            finally:
                self._read_lock.release()

    def request(self, op: str, wait_s: float, /, **fields: Any) -> dict[str, Any]:
        """Send one request and wait up to ``wait_s`` seconds for its response."""
        if self.closed:
            raise ChannelError(f"agent channel is closed; cannot send '{op}'")
        rid = next(self.ids)
        deadline = time.monotonic() + wait_s
        self._send({"op": op, "id": rid, **fields})
        self._pump(op, rid, deadline, wait_s)
        resp = self.pending.pop(rid)
        if not resp.get("ok"):
            raise ChannelError(f"agent '{op}' failed: {resp.get('error')}")
        return resp

    def ping(self, timeout: float) -> dict[str, Any]:
        """``pong`` with the agent's pid and uid."""
        return self.request("ping", timeout)

    def wait_ready(self, timeout: float, per_try: float = 2.0) -> None:
        """Ping until the agent answers (the guest may still be booting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ping(min(per_try, max(0.1, deadline - time.monotonic())))
                return
            except ChannelTimeout:
                if time.monotonic() >= deadline:
                    raise

    def run(self, argv: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
            user: str | None = None, stdin: bytes | None = None) -> RunResult:
        """Run ``argv`` in the guest (as dev unless ``user="root"``); the process group is killed at ``timeout``."""
        resp = self.request("run", timeout + RUN_MARGIN_S, argv=list(argv), env=env or {}, cwd=cwd, user=user,
                            timeout=timeout, stdin=b64(stdin or b""))
        return RunResult(int(resp["exit_status"]), unb64(resp.get("stdout")), unb64(resp.get("stderr")),
                         float(resp.get("duration_s", 0.0)), bool(resp.get("timed_out")), resp.get("signal"))

    def read_file(self, path: str, timeout: float = 30.0) -> bytes:
        """The bytes of guest file ``path``."""
        return unb64(self.request("read_file", timeout, path=path)["data"])

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644, owner: str | None = None,
                   timeout: float = 30.0) -> None:
        """Write guest file ``path`` (parents created) with ``mode`` and ``owner`` (``dev``/``root``)."""
        self.request("write_file", timeout, path=path, data=b64(data), mode=mode, owner=owner)

    def prep_status(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """The ``nix`` or ``podman`` prep status fields (state, pid, error, log_path, ...)."""
        return self.request("prep_status", timeout, kind=kind)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the agent to exit (a qemu guest then powers off)."""
        self.request("shutdown", timeout)
