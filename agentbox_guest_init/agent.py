"""``agentbox-guest-init agent``: the guest side of the harness control channel.

Serves framed requests (:mod:`agentbox_guest_init.protocol`) over stdin/stdout, a
device (``--device PATH``) or a named virtio-serial port (``--port NAME``).
Requests run concurrently; each response echoes the request ``id``:

- ``ping`` → ``pong``, the agent's pid and uid;
- ``run``: ``argv``, ``env``, ``cwd`` (default: the agent's own cwd, where ``enter`` started it), ``user``
  (default the image's user, ``dev`` in the stock image, with the ids of the env
  contract; ``root`` allowed), ``timeout``, ``stdin`` → ``exit_status``
  (128+N for signal N), ``signal``, ``stdout``, ``stderr``, ``duration_s``,
  ``timed_out``. The command runs in its own process group, killed whole on
  timeout. As dev it gets the dev shell environment (7.9, plus ``NIX_REMOTE``
  with the nix overlay);
- ``read_file`` / ``write_file`` (``mode``, ``owner``: the image's user or ``root``);
- ``prep_status`` (``nix`` | ``podman``) → the status file fields;
- ``pty_spawn`` / ``pty_io`` / ``pty_resize`` / ``pty_close``: an interactive
  program on a real pty in the guest (:mod:`agentbox_guest_init.pty_sessions`);
  window sizes are integers from 1 to 4096 (``protocol.winsize``), others refused;
- ``linger``: from now on the EOF of the main channel (the harness went away,
  ``--preserve-debug``) does not end the agent; it keeps serving its attach
  channels until a ``shutdown``;
- ``attach_listen``: ``port``, ``token`` → serve TCP ``port`` too; on every
  connection the host and the agent first prove to each other that they hold
  ``token``, which never crosses that connection (``auth``/``auth_proof``, see
  :mod:`agentbox_guest_init.protocol`); at most 8 connections wait to do so at
  once, each sending a few KiB at most;
- ``shutdown`` → sync, answer, then exit, on every channel (PID 1 of a guest
  powers off when its command, the agent, ends): the guest's own poweroff, the
  first rung of the host's shutdown ladder.

Besides the main channel, the agent serves ``agentbox attach`` on what the VMM
offers (:func:`serve_attach_channels`).

The agent runs as root (the host starts it with ``AGENTBOX_ENTER_AS_ROOT=1``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agentbox_guest_init import contract as c
from agentbox_guest_init import hardened_profile, image_user, listeners, prep
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.identity import Identity, dev_identity
from agentbox_guest_init.proc import ROOT, run_tool
from agentbox_guest_init.pty_sessions import PtySessions
from agentbox_guest_init.protocol import (
    MAX_FRAME, MIN_TOKEN_CHARS, PREAUTH_MAX_BYTES, PREAUTH_MAX_FRAME, FrameReader, GuestAuth, b64, encode_frame, unb64,
    winsize, write_all,
)
from agentbox_guest_init.shell_env import nix_remote_env, shell_env

OUTPUT_CAP = 8 << 20
DEFAULT_TIMEOUT_S = 60.0
DRAIN_GRACE_S = 2.0  # how long to keep reading after exit when a grandchild holds the pipes
PORT_WAIT_S = 10.0
AUTH_S = 10.0  # a token channel must authenticate within this
PREAUTH_NOISE_KEEP = 256  # bytes of noise a connection keeps for diagnostics before it authenticated
SHUTDOWN = threading.Event()
"""Set by a ``shutdown`` on any channel: every channel stops and the agent exits."""
LINGER = threading.Event()
"""Set by ``linger``: the main channel's EOF (the harness went away) no longer ends the agent."""
_TCP_PORTS: dict[int, socket.socket] = {}
_TCP_LOCK = threading.Lock()
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def command_env(user: str, extra: Mapping[str, str], base: Mapping[str, str],
                root: Path = ROOT) -> tuple[dict[str, str], Identity | None]:
    """The environment of a ``run`` request and the identity to drop to (None: stay root)."""
    env = {k: v for k, v in base.items() if k not in (c.ENV_GUEST_PROFILE, c.ENV_GUEST_DEBUG)}
    env["PATH"] = env.get("PATH") or DEFAULT_PATH
    genv = GuestEnv.parse(base)
    ident: Identity | None = None
    if user == "root":
        env.update(HOME="/root", USER="root", LOGNAME="root")
    else:
        ident = dev_identity(genv, root)
        env.update(shell_env(ident, genv, env["PATH"]))
    env.update(nix_remote_env(genv))
    env.update(extra)
    return env, ident


