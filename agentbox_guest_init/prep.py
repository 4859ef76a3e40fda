"""Background prep workers and their waits, shared by nix and Podman (reference 7.5, 7.6).

The parent (root, during enter) spawns ``<self> libkrun <kind> prep`` in its
own session with output appended to the prep log and publishes ``running``
with the child's pid. The worker waits for that, runs the steps, and marks
the status ready or failed. :func:`wait` polls every 100 ms within one
deadline and names exactly what went wrong.
"""

from __future__ import annotations

import os
import socket as sockets
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.proc import ROOT, under
from agentbox_guest_init.status import StatusFile, pid_alive

PARENT_PUBLISH_TIMEOUT_S = 5.0
PARENT_PUBLISH_POLL_S = 0.02
WAIT_POLL_S = 0.1


@dataclass(frozen=True)
class PrepKind:
    """Names and wording of one prep."""

    kind: str  # "nix" | "podman"
    status_path: str
    log_path: str
    wait_env: str
    what: str  # status-file wording
    title: str  # wait wording
    parent_not_root: str

    def status(self, root: Path = ROOT) -> StatusFile:
        """The status file of this prep under ``root``."""
        return StatusFile(under(root, self.status_path), self.what)


NIX = PrepKind("nix", c.NIX_PREP_STATUS, c.NIX_PREP_LOG, c.ENV_NIX_PREP_WAIT_FOR_STATUS, "nix prep",
               "libkrun /nix overlay prep", "libkrun /nix overlay prep must start as root")
PODMAN = PrepKind("podman", c.PODMAN_PREP_STATUS, c.PODMAN_PREP_LOG, c.ENV_PODMAN_PREP_WAIT_FOR_STATUS,
                  "Podman prep", "rootless Podman prep", "rootless Podman root prep must start as root")
KINDS = {"nix": NIX, "podman": PODMAN}


def self_argv(env: Mapping[str, str] | None = None, argv0: str | None = None) -> list[str]:
    """How to re-run this program: ``$AGENTBOX_GUEST_INIT_SELF``, the launcher, or ``python3 -m``."""
    env = os.environ if env is None else env
    exe = env.get(c.ENV_GUEST_INIT_SELF) or (sys.argv[0] if argv0 is None else argv0)
    if os.path.basename(exe) == "agentbox-guest-init":
        return [exe]
    return [sys.executable, "-m", "agentbox_guest_init.cli"]


def start_background(kind: PrepKind, *, root: Path = ROOT, argv: Sequence[str] | None = None,
                     env: Mapping[str, str] | None = None, euid: int | None = None,
                     alive: Callable[[int], bool] = pid_alive) -> int | None:
    """Spawn the worker; the child's pid, or ``None`` when nothing was started.

    Idempotent: nothing happens when the prep is already ready or failed, or
    running in a live process. ``argv`` defaults to ``<self> libkrun <kind> prep``.
    """
    if (os.geteuid() if euid is None else euid) != 0:
        raise GuestError(kind.parent_not_root)
    status = kind.status(root)
    current = status.read()
    if current.state in ("ready", "failed") or (
            current.state == "running" and current.pid is not None and alive(current.pid)):
        return None
    under(root, c.RUN_DIR).mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ if env is None else env)
    child_env[kind.wait_env] = "1"
    with open(under(root, kind.log_path), "ab") as log:
        proc = subprocess.Popen(list(argv or [*self_argv(child_env), "libkrun", kind.kind, "prep"]),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env,
                                start_new_session=True)
    if not status.write_running_unless_terminal(proc.pid, kind.log_path):
        return None
    return proc.pid


def _await_parent(status: StatusFile, kind: PrepKind, pid: int) -> None:
    deadline = time.monotonic() + PARENT_PUBLISH_TIMEOUT_S
    while True:
        cur = status.read()
        if cur.state == "running" and cur.pid == pid:
            return
        if time.monotonic() > deadline:
            raise GuestError(f"timed out waiting for parent to publish {kind.what} running status for pid {pid}")
        time.sleep(PARENT_PUBLISH_POLL_S)


