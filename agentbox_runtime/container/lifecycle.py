"""One container-mode task from start to idle cleanup (reference 8.1).

``run_task`` prepares (or reuses) the sidecar with the health probe, starts
the task container with stdio inherited, and after it exits removes the
sidecar and unmounts the merged ``/nix`` if no other task uses them.

Concurrent ``agentbox container`` runs in one workspace are serialised by a
lock file in the state root, held from sidecar preparation until the task
container is running, and again during idle cleanup: a task that is starting
can never have its sidecar removed under it by one that is ending.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO, TypeVar

from filelock import FileLock, Timeout

from agentbox_guest_init.contract import ENV_HARDENED, ENV_HOST_GID, ENV_HOST_UID
from agentbox_guest_init.contract import DEV_GID, DEV_UID
from agentbox_guest_init.image_user import DEFAULT_IMAGE_USER, ImageUser
from agentbox_runtime.container.names import LOCK_FILE
from agentbox_runtime.container.podman_api import container_running
from agentbox_runtime.container.sidecar import (
    Sidecar, SidecarRequest, cleanup_idle_sidecar, prepare_sidecar,
)
from agentbox_runtime.retry import WaitTimeout, retry
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.podman import Podman

T = TypeVar("T")

LOCK_TIMEOUT_S = 300.0
START_TIMEOUT_S = 120.0


@contextmanager
def workspace_lock(state_root: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the container-mode lock of one workspace state root."""
    state_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_root / LOCK_FILE
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout as exc:
        raise AgentboxError(
            f"timed out after {timeout_s:.0f}s waiting for '{path}' (another agentbox "
            "container run in this workspace is starting or cleaning up)") from exc
    try:
        yield
    finally:
        lock.release()


def rootful_dev_ids(environ: Mapping[str, str], image: ImageUser = DEFAULT_IMAGE_USER) -> tuple[str, str]:
    """The dev uid:gid for a rootful task: ``SUDO_UID``/``SUDO_GID``, else the image user's ids
    (1000:1000 in the stock image)."""
    uid, gid = environ.get("SUDO_UID", ""), environ.get("SUDO_GID", "")
    return (uid, gid) if uid.isdigit() and gid.isdigit() else (str(image.uid), str(image.gid))


def adapt_task_argv(argv: Sequence[str], image: str, *, interactive: bool, rootless: bool,
                    command: Sequence[str] = (),
                    dev_ids: tuple[str, str] = (str(DEV_UID), str(DEV_GID))) -> list[str]:
    """Fit the reference task argv (8.2) to how it is run here.

    Only the Podman options (everything before the last ``image``) change:

    - ``-it`` becomes ``-i`` when stdin is not a terminal, so
      ``agentbox container -- CMD`` works from scripts and tests;
    - with rootful Podman, ``--userns keep-id`` is dropped (rootful Podman
      refuses it: "keep-id is only supported in rootless mode") and
      ``AGENTBOX_HOST_UID``/``GID`` (``dev_ids``) are passed instead, so the
      image's ``container enter`` can drop the ``fish -l`` shell to ``dev``; a
      hardened task (``AGENTBOX_HARDENED=1``) runs as those ids itself;
    - a non-empty ``command`` replaces what follows ``image`` (``fish -l``).
    """
    argv = list(argv)
    if image not in argv:
        raise AgentboxError(f"task argv does not contain the image '{image}'")
    at = len(argv) - 1 - argv[::-1].index(image)
    options, tail = argv[:at], (argv[at:] if not command else [image, *command])
    out: list[str] = []
    skip = False
    for i, arg in enumerate(options):
        if skip:
            skip = False
        elif arg == "-it" and not interactive:
            out.append("-i")
        elif not rootless and arg == "--userns" and options[i + 1:i + 2] == ["keep-id"]:
            skip = True
        else:
            out.append(arg)
    if not rootless:
        out += ["--env", f"{ENV_HOST_UID}={dev_ids[0]}", "--env", f"{ENV_HOST_GID}={dev_ids[1]}"]
        if f"{ENV_HARDENED}=1" in options:  # the hardened profile: the task itself runs as dev
            out += ["--user", f"{dev_ids[0]}:{dev_ids[1]}"]
    return out + tail