def _reader(stream: Any, sink: bytearray) -> None:
    try:
        while chunk := os.read(stream.fileno(), 65536):
            sink += chunk
            if len(sink) > 2 * OUTPUT_CAP:
                del sink[:-OUTPUT_CAP]
    except (OSError, ValueError):
        pass


def _writer(stream: Any, data: bytes) -> None:
    try:
        if data:
            write_all(stream.fileno(), data)
    except (OSError, ValueError):
        pass
    finally:
        with contextlib.suppress(OSError):
            stream.close()


def _uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _as_user(req: Mapping[str, Any], base_env: Mapping[str, str] | None = None
             ) -> tuple[dict[str, str], Callable[[], None], str | None]:
    """The environment, the privilege drop (for ``preexec_fn``) and the cwd of a request's ``user``;
    ValueError when the user is not the image's user or root, or the agent cannot become it."""
    image = image_user.load()
    user = req.get("user") or image.user
    if user not in (image.user, "root"):
        raise ValueError(f"run user must be '{image.user}' (the image's user) or 'root', got {user!r}")
    env, ident = command_env(user, req.get("env") or {}, os.environ if base_env is None else base_env)
    euid = os.geteuid()
    if euid != 0 and (user == "root" or (ident is not None and ident.uid != euid)):
        raise ValueError(f"run as {user!r} asked, but the agent runs as uid {euid} and cannot switch users "
                         "(start the agent as root)")
    cwd = req.get("cwd") or None  # None: where the agent itself was started (enter's cwd), never a default

    hardened = ident is not None and hardened_profile.enabled(base_env if base_env is not None else os.environ)

    def demote() -> None:
        if ident is not None and os.geteuid() == 0:
            if hardened:
                hardened_profile.drop_bounding_set()
            os.setgroups([])
            os.setgid(ident.gid)
            os.setuid(ident.uid)
        if hardened:
            hardened_profile.confine()

    return env, demote, None if cwd is None else str(cwd)


PTYS = PtySessions()


def pty_op(op: str, req: Mapping[str, Any]) -> dict[str, Any]:
    """``pty_spawn`` (argv, user, env, cwd, rows, cols), ``pty_io`` (pty, data, wait_s),
    ``pty_resize`` (pty, rows, cols), ``pty_close`` (pty): see :mod:`agentbox_guest_init.pty_sessions`."""
    if op == "pty_spawn":
        rows, cols = winsize(req.get("rows", 24), req.get("cols", 80))
        env, demote, cwd = _as_user(req)
        env.setdefault("TERM", "xterm")
        return PTYS.spawn([str(a) for a in req.get("argv") or []], env, cwd, rows, cols, demote)
    if op == "pty_io":
        return PTYS.io(req.get("pty"), unb64(req.get("data")), float(req.get("wait_s") or 0.0))
    if op == "pty_resize":
        return PTYS.resize(req.get("pty"), *winsize(req.get("rows"), req.get("cols")))
    return PTYS.close(req.get("pty"))


