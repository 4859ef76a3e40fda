"""Security of the agent's attach channel and of ``copy_from`` (issue 23, findings 3, 6 and 7).

- 3: ``agentbox attach`` to a krun-podman guest talks only to the guest it started: the guest must
  prove it holds the record's token (which never crosses the port) before anything is sent, and a
  record whose container is gone is refused before the port is touched;
- 6: connections that never authenticate cannot grow the agent: few at once, a few KiB each;
- 7: a ``copy_from`` that fails (a guest lying about size or checksum) leaves the host file as it was.

Real sockets and the real agent (in a subprocess, or its :class:`Server` in process); the fakes are a
listener standing in for whoever took a gone guest's port, a scripted lying guest, and (for the one
test that needs a *running* krun-podman container, which cannot exist here) a ``podman`` on PATH.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, Any

import pytest

from agentbox_guest_init import agent, listeners
from agentbox_guest_init.protocol import (
    CHUNK, MAGIC, PREAUTH_MAX_BYTES, PREAUTH_MAX_FRAME, ClientAuth, FrameReader, b64, encode_frame,
)
from agentbox_runtime import guest_registry
from agentbox_runtime.channel import AgentClient, ChannelError, GuestAuthError
from suites.unit.test_channel import HostileGuest

REPO = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-m", "agentbox_guest_init.cli", "agent"]
TOKEN = "0123456789abcdef" * 4
TYPED = b"echo typed-by-the-user-7f3a\n"
FAKE_PROMPT = b"root@guest:~# "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeListener:
    """Whoever took a gone guest's 127.0.0.1 port: accepts any ``auth`` (the old exchange sent the token
    in it), answers every request with success and a fake prompt, and keeps every byte it received."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.received = bytearray()
        self.connections = 0
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = FrameReader()
        with conn:
            try:
                while data := conn.recv(65536):
                    with self._lock:
                        self.received += data
                    for req in reader.feed(data):
                        conn.sendall(encode_frame({"id": req.get("id"), "ok": True, "pty": 1,
                                                   "data": b64(FAKE_PROMPT), "agent_nonce": "0" * 64,
                                                   "proof": "f" * 64}))
            except OSError:
                pass

    def frames(self) -> list[dict[str, Any]]:
        """What the client sent, decoded."""
        with self._lock:
            return FrameReader().feed(bytes(self.received))

    def close(self) -> None:
        """Stop accepting and end the accept thread (closing alone does not wake a blocked
        ``accept``; a thread left behind would make later tests fork a multi-threaded process)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._acceptor.join(timeout=10)
        assert not self._acceptor.is_alive(), "the fake listener's accept thread did not end"


@pytest.fixture()
def fake_listener() -> Iterator[FakeListener]:
    listener = FakeListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture()
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private state dir for guest records, in this process and for ``agentbox`` subprocesses."""
    for name in ("state", "cfg"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("AGENTBOX_CONFIG", raising=False)
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _krun_podman_record(port: int, container: str) -> guest_registry.GuestRecord:
    """A preserved krun-podman guest as the harness records it (no VMM pid: conmon owns the container)."""
    record = guest_registry.GuestRecord(guest_registry.new_id("krun-podman"), "krun-podman", "test_x",
                                        state="preserved", container=container, containers=[container],
                                        attach_tcp=port, attach_token=TOKEN)
    guest_registry.save(record)
    return record


def _attach(env: dict[str, str], guest_id: str) -> subprocess.CompletedProcess[bytes]:
    """``agentbox attach ID`` with the user's keystrokes waiting on its stdin."""
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "attach", guest_id], input=TYPED,
                          env=env, cwd=REPO, capture_output=True, timeout=120)


# --- finding 3: attach authenticates both ends, and refuses a gone container ---------------------------


def test_the_client_refuses_a_listener_that_cannot_prove_the_token(fake_listener: FakeListener) -> None:
    """The channel level: the only thing the client sends is its hello (a nonce); never the token."""
    with pytest.raises(GuestAuthError) as err:
        AgentClient.connect_tcp("127.0.0.1", fake_listener.port, TOKEN, 10.0)
    assert str(err.value) == (f"the guest at 127.0.0.1:{fake_listener.port} did not prove it holds this guest's "
                              "attach token; refusing to attach")
    frames = fake_listener.frames()
    assert [sorted(f) for f in frames] == [["client_nonce", "id", "op"]] and frames[0]["op"] == "auth"
    assert TOKEN.encode() not in bytes(fake_listener.received)


