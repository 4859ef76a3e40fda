"""``libkrun podman service-wait``: start or repair the rootless Podman API socket (reference 7.6).

Waits for the Podman prep, then, unless ``/run/user/<uid>/podman/podman.sock``
already accepts connections, takes ``service.lock`` (flock, retried every
100 ms), removes a stale socket and starts the **real** podman as dev:
``podman system service --time=0 unix://<sock>``, in its own session with a
clean environment, output appended to the Podman prep log.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.identity import Identity
from agentbox_guest_init.proc import ROOT, under

WRAPPER_MARK = b"agentbox-guest-init libkrun podman "
SERVICE_POLL_S = 0.1
KEPT_VARS = ("SSL_CERT_FILE", "NIX_SSL_CERT_FILE")


def is_wrapper(path: str) -> bool:
    """The first 8192 bytes of ``path`` name ``agentbox-guest-init libkrun podman``."""
    try:
        with open(path, "rb") as f:
            return WRAPPER_MARK in f.read(8192)
    except OSError:
        return False


def real_podman(env: Mapping[str, str] | None = None) -> str:
    """``$AGENTBOX_REAL_PODMAN`` (never a wrapper), else the first podman on PATH that is no wrapper."""
    env = os.environ if env is None else env
    explicit = env.get(c.ENV_REAL_PODMAN)
    if explicit:
        if is_wrapper(explicit):
            raise GuestError(f"refusing to start Podman API service through compatibility wrapper {explicit}")
        if not os.access(explicit, os.X_OK):
            raise GuestError(f"{c.ENV_REAL_PODMAN}={explicit} is not an executable file; "
                             "set it to the image Podman path")
        return explicit
    for d in env.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(d or ".", "podman")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK) and not is_wrapper(candidate):
            return candidate
    raise GuestError("could not find real podman binary; set AGENTBOX_REAL_PODMAN to the image Podman path")


def accepts(sock: Path) -> bool:
    """A connection to the unix socket ``sock`` succeeds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(sock))
        except OSError:
            return False
        return True


def service_env(ident: Identity, env: Mapping[str, str]) -> dict[str, str]:
    """The cleared environment of the API service (dev's, with the helper dir first on PATH)."""
    home = ident.home
    out = {"USER": ident.name, "LOGNAME": ident.name, "HOME": home, "SHELL": ident.shell,
           "XDG_RUNTIME_DIR": f"/run/user/{ident.uid}", **c.dev_dirs(home), "TMPDIR": f"{home}/.cache/tmp",
           "PATH": f"{c.IDMAP_BIN_DIR}:{env.get('PATH') or '/usr/local/bin:/usr/bin:/bin'}"}
    out.update({k: env[k] for k in KEPT_VARS if k in env})
    return out


def _spawn(ident: Identity, sock: Path, root: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    as_root = os.geteuid() == 0
    log_path = under(root, c.PODMAN_PREP_LOG)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if not as_root and not os.access(log_path, os.W_OK):
        # prep normally hands the log to dev; if it could not, keep the output next to the socket
        log_path = sock.parent / "podman-service.log"
    with open(log_path, "ab") as log:
        if as_root:
            os.chown(log_path, ident.uid, ident.gid)
            os.chmod(log_path, 0o644)

        def drop() -> None:
            if as_root:
                os.setgroups([])
                os.setgid(ident.gid)
                os.setuid(ident.uid)

        return subprocess.Popen([real_podman(env), "system", "service", "--time=0", f"unix://{sock}"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=service_env(ident, env),
                                cwd="/", start_new_session=True, preexec_fn=drop)


def service_wait(ident: Identity, timeout: float = c.PREP_WAIT_TIMEOUT_S, *, root: Path = ROOT,
                 env: Mapping[str, str] | None = None) -> None:
    """Ensure the Podman API socket accepts connections within ``timeout`` (prep must be ready)."""
    env = os.environ if env is None else env
    deadline = time.monotonic() + timeout
    sock = under(root, c.podman_socket_path(ident.uid))
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.geteuid() == 0:
        os.chown(sock.parent, ident.uid, ident.gid)
        os.chown(sock.parent.parent, ident.uid, ident.gid)
    if accepts(sock):
        return
    lock_path = sock.parent / "service.lock"
    with open(lock_path, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GuestError(f"timed out waiting for Podman API service lock {lock_path}") from None
                time.sleep(SERVICE_POLL_S)
        if accepts(sock):
            return
        sock.unlink(missing_ok=True)
        proc = _spawn(ident, sock, root, env)
        while not accepts(sock):
            exited = proc.poll()
            if exited is not None or time.monotonic() > deadline:
                how = "still starting" if exited is None else f"exited with status {exited}"
                raise GuestError(f"rootless Podman API service did not create a live socket at {sock} "
                                 f"(service {how}; log={c.PODMAN_PREP_LOG})")
            time.sleep(SERVICE_POLL_S)