def clamp_status(code: int) -> int:
    """A child's exit status as agentbox returns it: 0-255, else 1."""
    return code if 0 <= code <= 255 else 1


def _wait_started(name: str, proc: subprocess.Popen[bytes],
                  timeout_s: float) -> None:
    def running(_last_try: bool) -> bool:
        return proc.poll() is not None or container_running(name)

    try:
        retry(running, timeout=timeout_s, interval=0.1)
    except WaitTimeout:
        raise AgentboxError(
            f"task container '{name}' was not running {timeout_s:.0f}s after "
            "'podman run' started (it is still starting; see 'podman ps -a')") from None


def _wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the task; Ctrl-C reaches Podman itself, so keep waiting."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def start_with_sidecar(podman: Podman, req: SidecarRequest, start: Callable[[Sidecar], T],
                       stderr: TextIO | None = None) -> tuple[Sidecar, T]:
    """Prepare (or reuse, health-probed) the workspace's sidecar and ``start(sidecar)`` a task against
    it, both under the workspace lock, so a task that is starting never has its sidecar removed
    under it. Every container task starts this way (``agentbox container``: :func:`run_task`; the
    harness: :func:`agentbox_runtime.container.machine_transport.start_task`)."""
    with workspace_lock(req.state_root):
        sidecar = prepare_sidecar(podman, req, probe=True, stderr=stderr)
        return sidecar, start(sidecar)


def release_sidecar(podman: Podman, req: SidecarRequest, sidecar: Sidecar) -> bool:
    """After a task ended: under the workspace lock, remove ``sidecar`` and unmount its merged
    ``/nix`` unless other tasks still use them. True when it was removed."""
    with workspace_lock(req.state_root):
        return cleanup_idle_sidecar(podman, sidecar)


def _spawn_started(podman: Podman, argv: list[str], name: str, timeout_s: float) -> subprocess.Popen[bytes]:
    """``podman`` + ``argv`` with stdio inherited, once its container runs (killed if it never does)."""
    try:
        proc = podman.spawn(argv)
    except OSError as exc:
        raise AgentboxError("failed to start podman") from exc
    try:
        _wait_started(name, proc, timeout_s)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def run_task(podman: Podman, req: SidecarRequest, task_name: str,
             build_argv: Callable[[Sidecar], list[str]], stderr: TextIO | None = None,
             start_timeout_s: float = START_TIMEOUT_S) -> int:
    """Run one task container against the workspace's sidecar; return its status.

    ``build_argv(sidecar)`` returns the full ``podman`` arguments of the task
    (it needs the sidecar's name for the task label). Cleanup failures only
    warn: ``agentbox: warning: failed to cleanup idle sidecar '<name>': ...``.
    """
    err = stderr if stderr is not None else sys.stderr
    sidecar, proc = start_with_sidecar(
        podman, req, lambda s: _spawn_started(podman, build_argv(s), task_name, start_timeout_s), err)
    code = _wait_exit(proc)
    try:
        release_sidecar(podman, req, sidecar)
    except AgentboxError as exc:
        print(f"agentbox: warning: failed to cleanup idle sidecar '{sidecar.name}': {exc}", file=err)
    return clamp_status(code)


def start_sidecar_only(podman: Podman, req: SidecarRequest) -> Sidecar:
    """Start or reuse only the sidecar (no socket probe) and leave it running."""
    with workspace_lock(req.state_root):
        return prepare_sidecar(podman, req, probe=False)


def sidecar_only_message(sidecar: Sidecar) -> str:
    """The stdout line of ``agentbox container sidecar``."""
    return (f"agentbox: sidecar '{sidecar.name}' is started or reused on host port "
            f"{sidecar.proxy_port}; leaving it running for inspection")
