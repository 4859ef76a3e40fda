"""What one guest's boot holds on the host, and proof after its stop that it is gone.

Firecracker's test framework checks each microVM's teardown (its jailer's processes, mounts and
sockets) instead of leaving leaks for the end of the session, where no test can be blamed. Each
machine records its :class:`Holdings` right after it starts; :func:`leftovers` probes them with the
session-end leak check's probes (:mod:`agentbox_harness.run_reaper`) once the machine stopped.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from agentbox_harness.run_reaper import mounts_under, settled
from agentbox_runtime.container import podman_api
from agentbox_runtime.processes import same_process


@dataclass(frozen=True)
class Holdings:
    """What a boot holds: ``processes`` (name, pid, start time: the VMM, ``podman run``), ``mounts``
    (mount points: the task rootfs), ``paths`` (private dirs and sockets, the task dir) and
    ``containers`` (Podman names)."""

    processes: tuple[tuple[str, int, str | None], ...] = ()
    mounts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()


def _kept(path: str, keep: list[str]) -> bool:
    return any(path == k or path.startswith(k.rstrip("/") + "/") for k in keep)


def _container_exists(name: str) -> bool:
    if shutil.which("podman") is None:
        return False
    return podman_api.container_inspect(name) is not None


def present(held: Holdings, keep: list[str]) -> list[str]:
    """One line per thing in ``held`` that is still there (paths under ``keep``, what --preserve-debug
    kept, excepted)."""
    out = [f"{what} (pid {pid})" for what, pid, start in held.processes if same_process(pid, start)]
    out += [f"mount {m}" for m in mounts_under(list(held.mounts)) if not _kept(m, keep)]
    out += [f"path {p}" for p in held.paths if Path(p).exists() and not _kept(p, keep)]
    out += [f"container {c}" for c in held.containers if _container_exists(c)]
    return out


def leftovers(held: Holdings, keep: list[str], *, settle_s: float = 10.0) -> list[str]:
    """What of ``held`` is still there after giving exiting processes (conmon's clean-up of a
    ``--rm`` container, a VMM being reaped) up to ``settle_s`` seconds; empty when all is gone."""
    return settled(lambda: present(held, keep), settle_s)