def run_command(req: Mapping[str, Any], base_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run one ``run`` request to completion or timeout."""
    argv = [str(a) for a in req.get("argv") or []]
    if not argv:
        return {"ok": False, "error": "run needs a non-empty argv"}
    try:
        env, demote, cwd = _as_user(req, base_env)
    except ValueError as exc:
        return {"ok": False, "error": str(exc)}
    timeout = float(req.get("timeout") or DEFAULT_TIMEOUT_S)

    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=cwd, start_new_session=True, preexec_fn=demote)
    except (OSError, subprocess.SubprocessError) as exc:
        message = getattr(exc, "strerror", None) or str(exc)
        return {"ok": True, "exit_status": 127, "signal": None, "stdout": "",
                "stderr": b64(f"{argv[0]}: {message}\n".encode()), "duration_s": 0.0, "timed_out": False}
    out, err = bytearray(), bytearray()
    threads = [threading.Thread(target=_reader, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, err), daemon=True),
               threading.Thread(target=_writer, args=(proc.stdin, unb64(req.get("stdin"))), daemon=True)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    grace = time.monotonic() + DRAIN_GRACE_S
    for t in threads[:2]:
        t.join(max(0.0, grace - time.monotonic()))
    duration = time.monotonic() - started
    for stream in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            stream.close()  # type: ignore[union-attr]
    rc = proc.returncode
    return {"ok": True, "exit_status": rc if rc >= 0 else 128 - rc, "signal": -rc if rc < 0 else None,
            "stdout": b64(bytes(out[-OUTPUT_CAP:])), "stderr": b64(bytes(err[-OUTPUT_CAP:])),
            "duration_s": round(duration, 4), "timed_out": timed_out}


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
    if owner in (None, ""):
        return None
    if owner == "root":
        return 0, 0
    image = image_user.load()
    if owner == image.user:
        ident = dev_identity(GuestEnv.parse())
        return ident.uid, ident.gid
    raise ValueError(f"owner must be '{image.user}' (the image's user) or 'root', got {owner!r}")


def _sha256(path: Path) -> str:
    import hashlib  # only file transfers need it; loading OpenSSL costs 0.1 s at every agent start under TCG

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_file(req: Mapping[str, Any]) -> dict[str, Any]:
    """``length`` bytes (default all) of ``path`` from ``offset``, the file's ``size``, and its
    ``sha256`` when ``digest`` is set (chunked transfers ask for it once, at the end)."""
    path = Path(req["path"])
    offset, length = int(req.get("offset") or 0), req.get("length")
    if offset < 0 or (length is not None and int(length) < 0):
        raise ValueError("offset and length must be non-negative")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(offset)
        data = f.read() if length is None else f.read(int(length))
    resp: dict[str, Any] = {"ok": True, "data": b64(data), "size": size}
    if req.get("digest"):
        resp["sha256"] = _sha256(path)
    return resp


def write_file(req: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``data`` to ``path`` (atomically), then set ``mode`` and ``owner``.

    A chunked transfer names itself with ``transfer`` (letters and digits): ``first`` starts
    its temporary file, each request appends, and ``final`` checks ``sha256`` (when given),
    then sets mode and owner and renames it over ``path``."""
    path = Path(req["path"])
    ids = _owner_ids(req.get("owner"))
    transfer = str(req.get("transfer") or "")
    if transfer and not (transfer.isalnum() and len(transfer) <= 32):
        raise ValueError("transfer must be 1-32 letters or digits")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = transfer or f"{os.getpid()}-{threading.get_ident()}"
    tmp = path.with_name(f".{path.name}.agentbox-{tag}")
    with open(tmp, "wb" if (not transfer or req.get("first")) else "ab") as f:
        f.write(unb64(req.get("data")))
    if transfer and not req.get("final"):
        return {"ok": True}
    want = req.get("sha256")
    if want and _sha256(tmp) != want:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"sha256 mismatch for {path}: the transfer was damaged")
    os.chmod(tmp, int(req.get("mode", 0o644)))
    if ids is not None:
        os.chown(tmp, *ids)
    os.replace(tmp, path)
    return {"ok": True}


def prep_status(kind: str) -> dict[str, Any]:
    """The fields of the ``nix`` or ``podman`` prep status file."""
    if kind not in prep.KINDS:
        raise ValueError(f"prep kind must be one of {', '.join(prep.KINDS)}, got {kind!r}")
    pk = prep.KINDS[kind]
    st = pk.status().read()
    return {"ok": True, "state": st.state, "pid": st.pid, "started_at": st.started_at,
            "finished_at": st.finished_at, "error": st.error, "log_path": st.log_path or pk.log_path,
            "status_path": pk.status_path}


def _ping(req: Mapping[str, Any]) -> dict[str, Any]:
    return {"ok": True, "pong": True, "pid": os.getpid(), "uid": os.geteuid(), "uptime": _uptime()}


def _linger(req: Mapping[str, Any]) -> dict[str, Any]:
    LINGER.set()
    return {"ok": True}


def _shutdown(req: Mapping[str, Any]) -> dict[str, Any]:
    os.sync()  # the guest's writes reach its disks before PID 1 powers the VM off
    return {"ok": True, "shutdown": True}