def test_attach_to_a_fake_listener_on_the_guest_port_sends_nothing_typed(fake_listener: FakeListener,
                                                                           cli_env: dict[str, str],
                                                                           podman_env: dict[str, str],
                                                                           annotated_container) -> None:  # type: ignore[no-untyped-def]
    """Finding 3's reproduction: someone else answers on a preserved krun-podman guest's port, accepts
    anything and shows a prompt. ``agentbox attach`` refuses with one line; neither the token nor the
    user's keystrokes reach the listener, and its prompt is never shown."""
    container = annotated_container.start({})  # the record's container must run: a krun-podman one cannot here
    record = _krun_podman_record(fake_listener.port, container)
    proc = _attach({**podman_env, **cli_env}, record.id)
    assert proc.returncode == 1
    assert proc.stderr.decode() == (f"agentbox: the guest at 127.0.0.1:{fake_listener.port} did not prove it holds "
                                    "this guest's attach token; refusing to attach\n")
    assert FAKE_PROMPT not in proc.stdout
    sent = bytes(fake_listener.received)
    assert TOKEN.encode() not in sent and b64(TYPED).encode() not in sent and TYPED not in sent
    assert [f["op"] for f in fake_listener.frames()] == ["auth"]


def test_attach_refuses_a_krun_podman_record_whose_container_is_gone(fake_listener: FakeListener,
                                                                     cli_env: dict[str, str],
                                                                     podman_env: dict[str, str]) -> None:
    """A preserved krun-podman record reads "preserved" after its container is gone (it has no VMM pid);
    attach asks Podman first and never touches the port, which is anyone's by then."""
    container = f"agentbox-test-gone-{uuid.uuid4().hex[:8]}"
    record = _krun_podman_record(fake_listener.port, container)
    assert record.status() == "preserved"
    proc = _attach({**podman_env, **cli_env}, record.id)
    assert proc.returncode == 1
    assert proc.stderr.decode() == (f"agentbox: guest {record.id}: its container {container} is not running any "
                                    "more, so its attach port is not its own; refusing to attach (`agentbox rm "
                                    f"{record.id}` removes the record)\n")
    assert fake_listener.connections == 0 and not fake_listener.received


# --- finding 6: bounded pre-authentication in the agent ---------------------------------------------------


@pytest.fixture()
def piped_agent() -> Iterator[tuple[AgentClient, subprocess.Popen[bytes]]]:
    """The real agent in a subprocess, its main channel on stdin/stdout."""
    proc = subprocess.Popen(AGENT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "AGENTBOX_ENTER_AS_ROOT": "1"})
    try:
        yield AgentClient.over_process(proc), proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _huge_frame_header(port: int, size: int, out: list[socket.socket]) -> None:
    """Connect and send a frame header followed by ``size`` bytes of one never-ending frame."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    out.append(s)
    with contextlib.suppress(OSError):  # the agent closed the connection: what it should do
        s.sendall(b"\n" + MAGIC + b"A" * size)


def test_unauthenticated_huge_frames_do_not_grow_a_real_agent(piped_agent: tuple[AgentClient, Any],
                                                               tmp_path: Path) -> None:
    """Finding 6's reproduction on the real agent: 12 connections that never authenticate each send a
    frame header and 8 MiB of its body (the old agent buffered up to 64 MiB each, for 10 s). The agent's
    RSS stays within a few MiB, and a real client still authenticates and sends full-size frames."""
    client, proc = piped_agent
    port = _free_port()
    client.attach_listen(port, TOKEN)
    client.ping(10)
    before = _rss_kib(proc.pid)
    conns: list[socket.socket] = []
    senders = [threading.Thread(target=_huge_frame_header, args=(port, 8 << 20, conns)) for _ in range(12)]
    try:
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)
        client.ping(10)
        grown_kib = _rss_kib(proc.pid) - before
        assert grown_kib < 16 << 10, f"the agent grew by {grown_kib} KiB for 12 unauthenticated connections"
        for s in conns:  # every one of them was closed by the agent (no timeout: it closed them already)
            s.settimeout(60)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
    finally:
        for s in conns:
            s.close()
    attached = AgentClient.connect_tcp("127.0.0.1", port, TOKEN, 10.0)
    try:  # after authentication the normal frame limit applies: a 4 MiB chunk is one frame
        data = os.urandom(CHUNK + 1000)
        attached.write_file(str(tmp_path / "big"), data, owner="root", timeout=60)
        assert attached.read_file(str(tmp_path / "big"), timeout=60) == data
    finally:
        attached.close()


class GatedListener:
    """The agent's TCP attach serving (``accept_forever`` + ``serve_connection`` + a ``PreauthGate``) in
    this process, on a real 127.0.0.1 socket, so the gate's accounting can be read."""

    def __init__(self) -> None:
        self.gate = listeners.PreauthGate()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(listeners.BACKLOG)
        self.port = int(self.sock.getsockname()[1])
        self._acceptor = listeners.accept_forever(
            self.sock, lambda conn, admission: agent.serve_connection(conn, admission, TOKEN), "test-attach",
            gate=self.gate)
        GatedListener.open.append(self)

    open: ClassVar[list[GatedListener]] = []
    """Listeners of the running test, closed after it (see ``_close_gated_listeners``)."""

    def close(self) -> None:
        """Stop accepting and end the accept thread (a shutdown wakes a blocked ``accept``; a plain
        close does not). Closing twice is fine."""
        if self.sock.fileno() == -1:
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._acceptor.join(timeout=10)
        assert not self._acceptor.is_alive(), "the listener's accept thread did not end"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=60)


