"""The four backends, each assembled once: the CLI commands and the pytest harness build through these.

A backend takes one :class:`~agentbox_runtime.backends.options.BackendOptions` record and
assembles its task (qemu, krun-direct: :class:`~agentbox_runtime.microvm.task.MicrovmOptions`;
krun-podman: the ``podman run`` argv; container: the task argv against the nix sidecar). It
declares what it can do (:class:`~agentbox_runtime.backend_caps.Capabilities`), the raw disks it
attaches and the options a pytest factory may give it (``accepts``).
"""

from __future__ import annotations

from typing import Protocol

from agentbox_runtime.backend_caps import BACKEND_NAMES, Capabilities
from agentbox_runtime.backends.container_backend import CONTAINER, ContainerBackend, ContainerTask
from agentbox_runtime.backends.krun_podman import (KRUN_PODMAN, KrunPodmanBackend, KrunPodmanMaintenance,
                                                   KrunPodmanTask)
from agentbox_runtime.backends.microvm_backend import KRUN_DIRECT, QEMU, MicrovmBackend, microvm_backend
from agentbox_runtime.backends.options import BackendOptions
from agentbox_runtime.disks import RawDisk
from agentbox_runtime.tasks.krun_podman_argv import KrunOptions

__all__ = ["BACKENDS", "CONTAINER", "KRUN_DIRECT", "KRUN_PODMAN", "QEMU", "Backend", "BackendOptions",
           "ContainerBackend", "ContainerTask", "KrunOptions", "KrunPodmanBackend", "KrunPodmanMaintenance",
           "KrunPodmanTask", "MicrovmBackend", "backend_for", "is_microvm", "microvm_backend"]
"""What the CLI commands and the harness import: the backends and their records, from here."""


class Backend(Protocol):
    """What every backend declares (each also has its own ``task(options)``)."""

    @property
    def name(self) -> str:
        """The backend's one name (``qemu``, ``krun-direct``, ``krun-podman``, ``container``)."""

    @property
    def capabilities(self) -> Capabilities:
        """What it offers a test or a command."""

    @property
    def disks(self) -> tuple[RawDisk, ...]:
        """The persistent raw images it attaches (none for container)."""

    @property
    def accepts(self) -> frozenset[str]:
        """The :class:`BackendOptions` fields a pytest factory may set for it."""


BACKENDS: dict[str, Backend] = {b.name: b for b in (QEMU, KRUN_DIRECT, KRUN_PODMAN, CONTAINER)}
"""Backend name -> backend, in :data:`agentbox_runtime.backend_caps.BACKEND_NAMES` order."""
assert tuple(BACKENDS) == BACKEND_NAMES


def backend_for(name: str) -> Backend:
    """The backend called ``name``; an unknown name is one clear error naming the known ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown agentbox backend '{name}'; known: {', '.join(BACKENDS)}") from None


def is_microvm(name: str) -> bool:
    """True when ``name`` runs a :class:`~agentbox_runtime.microvm.task.MicrovmTask` (qemu,
    krun-direct): what the ``microvm`` fixtures and their ``MicrovmMachine`` need."""
    return isinstance(BACKENDS.get(name), MicrovmBackend)
