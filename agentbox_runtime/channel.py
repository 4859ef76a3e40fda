"""Host side of the guest control channel (the agent of ``agentbox-guest-init agent``).

:class:`AgentClient` speaks the framed protocol of :mod:`agentbox_guest_init.protocol`
over any byte stream: a connected unix socket (qemu exposes the agent's
virtio-serial port as ``agent.sock``), a pair of pipes such as a
``podman run -i`` process's stdout/stdin, or raw file descriptors. Every call
has a timeout; a timeout error shows the last non-frame bytes seen on the
stream (kernel messages, a shell's complaint), which usually say why.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import itertools
import os
import select
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agentbox_guest_init.protocol import (
    AUTH_OP, AUTH_PROOF_OP, CHUNK, AuthFailed, ClientAuth, FrameReader, b64, encode_frame,
)
from agentbox_runtime.retry import WaitTimeout, retry

RUN_MARGIN_S = 10.0  # the channel waits this much longer than a command's own timeout
SEND_TIMEOUT_S = 30.0  # a request the guest does not take within this is an error


class ChannelError(RuntimeError):
    """The agent did not answer in time, the stream closed, or the agent reported a failure."""


class ChannelTimeout(ChannelError):
    """No answer within the call's timeout."""


class GuestAuthError(ChannelError):
    """The peer of an authenticated channel did not prove it holds the guest's attach token."""


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
        self.waiting: set[int] = set()
        self.unrequested = 0
        """Frames dropped because no request of ours carried their id (a hostile or confused guest)."""
        self.closer = closer
        self.closed = False
        os.set_blocking(self.wfd, False)  # sends are bounded by select + partial writes, never a blocked write
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()

    @staticmethod
    def _connect(make: Any, address: Any, what: str, timeout: float) -> socket.socket:
        last: list[OSError] = []
        conn: list[socket.socket] = []

        def connected(_last_try: bool) -> bool:
            s = make()
            try:
                s.settimeout(max(0.5, min(timeout, 5.0)))
                s.connect(address)
                s.settimeout(None)
            except OSError as exc:
                last[:] = [exc]
                s.close()
                return False
            conn.append(s)
            return True

        try:
            retry(connected, timeout=timeout, interval=0.1)
        except WaitTimeout:
            raise ChannelError(f"cannot connect to {what} within {timeout:g}s: "
                               f"{last[0] if last else 'no attempt'}") from None
        return conn[0]

    @classmethod
    def connect_unix(cls, path: Path | str, timeout: float) -> AgentClient:
        """Connect to a unix socket, retrying until ``timeout``."""
        s = cls._connect(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), str(path),
                         f"agent socket {path}", timeout)
        return cls(s, closer=s)

    @classmethod
    def connect_tcp(cls, host: str, port: int, token: str, timeout: float) -> AgentClient:
        """Connect to an agent's TCP attach channel (``attach_listen``); both ends prove they hold
        ``token`` (:meth:`authenticate`) before the client is returned."""
        s = cls._connect(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), (host, port),
                         f"agent attach port {host}:{port}", timeout)
        client = cls(s, closer=s)
        try:
            client.authenticate(token, max(timeout, 5.0), f"{host}:{port}")
        except ChannelError:
            client.close()
            raise
        return client

    def authenticate(self, token: str, timeout: float, where: str) -> None:
        """The mutual token exchange of :mod:`agentbox_guest_init.protocol` (the token itself is never
        sent). The guest's proof is checked before anything else is sent: a peer that cannot give it
        raises :class:`GuestAuthError` naming ``where``."""
        auth = ClientAuth(token)
        refused = GuestAuthError(f"the guest at {where} did not prove it holds this guest's attach token; "
                                 "refusing to attach")
        reply = self._exchange(AUTH_OP, timeout, auth.hello())
        if reply.get("ok") is not True:
            raise refused
        try:
            fields = auth.answer(reply)
        except AuthFailed:
            raise refused from None
        answer = self._exchange(AUTH_PROOF_OP, timeout, fields)
        if answer.get("ok") is not True:
            raise ChannelError(f"the guest at {where} refused this attach token: {_short(repr(answer.get('error')))}")

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
        """The last non-frame bytes seen on the stream, and why frames were dropped, if any were."""
        text = self.reader.tail()[-2000:].decode("utf-8", "replace")
        dropped = []
        if self.reader.dropped:
            dropped.append(f"{self.reader.dropped} damaged frame(s) dropped, last: {self.reader.last_drop}")
        if self.unrequested:
            dropped.append(f"{self.unrequested} frame(s) with ids never requested dropped")
        return text + (f" [{'; '.join(dropped)}]" if dropped else "")

    def _send(self, message: dict[str, Any], timeout: float = SEND_TIMEOUT_S) -> None:
        """Write one frame, waiting at most ``timeout`` for the stream to take it."""
        data = memoryview(encode_frame(message))
        deadline = time.monotonic() + timeout
        with self._write_lock:
            while data:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChannelTimeout(f"the agent did not take '{message.get('op')}' within {timeout:g}s "
                                         f"(stream full); last bytes seen on the channel: {self.noise()!r}")
                try:
                    _, ready, _ = select.select([], [self.wfd], [], min(left, 0.2))
                    if ready:
                        data = data[_write_some(self.wfd, data):]
                except BlockingIOError:
                    continue
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
                try:
                    data = os.read(self.rfd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    raise ChannelError(f"agent channel closed while waiting for '{op}'; last bytes seen on the "
                                       f"channel: {self.noise()!r}")
                for frame in self.reader.feed(data):
                    fid = frame.get("id")
                    if isinstance(fid, int) and fid in self.waiting:
                        self.pending[fid] = frame
                    else:
                        self.unrequested += 1
            finally:
                self._read_lock.release()

    def _exchange(self, op: str, wait_s: float, fields: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait up to ``wait_s`` seconds for its response, whatever it says."""
        if self.closed:
            raise ChannelError(f"agent channel is closed; cannot send '{op}'")
        rid = next(self.ids)
        deadline = time.monotonic() + wait_s
        self.waiting.add(rid)
        try:
            self._send({"op": op, "id": rid, **fields}, min(wait_s, SEND_TIMEOUT_S))
            self._pump(op, rid, deadline, wait_s)
            return self.pending.pop(rid)
        finally:
            self.waiting.discard(rid)
            self.pending.pop(rid, None)

    def request(self, op: str, wait_s: float, /, **fields: Any) -> dict[str, Any]:
        """Send one request and wait up to ``wait_s`` seconds for its response."""
        resp = self._exchange(op, wait_s, fields)
        if resp.get("ok") is not True:
            raise ChannelError(f"agent '{op}' failed: {_short(resp.get('error'))}")
        return resp

    def ping(self, timeout: float) -> dict[str, Any]:
        """``pong`` with the agent's pid and uid."""
        return self.request("ping", timeout)

    def wait_ready(self, timeout: float, per_try: float = 2.0) -> None:
        """Ping until the agent answers (the guest may still be booting)."""
        deadline = time.monotonic() + timeout

        def answered(last_try: bool) -> bool:
            try:
                self.ping(min(per_try, max(0.1, deadline - time.monotonic())))
                return True
            except ChannelTimeout:
                if last_try:
                    raise
                return False

        retry(answered, timeout=timeout, interval=0.0)

    def run(self, argv: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
            user: str | None = None, stdin: bytes | None = None) -> RunResult:
        """Run ``argv`` in the guest (as dev unless ``user="root"``); the process group is killed at ``timeout``."""
        resp = self.request("run", timeout + RUN_MARGIN_S, argv=list(argv), env=env or {}, cwd=cwd, user=user,
                            timeout=timeout, stdin=b64(stdin or b""))
        signal_ = resp.get("signal")
        return RunResult(_field(resp, "run", "exit_status", int), _bytes(resp, "run", "stdout"),
                         _bytes(resp, "run", "stderr"), float(_field(resp, "run", "duration_s", (int, float), 0.0)),
                         bool(resp.get("timed_out")), signal_ if isinstance(signal_, int) else None)

    def read_file(self, path: str, timeout: float = 30.0) -> bytes:
        """The bytes of guest file ``path`` (for files that fit in memory; see :meth:`download`)."""
        buf = io.BytesIO()
        self._download(path, buf, timeout)
        return buf.getvalue()

    def download(self, path: str, dest: Path, timeout: float = 300.0) -> int:
        """Copy guest file ``path`` to host file ``dest`` in :data:`CHUNK` pieces, checking its size and
        sha256; the byte count. ``timeout`` bounds the whole transfer.

        The bytes go to a new file beside ``dest`` (created exclusively, mode 0600 while it fills),
        which replaces ``dest`` only once size and sha256 matched; a file it replaces keeps its
        permission bits (never setuid/setgid/sticky), a new one gets 0666 minus the umask. A failed
        copy removes the temporary file and leaves ``dest`` as it was. A symlink ``dest`` is written
        through, as ``open(dest, "wb")`` would."""
        target = Path(os.path.realpath(dest))
        try:
            st: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            kind = IsADirectoryError if stat.S_ISDIR(st.st_mode) else OSError
            raise kind(f"cannot copy {path} from the guest to {dest}: it is "
                       f"{'a directory' if kind is IsADirectoryError else 'not a regular file'}; accepted: "
                       "a regular file (replaced) or a path that does not exist yet")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".agentbox-part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                size = self._download(path, f, timeout)
                f.flush()
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode) & 0o777 if st is not None else 0o666 & ~_umask())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return size

    def _download(self, path: str, sink: IO[bytes], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        digest, offset, size = hashlib.sha256(), 0, None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout(f"copying {path} from the guest took longer than {timeout:g}s "
                                     f"({offset} of {size} bytes)")
            last = size is not None and offset + CHUNK >= size
            resp = self.request("read_file", left, path=path, offset=offset, length=CHUNK, digest=last)
            data = _bytes(resp, "read_file", "data")
            reported = _field(resp, "read_file", "size", int)
            if size is None:
                size = reported
            elif reported != size:
                raise ChannelError(f"{path} changed size during the copy ({size} -> {reported} bytes)")
            if offset + len(data) > size:
                raise ChannelError(f"the agent sent more of {path} than its size {size}")
            sink.write(data)
            digest.update(data)
            offset += len(data)
            if offset >= size:
                if "sha256" not in resp:  # the whole file came in the first chunk: ask for its digest
                    resp = self.request("read_file", max(0.1, deadline - time.monotonic()), path=path,
                                        offset=size, length=0, digest=True)
                if _field(resp, "read_file", "sha256", str) != digest.hexdigest():
                    raise ChannelError(f"{path} changed during the copy (sha256 mismatch)")
                return offset
            if not data:
                raise ChannelError(f"the agent sent no data for {path} at offset {offset} of {size}")

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644, owner: str | None = None,
                   timeout: float = 30.0) -> None:
        """Write guest file ``path`` (parents created) with ``mode`` and ``owner`` (``dev``/``root``)."""
        self._upload(io.BytesIO(data), path, mode=mode, owner=owner, timeout=timeout)

    def upload(self, src: Path, path: str, *, mode: int = 0o644, owner: str | None = None,
               timeout: float = 300.0) -> None:
        """Copy host file ``src`` to guest ``path`` in :data:`CHUNK` pieces; the guest checks the sha256
        before renaming it into place (a failed copy leaves ``path`` as it was)."""
        with open(src, "rb") as f:
            self._upload(f, path, mode=mode, owner=owner, timeout=timeout)

    def _upload(self, source: IO[bytes], path: str, *, mode: int, owner: str | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        digest, transfer, first = hashlib.sha256(), uuid.uuid4().hex, True
        chunk = source.read(CHUNK)
        while True:
            nxt = source.read(CHUNK)
            digest.update(chunk)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout(f"copying to {path} in the guest took longer than {timeout:g}s")
            fields: dict[str, Any] = {"path": path, "data": b64(chunk), "transfer": transfer, "first": first,
                                      "final": not nxt, "mode": mode, "owner": owner}
            if not nxt:
                fields["sha256"] = digest.hexdigest()
            self.request("write_file", left, **fields)
            if not nxt:
                return
            chunk, first = nxt, False

    def pty_spawn(self, argv: list[str], *, user: str | None = None, env: dict[str, str] | None = None,
                  rows: int = 24, cols: int = 80, timeout: float = 30.0) -> int:
        """Start ``argv`` on a new pty in the guest; its session id (see :class:`PtyRelay`)."""
        resp = self.request("pty_spawn", timeout, argv=list(argv), user=user, env=env or {}, rows=rows, cols=cols)
        return int(_field(resp, "pty_spawn", "pty", int))

    def pty_io(self, pty: int, data: bytes = b"", *, wait_s: float = 0.2) -> tuple[bytes, int | None]:
        """Send ``data``, get what the program printed within ``wait_s`` and its status once it ended."""
        resp = self.request("pty_io", wait_s + RUN_MARGIN_S, pty=pty, data=b64(data), wait_s=wait_s)
        status = resp.get("exit_status")
        return _bytes(resp, "pty_io", "data"), status if isinstance(status, int) else None

    def pty_resize(self, pty: int, rows: int, cols: int, timeout: float = 10.0) -> None:
        """Give the session's pty a new window size (its foreground programs get SIGWINCH); the guest
        refuses sizes outside 1 to :data:`agentbox_guest_init.protocol.WINSIZE_MAX`."""
        self.request("pty_resize", timeout, pty=pty, rows=rows, cols=cols)

    def pty_close(self, pty: int, timeout: float = 10.0) -> None:
        """Kill the session's process group and free its pty."""
        self.request("pty_close", timeout, pty=pty)

    def prep_status(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """The ``nix`` or ``podman`` prep status fields (state, pid, error, log_path, ...)."""
        return self.request("prep_status", timeout, kind=kind)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the agent to exit (a qemu guest then powers off)."""
        self.request("shutdown", timeout)

    def linger(self, timeout: float = 10.0) -> None:
        """Keep the agent (and so the guest) running after this channel closes; its attach channels
        stay served until a ``shutdown`` (``--preserve-debug``)."""
        self.request("linger", timeout)

    def attach_listen(self, port: int, token: str, timeout: float = 10.0) -> None:
        """Have the agent serve TCP ``port`` too; on each connection both ends prove they hold ``token``
        (:meth:`connect_tcp`). Send it only over a private channel (the agent's main one)."""
        self.request("attach_listen", timeout, port=port, token=token)


class PtyRelay:
    """A guest pty session as a local stream: bytes written to :attr:`local` reach the program,
    its output comes back on :attr:`local`; EOF when it exits. Wrap :attr:`local` with
    ``pexpect.fdpexpect.fdspawn`` for an interactive test."""

    def __init__(self, agent: AgentClient, pty: int, poll_s: float = 0.2) -> None:
        self.agent, self.pty, self.poll_s = agent, pty, poll_s
        self.local, self._far = socket.socketpair()
        self.exit_status: int | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        self._far.setblocking(False)
        try:
            while not self._stop.is_set():
                try:
                    data = self._far.recv(65536)
                    if not data:
                        break  # the local side closed
                except BlockingIOError:
                    data = b""
                out, status = self.agent.pty_io(self.pty, data, wait_s=self.poll_s)
                if out:
                    self._far.sendall(out)
                if status is not None:
                    self.exit_status = status
                    break
        except (ChannelError, OSError) as exc:
            self.error = str(exc)
        finally:
            with contextlib.suppress(ChannelError, OSError):
                self.agent.pty_close(self.pty)
            self._far.close()

    def setwinsize(self, rows: int, cols: int) -> None:
        """Resize the guest pty, as ``pexpect.spawn.setwinsize`` resizes a local one."""
        self.agent.pty_resize(self.pty, rows, cols)

    def close(self) -> None:
        """Stop relaying and kill the guest program."""
        self._stop.set()
        self.local.close()
        self._thread.join(self.poll_s + RUN_MARGIN_S + 5)


def _umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status``; 0o022 if unreadable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _write_some(fd: int, data: memoryview) -> int:
    return os.write(fd, data[:65536])


def _short(value: object, limit: int = 500) -> str:
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "..."


def _field(resp: dict[str, Any], op: str, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """``resp[name]`` if it has the expected JSON type; a ChannelError naming the field otherwise."""
    value = resp.get(name, default)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ChannelError(f"the agent sent a malformed '{op}' response: {name} is {_short(repr(value), 80)}, "
                           f"not {getattr(kind, '__name__', 'a number')}")
    return value


def _bytes(resp: dict[str, Any], op: str, name: str) -> bytes:
    value = resp.get(name) or ""
    if not isinstance(value, str):
        raise ChannelError(f"the agent sent a malformed '{op}' response: {name} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ChannelError(f"the agent sent a malformed '{op}' response: {name} is not valid base64") from None
