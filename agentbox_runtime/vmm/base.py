"""What every VMM driver provides: a spec in, a running-VM handle out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agentbox_guest_init.launch_config import LaunchConfig
from agentbox_runtime.channel import AgentClient
from agentbox_runtime.vmm.shutdown import Request, StopReport


@dataclass(frozen=True)
class VmSpec:
    """One guest to boot.

    ``rootfs`` is the task rootfs (qemu: the 9p root; libkrun: krun_set_root),
    ``task_dir`` holds logs, sockets and the exit-status file. ``interactive``
    connects the guest command to the caller's terminal; otherwise the command
    console is a unix socket (``VmHandle.console_socket``) and the agent port
    another (``VmHandle.agent_socket``).
    """

    rootfs: Path
    launch: LaunchConfig
    task_dir: Path
    kernel: Path | None = None
    initrd: Path | None = None
    interactive: bool = False
    accel: str = "auto"
    outlive_caller: bool = False
    """Keep the VMM running when the process that started it dies (``--preserve-debug``: a failed
    test's guest stays up for ``agentbox attach``); otherwise it dies with its caller."""


class VmHandle(Protocol):
    """A started guest."""

    console_log: Path
    agent_socket: Path | None
    console_socket: Path | None
    attach_socket: Path | None
    """The host end of the guest's ``agentbox attach`` channel (a second agent channel), if any."""
    accel: str
    boot: str
    """``cold`` or ``restore`` (qemu from a snapshot template)."""

    @property
    def pid(self) -> int:
        """The VMM's process id."""
        ...

    def agent_client(self, timeout: float) -> AgentClient:
        """A client of the guest agent (when the guest command is ``agentbox-guest-init agent``)."""
        ...

    def wait(self, timeout: float | None) -> int:
        """Wait for the guest to finish; the guest command's exit status."""
        ...

    def shutdown(self, timeout: float, poweroff: Request | None = None) -> StopReport:
        """The shutdown ladder (:func:`agentbox_runtime.vmm.shutdown.stop`) within about ``timeout`` s:
        ``poweroff`` (the guest's own, through its agent), then terminate, then kill; the report says
        which rung stopped it. Once: a second call returns the first report."""
        ...

    def kill(self) -> None:
        """Stop the VMM now, without the guest's poweroff (``shutdown(0)``)."""
        ...

    def poll(self) -> int | None:
        """None while running, else the exit status."""
        ...


class VmmDriver(Protocol):
    """A way to boot guests."""

    name: str

    def available(self) -> tuple[bool, str]:
        """(usable, reason and how to get it when not)."""
        ...

    def start(self, spec: VmSpec) -> VmHandle:
        """Boot ``spec``; raises on launch failure."""
        ...


class GuestExitUnknown(RuntimeError):
    """The guest stopped without reporting an exit status."""
