"""Background prep workers and their waits, shared by nix and Podman (reference 7.5, 7.6).

The parent (root, during enter) spawns ``<self> libkrun <kind> prep`` in its
own session with output to the prep log and publishes ``running`` with the
child's pid. The worker waits for that, runs the steps, and marks the status
ready or failed. ``wait`` polls every 100 ms within one deadline and names
exactly what went wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guest_init import contract as c
from guest_init.env import GuestError
from guest_init.status import StatusFile, pid_alive


@dataclass(frozen=True)
class PrepKind:
    """Names and wording of one prep."""

    kind: str  # "nix" | "podman"
    status_path: str
    log_path: str
    wait_env: str
    what: str  # status wording
    title: str  # wait wording

    def status(self, root: Path = Path("/")) -> StatusFile:
        return StatusFile(root / self.status_path.lstrip("/"), self.what)


NIX = PrepKind("nix", c.NIX_PREP_STATUS, c.NIX_PREP_LOG, c.ENV_NIX_PREP_WAIT_FOR_STATUS,
               "nix prep", "libkrun /nix overlay prep")
PODMAN = PrepKind("podman", c.PODMAN_PREP_STATUS, c.PODMAN_PREP_LOG, c.ENV_PODMAN_PREP_WAIT_FOR_STATUS,
                  "Podman prep", "rootless Podman prep")
KINDS = {"nix": NIX, "podman": PODMAN}


def self_argv() -> list[str]:
    """How to re-run this program (the launcher path when known)."""
    exe = os.environ.get("AGENTBOX_GUEST_INIT_SELF") or sys.argv[0]
    if os.path.basename(exe) == "agentbox-guest-init" or exe.endswith("/agentbox-guest-init"):
        return [exe]
    return [sys.executable, "-m", "guest_init.cli"]


def start_background(kind: PrepKind) -> None:
    """Spawn the worker (idempotent: nothing when the status is already terminal)."""
    if os.geteuid() != 0:
        raise GuestError(f"{kind.title} must start as root")
    status = kind.status()
    if status.read().state in ("ready", "failed"):
        return
    Path(c.RUN_DIR).mkdir(parents=True, exist_ok=True)
    log = open(kind.log_path, "ab")
    env = dict(os.environ, **{kind.wait_env: "1"})
    proc = subprocess.Popen([*self_argv(), "libkrun", kind.kind, "prep"], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, env=env, start_new_session=True)
    log.close()
    status.write_running_unless_terminal(proc.pid, kind.log_path)


def run_worker(kind: PrepKind, steps: Callable[[], None]) -> int:
    """The worker side: wait for the parent's running status, run, record the outcome."""
    status = kind.status()
    pid = os.getpid()
    if os.environ.get(kind.wait_env) == "1":
        deadline = time.monotonic() + 5.0
        while True:
            cur = status.read()
            if cur.state == "running" and cur.pid == pid:
                break
            if time.monotonic() > deadline:
                raise GuestError(f"timed out waiting for parent to publish {kind.what} running status for pid {pid}")
            time.sleep(0.02)
    elif not status.write_running_unless_terminal(pid, kind.log_path):
        return 0
    try:
        steps()
    except Exception as exc:  # noqa: BLE001 - every failure is recorded
        message = str(exc) or type(exc).__name__
        print(f"{kind.what} failed: {message}", file=sys.stderr)
        traceback.print_exc()
        status.mark_failed_for_pid(pid, message)
        return 1
    status.mark_ready_for_pid(pid)
    return 0


def socket_state(path: Path) -> str:
    import stat

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


def wait(kind: PrepKind, timeout: float = c.PREP_WAIT_TIMEOUT_S, *, socket: Path | None = None,
         alive: Callable[[int], bool] = pid_alive) -> None:
    """Wait for the prep to be ready (and ``socket`` to be a Unix socket)."""
    status = kind.status()
    deadline = time.monotonic() + timeout
    log = kind.log_path
    while True:
        cur = status.read()
        if cur.state == "ready":
            break
        if cur.state == "failed":
            raise GuestError(f"{kind.title} failed: {cur.error or 'unknown error'}; "
                             f"status={kind.status_path}; log={cur.log_path or log}")
        if cur.state == "not-started":
            raise GuestError(f"{kind.title} has not started; missing status at {kind.status_path}")
        if cur.pid is not None and not alive(cur.pid):
            raise GuestError(f"{kind.title} has stale/dead PID {cur.pid}; status={kind.status_path}; log={log}")
        if time.monotonic() > deadline:
            raise GuestError(f"timed out after {timeout:.0f}s waiting for {kind.title} at "
                             f"{kind.status_path} (state={cur.state}; log={log})")
        time.sleep(0.1)
    if socket is None:
        return
    while socket_state(socket) != "socket":
        if time.monotonic() > deadline:
            raise GuestError(f"timed out after {timeout:.0f}s waiting for libkrun nix-daemon Unix socket at "
                             f"{socket} (observed={socket_state(socket)}); status={kind.status_path}; log={log}")
        time.sleep(0.1)