@pytest.fixture(autouse=True)
def _close_gated_listeners() -> Iterator[None]:
    """No accept thread outlives its test: a later test that forks (pexpect) must find this process
    single-threaded (Python 3.13 warns that forking a multi-threaded process may deadlock)."""
    yield
    while GatedListener.open:
        GatedListener.open.pop().close()


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_at_most_8_connections_wait_to_authenticate_and_their_bytes_are_bounded() -> None:
    listener = GatedListener()
    idle = [listener.connect() for _ in range(listeners.PREAUTH_CONNECTIONS)]
    try:
        _wait(lambda: listener.gate.waiting == listeners.PREAUTH_CONNECTIONS, "8 connections waiting")
        extra = listener.connect()
        assert _closed_by_peer(extra) and listener.gate.refused == 1  # closed at once: no slot left
        extra.close()
        for s in idle:  # each now sends a frame header and far more than a frame before auth
            with contextlib.suppress(OSError):
                s.sendall(b"\n" + MAGIC + b"B" * (1 << 20))
        for s in idle:
            assert _closed_by_peer(s)
    finally:
        for s in idle:
            s.close()
    _wait(lambda: listener.gate.waiting == 0, "every slot freed")
    assert listener.gate.buffered == 0
    assert listener.gate.peak_buffered <= listeners.PREAUTH_TOTAL_BYTES
    assert listener.gate.peak_buffered <= listeners.PREAUTH_CONNECTIONS * (2 * PREAUTH_MAX_FRAME + 256)
    attached = AgentClient.connect_tcp("127.0.0.1", listener.port, TOKEN, 10.0)
    try:
        assert attached.ping(10)["pong"] is True
        assert listener.gate.waiting == 0  # an authenticated connection holds no slot
    finally:
        attached.close()
    listener.close()