def _pty(op: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    return lambda req: pty_op(op, req)


def handle(req: Mapping[str, Any]) -> dict[str, Any]:
    """The response to one request (never raises)."""
    op = req.get("op")
    fn = OPS.get(op) if isinstance(op, str) else None
    if fn is None:
        return {"ok": False, "error": f"unknown op {op!r}; accepted: {', '.join(OPS)}"}
    try:
        return fn(req)
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the host
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def find_port(name: str, base: Path = Path("/sys/class/virtio-ports"), dev: Path = Path("/dev"),
              timeout: float = PORT_WAIT_S) -> str:
    """The device of virtio-serial port ``name``: ``/dev/virtio-ports/NAME``, else a scan of ``base``."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        link = dev / "virtio-ports" / name
        if link.exists():
            return str(link)
        seen = []
        if base.is_dir():
            for port in sorted(base.iterdir()):
                try:
                    port_name = (port / "name").read_text().strip()
                except OSError:
                    continue
                seen.append(port_name)
                if port_name == name and (dev / port.name).exists():
                    return str(dev / port.name)
        if time.monotonic() > deadline:
            raise SystemExit(f"agentbox-guest-init agent: no virtio-serial port named {name} within "
                             f"{timeout:g}s (ports seen: {', '.join(seen) or 'none'})")
        time.sleep(0.1)


class Server:
    """Serve requests read from ``rfd``, answering on ``wfd``, until EOF or ``shutdown``.

    ``reconnecting``: EOF means "no host side right now" (a virtio-serial port): keep polling.
    ``main``: the agent's own channel; after a ``linger`` request its EOF no longer ends the
    agent, which keeps serving its attach channels until a ``shutdown`` on any channel.
    ``token``: a network channel; the host must prove it holds this token first
    (:class:`agentbox_guest_init.protocol.GuestAuth`, which proves the guest holds it too), within
    AUTH_S. Until then the connection may send at most PREAUTH_MAX_BYTES, in frames of at most
    PREAUTH_MAX_FRAME, and what it buffers counts against ``admission`` (its listener's
    :class:`~agentbox_guest_init.listeners.PreauthGate`); anything else closes the connection.
    """

    def __init__(self, rfd: int, wfd: int, *, reconnecting: bool = False, main: bool = False,
                 token: str | None = None, admission: listeners.Admission | None = None) -> None:
        self.rfd, self.wfd, self.reconnecting, self.main = rfd, wfd, reconnecting, main
        self.auth = GuestAuth(token) if token is not None else None
        self.admission = admission
        self.preauth_bytes = 0
        self.reader = FrameReader(noise_keep=PREAUTH_NOISE_KEEP, max_frame=PREAUTH_MAX_FRAME) \
            if self.auth is not None else FrameReader()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def send(self, resp: dict[str, Any]) -> None:
        frame = encode_frame(resp)
        with self.lock:
            try:
                write_all(self.wfd, frame)
            except OSError as exc:
                print(f"agentbox-guest-init agent: cannot answer: {exc}", file=sys.stderr)

    def reply(self, req: dict[str, Any]) -> None:
        resp = handle(req)
        if "id" in req:
            resp["id"] = req["id"]
        self.send(resp)
        if resp.get("shutdown"):
            self.stop.set()
            SHUTDOWN.set()

    def authenticate(self, req: dict[str, Any]) -> bool | None:
        """One request of a connection that has not authenticated yet, answered: None to go on,
        True once it authenticated, False to close it."""
        assert self.auth is not None
        resp, verdict = self.auth.step(req)
        if "id" in req:
            resp["id"] = req["id"]
        self.send(resp)
        if verdict:
            self.auth = None
            self.reader.max_frame = MAX_FRAME  # the normal limit from now on
            if self.admission is not None:
                self.admission.release()
        return verdict

    def _held(self) -> int:
        return len(self.reader.buf) + len(self.reader.noise)

    def _preauth_read(self, data: bytes) -> bool:
        """Account ``data`` read before authentication; False when the connection is over a limit."""
        self.preauth_bytes += len(data)
        if self.preauth_bytes > PREAUTH_MAX_BYTES:
            return False
        return self.admission is None or self.admission.hold(self._held() + len(data))

    def _preauth_fed(self) -> bool:
        """After a feed before authentication: what the reader still holds counts; False when that
        takes its listener's pre-authentication bytes over their limit."""
        return self.admission is None or self.admission.hold(self._held())

    def serve(self) -> int:
        """The loop; 0 on EOF or shutdown, 1 when a token channel fails to authenticate."""
        started = time.monotonic()
        while not (self.stop.is_set() or SHUTDOWN.is_set()):
            if self.auth is not None and time.monotonic() - started > AUTH_S:
                return 1
            data = self._read()
            if data is None:
                continue
            if not data:
                if self._reconnects():
                    continue
                return 0
            if not self._take(data):
                return 1
        return 0

    def _read(self) -> bytes | None:
        """What the channel holds now: None when nothing came within 0.5 s (or the read was
        interrupted), ``b""`` at EOF or on a read error."""
        ready, _, _ = select.select([self.rfd], [], [], 0.5)
        if not ready:
            return None
        try:
            return os.read(self.rfd, PREAUTH_MAX_FRAME if self.auth is not None else 1 << 16)
        except InterruptedError:
            return None
        except OSError:
            return b""

    def _reconnects(self) -> bool:
        """At EOF: True when the channel reconnects (read again after a moment); else False, once
        the main channel asked to linger has seen the shutdown."""
        if self.reconnecting:
            time.sleep(0.2)
            return True
        if self.main and LINGER.is_set():
            SHUTDOWN.wait()
        return False

    def _take(self, data: bytes) -> bool:
        """Feed ``data``: before authentication its frames are the proof, after it each request gets
        a reply thread. False when the connection must end (a pre-authentication limit, a frame too
        long or damaged before authentication, a failed proof)."""
        if self.auth is not None and not self._preauth_read(data):
            return False
        requests = self.reader.feed(data)
        if self.auth is not None and self.reader.dropped:
            return False
        for req in requests:
            if self.auth is None:
                threading.Thread(target=self.reply, args=(req,), daemon=True).start()
            elif self.authenticate(req) is False:
                return False
        return self.auth is None or self._preauth_fed()


def serve_connection(conn: socket.socket, admission: listeners.Admission | None = None,
                     token: str | None = None) -> int:
    """Serve one accepted connection until it closes (the host proving it holds ``token`` first
    when one is set, its pre-authentication input counted against ``admission``)."""
    return Server(conn.fileno(), conn.fileno(), token=token, admission=admission).serve()


def attach_listen(req: Mapping[str, Any]) -> dict[str, Any]:
    """``attach_listen``: serve ``port`` over TCP too; on every connection the host and the guest
    prove to each other that they hold ``token`` (at least 32 characters) before anything else, and
    at most :data:`listeners.PREAUTH_CONNECTIONS` connections wait to do so at once. Idempotent for
    a port already served."""
    port, token = req.get("port"), req.get("token")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"attach_listen port must be 1-65535, got {port!r}")
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"attach_listen token must be a string of at least {MIN_TOKEN_CHARS} characters")
    with _TCP_LOCK:
        if port not in _TCP_PORTS:
            listener = listeners.tcp_listener(port)
            listeners.accept_forever(listener, lambda conn, admission: serve_connection(conn, admission, token),
                                     f"attach-tcp-{port}", gate=listeners.PreauthGate())
            _TCP_PORTS[port] = listener
    return {"ok": True, "port": port}


