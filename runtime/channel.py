"""Host side of the guest control channel (the agent of ``agentbox-guest-init agent``).

:class:`AgentClient` speaks the framed protocol of :mod:`guest_init.protocol`
over any byte stream: a connected unix socket (qemu exposes the agent's
virtio-serial port as ``agent.sock``) or a pair of pipes. Every call has a
timeout; a timeout error shows the last non-frame bytes seen on the stream.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guest_init.protocol import FrameReader, b64, encode_frame, unb64


class ChannelError(RuntimeError):
    """The agent did not answer in time, or the stream closed."""


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
        return self.stdout.decode("utf-8", "replace")


class AgentClient:
    """Requests over ``rfd``/``wfd`` (the same fd for a socket)."""

    def __init__(self, rfd: int, wfd: int | None = None, closer: Any = None) -> None:
        self.rfd, self.wfd = rfd, rfd if wfd is None else wfd
        self.reader = FrameReader()
        self.ids = itertools.count(1)
        self.pending: dict[int, dict[str, Any]] = {}
        self.closer = closer

    @classmethod
    def connect_unix(cls, path: Path, timeout: float) -> AgentClient:
        """Connect to a unix socket, retrying until ``timeout``."""
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return cls(s.fileno(), closer=s)
            except OSError as exc:
                last = exc
                s.close()
                time.sleep(0.1)
        raise ChannelError(f"cannot connect to agent socket {path} within {timeout:.0f}s: {last}")

    def close(self) -> None:
        if self.closer is not None:
            self.closer.close()

    def noise(self) -> str:
        return self.reader.noise[-2000:].decode("utf-8", "replace")

    def request(self, op: str, wait_s: float, **fields: Any) -> dict[str, Any]:
        """Send one request and wait up to ``wait_s`` seconds for its response."""
        timeout = wait_s
        rid = next(self.ids)
        os.write(self.wfd, encode_frame({"op": op, "id": rid, **fields}))
        deadline = time.monotonic() + timeout
        while rid not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelError(f"agent did not answer '{op}' within {timeout:.1f}s; last bytes seen on the "
                                   f"channel: {self.noise()!r}")
            ready, _, _ = select.select([self.rfd], [], [], min(left, 0.5))
            if not ready:
                continue
            data = os.read(self.rfd, 65536)
            if not data:
                raise ChannelError(f"agent channel closed while waiting for '{op}'; last bytes: {self.noise()!r}")
            for frame in self.reader.feed(data):
                if isinstance(frame.get("id"), int):
                    self.pending[frame["id"]] = frame
        resp = self.pending.pop(rid)
        if not resp.get("ok"):
            raise ChannelError(f"agent '{op}' failed: {resp.get('error')}")
        return resp

    def ping(self, timeout: float) -> dict[str, Any]:
        return self.request("ping", timeout)

    def wait_ready(self, timeout: float, per_try: float = 2.0) -> None:
        """Ping until the agent answers (the guest may still be booting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ping(min(per_try, max(0.1, deadline - time.monotonic())))
                return
            except ChannelError:
                if time.monotonic() >= deadline:
                    raise

    def run(self, argv: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
            user: str | None = None, stdin: bytes | None = None) -> RunResult:
        """Run ``argv`` in the guest; the channel waits ``timeout`` plus a margin."""
        resp = self.request("run", timeout + 10.0, argv=argv, env=env or {}, cwd=cwd, user=user,
                            timeout=timeout, stdin=b64(stdin or b""))
        return RunResult(int(resp["exit_status"]), unb64(resp.get("stdout")), unb64(resp.get("stderr")),
                         float(resp.get("duration_s", 0.0)), bool(resp.get("timed_out")), resp.get("signal"))

    def read_file(self, path: str, timeout: float = 30.0) -> bytes:
        return unb64(self.request("read_file", timeout, path=path)["data"])

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644, owner: str | None = None,
                   timeout: float = 30.0) -> None:
        self.request("write_file", timeout, path=path, data=b64(data), mode=mode, owner=owner)

    def prep_status(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.request("prep_status", timeout, kind=kind)

    def shutdown(self, timeout: float = 10.0) -> None:
        self.request("shutdown", timeout)