def test_a_connection_that_sends_more_than_the_preauth_budget_in_small_frames_is_closed() -> None:
    """Noise and small damaged frames count too: past PREAUTH_MAX_BYTES before auth the agent hangs up."""
    listener = GatedListener()
    s = listener.connect()
    try:
        try:
            for _ in range(PREAUTH_MAX_BYTES // 512 + 8):
                s.sendall(b"x" * 511 + b"\n")  # noise, never a frame
        except OSError:
            pass
        assert _closed_by_peer(s)
    finally:
        s.close()
    _wait(lambda: listener.gate.waiting == 0, "the slot freed")
    listener.close()


def test_the_auth_exchange_never_sends_the_token_and_rejects_reflected_proofs() -> None:
    """Both halves of the one implementation: a guest proof cannot be replayed as a client proof."""
    from agentbox_guest_init.protocol import GuestAuth

    client, guest = ClientAuth(TOKEN), GuestAuth(TOKEN)
    reply, verdict = guest.step({"op": "auth", **client.hello()})
    assert verdict is None and TOKEN not in repr(reply) and TOKEN not in repr(client.hello())
    second, verdict = guest.step({"op": "auth_proof", "proof": reply["proof"]})  # its own proof back
    assert verdict is False and second["ok"] is False
    guest2 = GuestAuth(TOKEN)
    reply2, _ = guest2.step({"op": "auth", **client.hello()})
    answer = client.answer(reply2)
    assert TOKEN not in repr(answer)
    assert guest2.step({"op": "auth_proof", **answer}) == ({"ok": True}, True)


# --- finding 7: copy_from replaces the destination only after the checks passed ---------------------------


def LyingGuest(respond: Callable[[dict[str, Any]], bytes | None]) -> HostileGuest:
    """A scripted agent answering ``read_file`` with whatever ``respond`` returns; None drops the channel."""
    return HostileGuest(respond, close_on_none=True)


def _read_file_answer(req: dict[str, Any], content: bytes, *, size: int | None = None,
                      sha256: str | None = None) -> bytes:
    """The honest answer to one ``read_file`` request for ``content``, with ``size``/``sha256`` lies."""
    offset, length = int(req["offset"]), int(req["length"])
    resp: dict[str, Any] = {"id": req["id"], "ok": True, "size": len(content) if size is None else size,
                            "data": b64(content[offset:offset + length])}
    if req.get("digest") or offset + length >= len(content):
        resp["sha256"] = sha256 or hashlib.sha256(content).hexdigest()
    return encode_frame(resp)


GUEST_BYTES = b"the guest's bytes\n" * 100
LIES: dict[str, tuple[Callable[[dict[str, Any]], bytes | None], str]] = {
    "wrong checksum": (lambda req: _read_file_answer(req, GUEST_BYTES, sha256="0" * 64), "sha256 mismatch"),
    "more than its size": (lambda req: _read_file_answer(req, GUEST_BYTES, size=10), "more of /f than its size 10"),
    "size changes": (lambda req: _read_file_answer(req, GUEST_BYTES, size=CHUNK + 5 + int(req["offset"])),
                     "changed size during the copy"),
    "no data": (lambda req: encode_frame({"id": req["id"], "ok": True, "size": 50, "data": ""}), "sent no data"),
    "drops the channel": (lambda req: None, "closed while waiting for 'read_file'"),
}


@pytest.mark.parametrize("lie", LIES)
def test_a_failed_copy_from_leaves_the_destination_byte_identical(lie: str, tmp_path: Path) -> None:
    """Finding 7's reproduction: a guest lying about size or checksum. The user's file keeps its bytes,
    mode and inode, and no temporary file is left beside it."""
    respond, message = LIES[lie]
    dest = tmp_path / "precious.txt"
    dest.write_bytes(b"the user's own bytes, not to be lost\n")
    dest.chmod(0o640)
    before = dest.stat()
    g = LyingGuest(respond)
    try:
        with pytest.raises(ChannelError, match=message):
            AgentClient(g.host).download("/f", dest, timeout=20)
    finally:
        g.close()
    assert dest.read_bytes() == b"the user's own bytes, not to be lost\n"
    after = dest.stat()
    assert (after.st_ino, stat.S_IMODE(after.st_mode), after.st_mtime_ns) == \
        (before.st_ino, 0o640, before.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_copy_from_fills_a_private_temp_file_then_replaces_keeping_the_mode(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    dest.chmod(0o4750)  # a guest's bytes never become setuid
    content = os.urandom(CHUNK + 12345)  # two chunks: the temp file is seen while it fills
    seen: list[tuple[str, int]] = []

    def respond(req: dict[str, Any]) -> bytes:
        if int(req["offset"]) > 0:
            seen.extend((p.name, stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.iterdir() if p != dest)
        return _read_file_answer(req, content)

    g = LyingGuest(respond)
    try:
        assert AgentClient(g.host).download("/f", dest, timeout=60) == len(content)
    finally:
        g.close()
    assert dest.read_bytes() == content and stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert len(seen) == 1 and seen[0][0].startswith(".out.bin.") and seen[0][1] == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    new = tmp_path / "new.bin"
    g = LyingGuest(lambda req: _read_file_answer(req, b"fresh"))
    try:
        AgentClient(g.host).download("/f", new, timeout=20)
    finally:
        g.close()
    umask = os.umask(0)
    os.umask(umask)
    assert new.read_bytes() == b"fresh" and stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
    link = tmp_path / "link.bin"
    link.symlink_to(new)
    g = LyingGuest(lambda req: _read_file_answer(req, b"through the link"))
    try:
        AgentClient(g.host).download("/f", link, timeout=20)
    finally:
        g.close()
    assert link.is_symlink() and new.read_bytes() == b"through the link"


def test_copy_from_into_a_directory_is_one_clear_error_before_any_transfer(tmp_path: Path) -> None:
    asked: list[dict[str, Any]] = []
    g = LyingGuest(lambda req: asked.append(req) or _read_file_answer(req, b"x"))
    try:
        with pytest.raises(IsADirectoryError, match=f"cannot copy /f from the guest to {tmp_path}: it is a "
                                                    "directory; accepted: a regular file"):
            AgentClient(g.host).download("/f", tmp_path, timeout=20)
    finally:
        g.close()
    assert asked == []
