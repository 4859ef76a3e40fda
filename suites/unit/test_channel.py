"""The harness control channel: the real agent (``agentbox-guest-init agent``) in a subprocess,
driven by :class:`agentbox_runtime.channel.AgentClient` over pipes and over a socketpair, with noise,
partial writes and damaged frames on the stream."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_guest_init.protocol import MAGIC, ClientAuth, FrameReader, encode_frame
from agentbox_runtime.channel import AgentClient, ChannelError, ChannelTimeout, GuestAuthError, RunResult

REPO = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-m", "agentbox_guest_init.cli", "agent"]


def agent_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "AGENTBOX_ENTER_AS_ROOT": "1"}


@pytest.fixture()
def piped() -> Iterator[tuple[AgentClient, subprocess.Popen[bytes]]]:
    """An agent over its stdin/stdout pipes."""
    proc = subprocess.Popen(AGENT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=agent_env(), cwd=REPO)
    try:
        yield AgentClient.over_process(proc), proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


class NoisyRelay:
    """Agent on one end of a socketpair; a relay copies its answers to the client in tiny pieces with noise."""

    def __init__(self) -> None:
        self.agent_end, self.relay_end = socket.socketpair()
        self.client_end, self.outer = socket.socketpair()
        self.proc = subprocess.Popen(AGENT, stdin=self.agent_end.fileno(), stdout=self.agent_end.fileno(),
                                     env=agent_env(), cwd=REPO)
        self.agent_end.close()
        self.noise = b"[    1.234567] virtio_blk virtio1: [vda] 2097152 512-byte logical blocks\r\n"
        threading.Thread(target=self._to_client, daemon=True).start()
        threading.Thread(target=self._to_agent, daemon=True).start()

    def _to_client(self) -> None:
        """Forward in 7-byte pieces; a kernel line goes out before every frame (between frames)."""
        while data := self.relay_end.recv(65536):
            for i in range(0, len(data), 7):
                piece = data[i:i + 7]
                at = piece.find(b"\n" + MAGIC[:1])
                if at >= 0:
                    self.outer.sendall(piece[:at + 1] + self.noise + piece[at + 1:])
                else:
                    self.outer.sendall(piece)

    def _to_agent(self) -> None:
        while data := self.outer.recv(65536):
            for i in range(0, len(data), 5):  # partial writes towards the agent too
                self.relay_end.sendall(self.noise[:11] + data[i:i + 5] if i == 0 else data[i:i + 5])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        for s in (self.relay_end, self.client_end, self.outer):
            s.close()


@pytest.fixture()
def noisy() -> Iterator[AgentClient]:
    relay = NoisyRelay()
    try:
        yield AgentClient(relay.client_end)
    finally:
        relay.close()


def test_ping_over_pipes(piped) -> None:  # type: ignore[no-untyped-def]
    client, proc = piped
    pong = client.ping(30)
    assert pong["pong"] is True and pong["pid"] == proc.pid


def test_run_returns_status_and_both_streams(piped) -> None:  # type: ignore[no-untyped-def]
    client, _ = piped
    r = client.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30, user="root")
    assert isinstance(r, RunResult)
    assert (r.exit_status, r.stdout, r.stderr, r.timed_out, r.signal) == (3, b"out\n", b"err\n", False, None)
    assert r.duration_s >= 0


def test_run_passes_stdin_env_and_cwd(piped, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, _ = piped
    r = client.run(["sh", "-c", "cat; echo \"$FOO\"; pwd"], timeout=30, user="root", stdin=b"\x00binary\xff\n",
                   env={"FOO": "bar"}, cwd=str(tmp_path))
    assert r.stdout == b"\x00binary\xff\nbar\n" + str(tmp_path).encode() + b"\n"


def test_run_as_dev_by_default_uses_the_contract_identity(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping to the dev uid needs root")
    env = {**agent_env(), "AGENTBOX_HOST_UID": "4321", "AGENTBOX_HOST_GID": "4322",
           "AGENTBOX_LIBKRUN_NIX_OVERLAY": "1"}
    proc = subprocess.Popen(AGENT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        client = AgentClient.over_process(proc)
        r = client.run(["sh", "-c", "id -u; id -g; echo $HOME $USER $NIX_REMOTE"], timeout=30, cwd="/")
        assert r.stdout.decode().split("\n")[:3] == ["4321", "4322",
                                                     "/home/dev dev unix:///nix/var/nix/daemon-socket/socket"]
        assert client.run(["id", "-u"], timeout=30, user="root").stdout == b"0\n"
        with pytest.raises(ChannelError, match=r"run user must be 'dev' \(the image's user\) or 'root', got 'nobody'"):
            client.run(["id"], timeout=30, user="nobody")
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_timeout_kills_the_whole_process_group(piped, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, _ = piped
    pidfile = tmp_path / "child.pid"
    r = client.run(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], timeout=1, user="root")
    assert r.timed_out and r.signal == signal.SIGKILL and r.exit_status == 128 + signal.SIGKILL
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {child} survived the timeout")


def test_an_escaped_background_process_does_not_hold_the_answer(piped) -> None:  # type: ignore[no-untyped-def]
    client, _ = piped
    r = client.run(["sh", "-c", "setsid sleep 30 & echo started"], timeout=20, user="root")
    assert (r.exit_status, r.stdout, r.timed_out) == (0, b"started\n", False)


def test_missing_program_is_127(piped) -> None:  # type: ignore[no-untyped-def]
    client, _ = piped
    r = client.run(["/no/such/program"], timeout=10, user="root")
    assert r.exit_status == 127 and b"/no/such/program" in r.stderr


def test_files_and_prep_status(piped, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, _ = piped
    target = tmp_path / "sub/dir/f.bin"
    client.write_file(str(target), b"\x00\x01data", mode=0o600, owner="root")
    assert target.read_bytes() == b"\x00\x01data" and (target.stat().st_mode & 0o777) == 0o600
    assert client.read_file(str(target)) == b"\x00\x01data"
    with pytest.raises(ChannelError, match="agent 'read_file' failed: FileNotFoundError"):
        client.read_file(str(tmp_path / "absent"))
    st = client.prep_status("nix")
    assert st["status_path"] == "/run/agentbox/nix-prep.status" and st["state"] in (
        "not-started", "running", "ready", "failed")
    with pytest.raises(ChannelError, match="prep kind must be one of nix, podman, got 'docker'"):
        client.prep_status("docker")


def test_concurrent_requests_get_their_own_answers(piped) -> None:  # type: ignore[no-untyped-def]
    client, _ = piped
    results: dict[int, bytes] = {}

    def one(i: int) -> None:
        results[i] = client.run(["sh", "-c", f"sleep 0.{3 - i % 3}; echo {i}"], timeout=30, user="root").stdout

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: f"{i}\n".encode() for i in range(6)}


def test_shutdown_ends_the_agent(piped) -> None:  # type: ignore[no-untyped-def]
    client, proc = piped
    client.shutdown(30)
    assert proc.wait(timeout=30) == 0


def test_large_output_survives_partial_reads_and_noise(noisy: AgentClient) -> None:
    assert noisy.ping(60)["pong"]
    r = noisy.run(["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"], timeout=60, user="root")
    assert r.stdout == b"x" * 300000
    assert b"virtio_blk" in noisy.reader.noise


def test_timeout_error_shows_the_last_noise() -> None:
    a, b = socket.socketpair()
    try:
        b.sendall(b"Kernel panic - not syncing: VFS: Unable to mount root fs\n")
        with pytest.raises(ChannelTimeout, match="agent did not answer 'ping' within 0.3s; last bytes seen on the "
                                                 "channel: .*Kernel panic - not syncing"):
            AgentClient(a).ping(0.3)
    finally:
        a.close()
        b.close()


def test_closed_stream_is_reported() -> None:
    rfd, wfd = os.pipe()
    sink_r, sink_w = os.pipe()
    os.write(wfd, b"login: ")
    os.close(wfd)
    try:
        with pytest.raises(ChannelError, match="agent channel closed while waiting for 'ping'; last bytes seen on "
                                               "the channel: 'login: '"):
            AgentClient(rfd, sink_w).ping(5)
    finally:
        for fd in (rfd, sink_r, sink_w):
            os.close(fd)


def test_reader_drops_bad_checksums_and_truncated_frames() -> None:
    good = encode_frame({"id": 1, "ok": True})
    bad_crc = good[:-3] + (b"0" if good[-3:-2] != b"0" else b"1") + good[-2:]
    truncated = encode_frame({"id": 2})[:20]  # a new frame starts before this one ended
    r = FrameReader()
    out = r.feed(b"noise" + bad_crc + truncated + good + MAGIC + b"!!notbase64 00000000\n")
    assert out == [{"id": 1, "ok": True}]
    assert r.dropped == 3
    # byte-at-a-time delivery gives the same message
    r2 = FrameReader()
    msgs = [m for byte in good for m in r2.feed(bytes([byte]))]
    assert msgs == [{"id": 1, "ok": True}]


def test_agent_port_lookup_by_sysfs_name(tmp_path: Path) -> None:
    from agentbox_guest_init.agent import find_port

    sys_ports, dev = tmp_path / "sys", tmp_path / "dev"
    (sys_ports / "vport1p1").mkdir(parents=True)
    (sys_ports / "vport1p1/name").write_text("org.agentbox.status\n")
    (sys_ports / "vport1p2").mkdir()
    (sys_ports / "vport1p2/name").write_text("org.agentbox.agent\n")
    dev.mkdir()
    (dev / "vport1p2").write_text("")
    assert find_port("org.agentbox.agent", sys_ports, dev, timeout=1) == str(dev / "vport1p2")
    (dev / "virtio-ports").mkdir()
    (dev / "virtio-ports/org.agentbox.agent").write_text("")
    assert find_port("org.agentbox.agent", sys_ports, dev, timeout=1) == str(dev / "virtio-ports/org.agentbox.agent")
    with pytest.raises(SystemExit, match="no virtio-serial port named nope within 0.2s "
                                         r"\(ports seen: org.agentbox.status, org.agentbox.agent\)"):
        find_port("nope", sys_ports, dev, timeout=0.2)


class HostileGuest:
    """A scripted 'agent' on a socketpair: answers each request with whatever ``respond`` returns
    (None: no answer; with ``close_on_none``, drop the channel instead)."""

    def __init__(self, respond, close_on_none: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.host, self.guest = socket.socketpair()
        self.respond, self.close_on_none = respond, close_on_none
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        reader = FrameReader()
        try:
            while data := self.guest.recv(65536):
                for req in reader.feed(data):
                    out = self.respond(req)
                    if out is None and self.close_on_none:
                        self.guest.close()
                        return
                    if out is not None:
                        self.guest.sendall(out)
        except OSError:
            pass

    def close(self) -> None:
        self.host.close()
        self.guest.close()


def _raw_frame(text: bytes) -> bytes:
    import base64
    import zlib

    payload = base64.b64encode(text)
    return b"\n" + MAGIC + payload + b" " + f"{zlib.crc32(payload):08x}".encode() + b"\n"


def test_deeply_nested_json_from_the_guest_is_a_named_drop_not_a_crash() -> None:
    g = HostileGuest(lambda req: _raw_frame(b'{"id": %d, "ok": true, "x": ' % req["id"] + b"[" * 100000
                                            + b"]" * 100000 + b"}"))
    try:
        with pytest.raises(ChannelTimeout, match="JSON nested deeper than 32 levels"):
            AgentClient(g.host).ping(1.0)
    finally:
        g.close()


def test_frames_with_ids_never_requested_are_not_kept() -> None:
    def flood(req):  # type: ignore[no-untyped-def]
        return b"".join(encode_frame({"id": 10_000 + i, "ok": True, "pad": "x" * 1000}) for i in range(500)) + \
            encode_frame({"id": req["id"], "ok": True})
    g = HostileGuest(flood)
    try:
        client = AgentClient(g.host)
        client.ping(5)
        assert client.pending == {} and client.unrequested == 500
    finally:
        g.close()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("exit_status", "zero", "exit_status is 'zero', not int"),
    ("exit_status", None, "exit_status is None, not int"),
    ("stdout", 5, "stdout is not a base64 string"),
    ("stdout", "***", "stdout is not valid base64"),
])
def test_a_malformed_run_response_is_a_channel_error(field: str, value: object, message: str) -> None:
    def answer(req):  # type: ignore[no-untyped-def]
        resp = {"id": req["id"], "ok": True, "exit_status": 0, "stdout": "", "stderr": "", "duration_s": 0.1}
        resp[field] = value
        return encode_frame(resp)
    g = HostileGuest(answer)
    try:
        with pytest.raises(ChannelError, match=f"malformed 'run' response: {message}"):
            AgentClient(g.host).run(["true"], timeout=5)
    finally:
        g.close()


def test_a_send_the_guest_never_reads_times_out() -> None:
    host, guest = socket.socketpair()
    try:
        host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client = AgentClient(host)
        started = time.monotonic()
        with pytest.raises(ChannelTimeout, match="did not take 'write_file' within"):
            client.write_file("/x", b"y" * (8 << 20), timeout=1.0)
        assert time.monotonic() - started < 30
    finally:
        host.close()
        guest.close()


def test_an_oversized_frame_is_dropped_with_bounded_memory() -> None:
    reader = FrameReader(max_frame=1 << 20)
    reader.feed(MAGIC + b"A" * (2 << 20))
    assert len(reader.buf) < (1 << 20) and reader.dropped == 1
    assert "longer than" in reader.last_drop


def test_files_round_trip_in_chunks_with_digest_checks(piped, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, _ = piped
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(5):
            f.write(os.urandom(1 << 20) * 3)  # 15 MiB: several chunks, over the old single-frame caps
    client.upload(src, str(tmp_path / "guest" / "big.bin"), timeout=120)
    back = tmp_path / "back.bin"
    assert client.download(str(tmp_path / "guest" / "big.bin"), back, timeout=120) == src.stat().st_size
    assert back.read_bytes() == src.read_bytes()
    (tmp_path / "empty").write_bytes(b"")
    assert client.read_file(str(tmp_path / "empty")) == b""


def test_a_program_on_a_guest_pty_through_the_relay(piped) -> None:  # type: ignore[no-untyped-def]
    import pexpect
    from pexpect import fdpexpect

    from agentbox_runtime.channel import PtyRelay

    client, _ = piped
    pty = client.pty_spawn(["sh", "-c", "stty size; tty; read x; echo got $x; exit 5"], user="root", rows=33, cols=101)
    relay = PtyRelay(client, pty)
    child = fdpexpect.fdspawn(relay.local.fileno(), timeout=20, encoding="utf-8")
    child.expect(r"33 101\r?\n/dev/pts/\d+")
    child.sendline("hello")
    child.expect("got hello")
    child.expect(pexpect.EOF)
    relay.close()
    assert relay.exit_status == 5 and relay.error is None


def test_pty_io_on_an_unknown_session_is_a_channel_error(piped) -> None:  # type: ignore[no-untyped-def]
    client, _ = piped
    with pytest.raises(ChannelError, match="no pty session 999"):
        client.pty_io(999)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TOKEN = "t" * 20 + "0123456789abcdef0123"


def test_a_tcp_attach_channel_answers_only_after_both_ends_proved_the_token(piped) -> None:  # type: ignore[no-untyped-def]
    client, _ = piped
    port = _free_port()
    with pytest.raises(ChannelError, match="token must be a string of at least 32"):
        client.attach_listen(port, "short")
    client.attach_listen(port, TOKEN)
    client.attach_listen(port, TOKEN)  # idempotent
    attached = AgentClient.connect_tcp("127.0.0.1", port, TOKEN, 10.0)
    try:
        assert attached.run(["echo", "via tcp"], timeout=30, user="root").text == "via tcp\n"
    finally:
        attached.close()
    # a client with another token: the guest's proof does not match it, so the client sends nothing more
    with pytest.raises(GuestAuthError, match=f"^the guest at 127.0.0.1:{port} did not prove it holds this "
                                             "guest's attach token; refusing to attach$"):
        AgentClient.connect_tcp("127.0.0.1", port, TOKEN[:-1] + "x", 10.0)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # a request before auth
        raw.sendall(encode_frame({"op": "run", "id": 1, "argv": ["touch", "/tmp/never"]}))
        assert [a.get("ok") for a in _answers(raw)] == [False]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # the old exchange: the token itself
        raw.sendall(encode_frame({"op": "auth", "id": 1, "token": TOKEN}))
        answers = _answers(raw)
        assert [a.get("ok") for a in answers] == [False] and "client_nonce" in answers[0]["error"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # a hello, then a wrong proof
        auth = ClientAuth(TOKEN)
        raw.sendall(encode_frame({"op": "auth", "id": 1, **auth.hello()}))
        reader, hello = FrameReader(), []
        while not hello:
            hello = reader.feed(raw.recv(65536))
        assert auth.answer(hello[0])  # the real guest proves it holds the token
        raw.sendall(encode_frame({"op": "auth_proof", "id": 2, "proof": "0" * 64}))
        answers = _answers(raw, reader)
        assert [a.get("ok") for a in answers] == [False] and "authentication failed" in answers[0]["error"]


def _answers(raw: socket.socket, reader: FrameReader | None = None) -> list[dict[str, object]]:
    """Every frame the agent sends until it closes the connection (it answers a refused one once, then closes)."""
    reader, answers = reader or FrameReader(), []
    while data := raw.recv(65536):
        answers += reader.feed(data)
    return answers


def test_linger_keeps_the_agent_serving_its_attach_channels_after_the_main_one_closes(piped) -> None:  # type: ignore[no-untyped-def]
    client, proc = piped
    port = _free_port()
    client.attach_listen(port, TOKEN)
    client.linger()
    proc.stdin.close()  # the harness went away
    attached = AgentClient.connect_tcp("127.0.0.1", port, TOKEN, 10.0)
    try:
        assert attached.run(["echo", "still here"], timeout=30, user="root").text == "still here\n"
        assert proc.poll() is None
        attached.shutdown()  # a shutdown on any channel ends the agent
    finally:
        attached.close()
    assert proc.wait(timeout=30) == 0


def test_without_linger_the_end_of_the_main_channel_ends_the_agent(piped) -> None:  # type: ignore[no-untyped-def]
    client, proc = piped
    client.attach_listen(_free_port(), TOKEN)
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