OPS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "ping": _ping, "run": run_command, "read_file": read_file, "write_file": write_file,
    "prep_status": lambda req: prep_status(str(req.get("kind"))),
    **{op: _pty(op) for op in ("pty_spawn", "pty_io", "pty_resize", "pty_close")},
    "linger": _linger, "attach_listen": attach_listen, "shutdown": _shutdown,
}
"""Request op -> its handler, in the order the unknown-op error lists them."""


def serve_attach_vsock(port: int = c.ATTACH_VSOCK_PORT) -> bool:
    """Serve ``agentbox attach`` on vsock ``port`` for any CID, in a thread: what libkrun bridges the
    host's attach socket to (``krun_add_vsock_port2(..., listen=true)``: the host side listens and
    opens a vsock stream to this port per connection). False when the guest has no vsock transport."""
    try:
        listener = listeners.vsock_listener(port)
    except (OSError, AttributeError):
        return False
    listeners.accept_forever(listener, lambda conn, _admission: serve_connection(conn), "attach-vsock")
    return True


def serve_attach_channels() -> None:
    """Serve ``agentbox attach`` channels too, in threads, on whatever the VMM offers. They are free
    while the harness holds the main channel (``pytest --pdb``) and stay served after it went away
    (``--preserve-debug``, after ``linger``):

    - the virtio-serial port :data:`contract.ATTACH_PORT_NAME` (qemu);
    - vsock port :data:`contract.ATTACH_VSOCK_PORT` (libkrun bridges a host unix socket to it),
      or the virtio-serial port that carries it on a VMM without virtio-vsock.
    """
    serve_attach_vsock()
    for name in (c.ATTACH_PORT_NAME, c.vsock_port_name(c.ATTACH_VSOCK_PORT)):
        try:
            device = find_port(name, timeout=0.0)
        except SystemExit:
            continue
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
        threading.Thread(target=Server(fd, fd, reconnecting=True).serve, name=f"attach-{name}", daemon=True).start()


def main(device: str | None, port: str | None) -> int:
    """Entry point of ``agentbox-guest-init agent``."""
    if hardened_profile.enabled() and os.geteuid() == 0:
        hardened_profile.read_only_root(run_tool, allowed=hardened_profile.exceptions())
    if port:
        device = find_port(port)
    serve_attach_channels()
    if device:
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
        return Server(fd, fd, reconnecting=True, main=True).serve()
    return Server(0, 1, main=True).serve()
