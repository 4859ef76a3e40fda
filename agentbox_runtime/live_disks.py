"""Live-disk probe: is a raw image in use by a running guest? (reference 5.3)

A Podman container "uses" an image when one of its annotations is
``krun.disk.<i>.path=<image path>``. The probe fails closed: if Podman cannot
be asked, the caller's operation is refused. One interface,
:class:`RunningContainers`; Podman's answer comes through its API
(:class:`PodmanContainers`, podman-py against the session's service).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import agentbox_runtime.container.podman_api as podman_api
from agentbox_runtime.errors import AgentboxError


class RunningContainers(Protocol):
    """Running containers and their annotations."""

    def annotations(self, operation: str) -> Mapping[str, Mapping[str, str]]:
        """``{container id: {annotation: value}}``; raises AgentboxError when Podman fails."""
        ...


class PodmanContainers:
    """The running containers Podman's API reports (:mod:`agentbox_runtime.container.podman_api`)."""

    def annotations(self, operation: str) -> dict[str, dict[str, str]]:
        try:
            return podman_api.running_annotations()
        except AgentboxError as exc:
            raise AgentboxError(
                f"failed to list running Podman containers before libkrun {operation}: {exc}") from None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: same (st_dev, st_ino) when both exist (aliases through
    symlinks, bind mounts or ``..`` included), else the same normalised real path."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def users_of(path: Path, running: Mapping[str, Mapping[str, str]]) -> list[str]:
    """IDs of containers whose ``krun.disk.*.path`` annotation names the file ``path`` (by identity)."""
    return [cid for cid, annos in running.items()
            if any(k.startswith("krun.disk.") and k.endswith(".path") and same_file(v, path)
                   for k, v in annos.items())]


def refuse_if_live(path: Path, operation: str, source: RunningContainers | None = None,
                   extra_users: Iterable[str] = ()) -> None:
    """Raise when a running guest uses ``path``. ``operation`` is resize or reset.

    ``extra_users`` lets other backends (the harness's qemu VMs) report users."""
    source = source or PodmanContainers()
    users = users_of(path, source.annotations(operation)) + list(extra_users)
    if users:
        raise AgentboxError(
            f"refusing to {operation} libkrun raw image '{path}' while running Podman "
            f"container(s) use it: {', '.join(users)}")