def run_worker(kind: PrepKind, steps: Callable[[], None], *, root: Path = ROOT,
               env: Mapping[str, str] | None = None) -> int:
    """The worker side: wait for the parent's ``running`` (or publish it), run, record the outcome.

    Returns the exit status: 0 when ready (or already terminal), 1 when failed.
    """
    env = os.environ if env is None else env
    status, pid = kind.status(root), os.getpid()
    if env.get(kind.wait_env) == "1":
        _await_parent(status, kind, pid)
    elif not status.write_running_unless_terminal(pid, kind.log_path):
        return 0
    try:
        steps()
    except Exception as exc:  # noqa: BLE001 - every failure is recorded in the status
        message = error_chain(exc)
        print(f"{kind.title} failed: {message}", file=sys.stderr, flush=True)
        if not isinstance(exc, GuestError):
            traceback.print_exc()
        status.mark_failed_for_pid(pid, message)
        return 1
    status.mark_ready_for_pid(pid)
    return 0


def error_chain(exc: BaseException) -> str:
    """``exc`` and its causes joined by ``: `` (the status ``error=`` value)."""
    parts: list[str] = []
    cur: BaseException | None = exc
    while cur is not None and len(parts) < 8:
        text = str(cur) or type(cur).__name__
        if not parts or text not in parts[-1]:
            parts.append(text)
        cur = cur.__cause__
    return ": ".join(parts)


def socket_accepts(path: Path, timeout: float = 2.0) -> bool:
    """A server accepts connections at the Unix socket ``path``: a socket file alone proves nothing,
    as one left by an earlier boot stays on a persistent disk (the nix store's daemon socket)."""
    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
        except OSError:
            return False
    return True


def socket_state(path: Path) -> str:
    """What is at ``path``: socket, missing, regular-file, directory, symlink, non-socket or unreadable."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"
    if stat.S_ISSOCK(st.st_mode):
        return "socket"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISREG(st.st_mode):
        return "regular-file"
    return "non-socket"


def wait(kind: PrepKind, timeout: float = c.PREP_WAIT_TIMEOUT_S, *, socket: str | None = None,
         root: Path = ROOT, alive: Callable[[int], bool] = pid_alive) -> None:
    """Wait until the prep is ready (and, for nix, ``socket`` is a Unix socket), within ``timeout``.

    Fails at once when the prep failed, never started, or runs under a dead pid.
    """
    status = kind.status(root)
    deadline = time.monotonic() + timeout
    secs = f"{timeout:g}s"
    while True:
        cur = status.read()
        log = cur.log_path or kind.log_path
        if cur.state == "ready":
            break
        if cur.state == "failed":
            raise GuestError(f"{kind.title} failed: {cur.error or 'unknown error'}; "
                             f"status={kind.status_path}; log={log}")
        if cur.state == "not-started":
            raise GuestError(f"{kind.title} has not started; missing status at {kind.status_path}")
        if cur.pid is not None and not alive(cur.pid):
            raise GuestError(f"{kind.title} has stale/dead PID {cur.pid}; status={kind.status_path}; log={log}")
        if time.monotonic() > deadline:
            raise GuestError(f"timed out after {secs} waiting for {kind.title} at {kind.status_path} "
                             f"(state={cur.state}; log={log})")
        time.sleep(WAIT_POLL_S)
    if socket is None:
        return
    sock = under(root, socket)
    while (observed := socket_state(sock)) != "socket" or not socket_accepts(sock):
        observed = "a socket refusing connections" if observed == "socket" else observed
        if time.monotonic() > deadline:
            raise GuestError(f"timed out after {secs} waiting for libkrun nix-daemon Unix socket at {socket} "
                             f"(observed={observed}); status={kind.status_path}; log={log}")
        time.sleep(WAIT_POLL_S)
