"""``agentbox-guest-init agent``: the guest side of the harness control channel.

Serves framed requests (:mod:`guest_init.protocol`) over stdin/stdout, a
device (``--device PATH``) or a named virtio-serial port (``--port NAME``):

- ``ping`` → ``pong``;
- ``run``: argv, env, cwd, user (default ``dev``; ``root`` allowed), timeout,
  stdin → exit status (or signal), stdout, stderr, duration, timed_out. The
  command runs in its own process group, killed whole on timeout. As dev it
  gets the dev shell environment (reference 7.9);
- ``read_file`` / ``write_file`` (mode, owner);
- ``prep_status`` (``nix`` | ``podman``) → the status file fields;
- ``shutdown`` → stop serving (PID 1 then powers off when its command ends).
"""

from __future__ import annotations

import os
import pwd
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from guest_init import contract as c
from guest_init import prep
from guest_init.env import GuestEnv, Identity, shell_env
from guest_init.protocol import FrameReader, b64, encode_frame, unb64

OUTPUT_CAP = 8 << 20


def dev_identity() -> Identity:
    try:
        pw = pwd.getpwnam(c.DEV_USER)
        return Identity(pw.pw_uid, pw.pw_gid, pw.pw_shell or "/bin/sh")
    except KeyError:
        return Identity(1000, 1000, "/bin/sh")


def _env_for(user: str, extra: dict[str, str]) -> tuple[dict[str, str], Identity | None]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBOX_GUEST_")}
    base.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if user == "root":
        base.update(HOME="/root", USER="root", LOGNAME="root")
        base.update(extra)
        return base, None
    ident = dev_identity()
    base.update(shell_env(ident, GuestEnv.parse(), base["PATH"]))
    base.update(extra)
    return base, ident


def run_command(req: dict[str, Any]) -> dict[str, Any]:
    argv = req.get("argv") or ["true"]
    user = req.get("user") or c.DEV_USER
    env, ident = _env_for(user, req.get("env") or {})
    cwd = req.get("cwd") or (c.WORKSPACE if os.path.isdir(c.WORKSPACE) else "/")
    timeout = float(req.get("timeout") or 60)

    def demote() -> None:
        os.setsid()
        if ident is not None and os.geteuid() == 0:
            os.setgroups([])
            os.setgid(ident.gid)
            os.setuid(ident.uid)

    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=cwd, preexec_fn=demote)
    except OSError as exc:
        return {"exit_status": 127, "stdout": "", "stderr": b64(f"{argv[0]}: {exc.strerror}\n".encode()),
                "duration_s": 0.0, "timed_out": False, "signal": None}
    timed_out = False
    try:
        out, err = proc.communicate(unb64(req.get("stdin")), timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
    rc = proc.returncode
    return {"exit_status": rc if rc >= 0 else 128 - rc, "signal": -rc if rc < 0 else None,
            "stdout": b64(out[-OUTPUT_CAP:]), "stderr": b64(err[-OUTPUT_CAP:]),
            "duration_s": round(time.monotonic() - started, 4), "timed_out": timed_out}


def handle(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    try:
        if op == "ping":
            return {"ok": True, "pong": True, "pid": os.getpid(), "uid": os.geteuid()}
        if op == "run":
            return {"ok": True, **run_command(req)}
        if op == "read_file":
            return {"ok": True, "data": b64(Path(req["path"]).read_bytes())}
        if op == "write_file":
            path = Path(req["path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(unb64(req.get("data")))
            os.chmod(path, int(req.get("mode", 0o644)))
            if req.get("owner") == c.DEV_USER:
                ident = dev_identity()
                os.chown(path, ident.uid, ident.gid)
            return {"ok": True}
        if op == "prep_status":
            st = prep.KINDS[req["kind"]].status().read()
            return {"ok": True, "state": st.state, "pid": st.pid, "error": st.error, "log_path": st.log_path}
        if op == "shutdown":
            return {"ok": True, "shutdown": True}
        return {"ok": False, "error": f"unknown op {op!r}"}
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the host
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def find_port(name: str) -> str:
    base = Path("/sys/class/virtio-ports")
    for _ in range(100):
        if base.is_dir():
            for port in base.iterdir():
                try:
                    if (port / "name").read_text().strip() == name:
                        dev = f"/dev/{port.name}"
                        if os.path.exists(dev):
                            return dev
                except OSError:
                    continue
        time.sleep(0.1)
    raise SystemExit(f"agentbox-guest-init agent: no virtio-serial port named {name}")


def serve(rfd: int, wout: BinaryIO) -> int:
    """Serve until EOF or a shutdown request. Requests run in threads; writes are serialized."""
    reader = FrameReader()
    lock = threading.Lock()
    stop = threading.Event()

    def reply(req: dict[str, Any]) -> None:
        resp = handle(req)
        resp["id"] = req.get("id")
        with lock:
            wout.write(encode_frame(resp))
            wout.flush()
        if resp.get("shutdown"):
            stop.set()

    while not stop.is_set():
        ready, _, _ = select.select([rfd], [], [], 0.5)
        if not ready:
            continue
        data = os.read(rfd, 65536)
        if not data:
            time.sleep(0.2)  # virtio port with no host connection reads EOF; keep serving
            if rfd == 0:
                return 0
            continue
        for req in reader.feed(data):
            threading.Thread(target=reply, args=(req,), daemon=True).start()
    return 0


def main(device: str | None, port: str | None) -> int:
    """Entry point of ``agentbox-guest-init agent``."""
    if port:
        device = find_port(port)
    if device:
        fd = os.open(device, os.O_RDWR)
        return serve(fd, os.fdopen(os.dup(fd), "wb", buffering=0))
    return serve(0, sys.stdout.buffer)
