"""The krun-podman machine: a krun-podman task (``podman run`` with the krun handler, reference
section 6) whose guest command is the agent on stdio.

The task is assembled by :mod:`agentbox_runtime.backends.krun_podman` (the same as ``agentbox
libkrun``'s), with the harness's choices made in :mod:`agentbox_harness.registry`: ``-i`` instead
of ``-it`` (the agent speaks frames on the container's stdin/stdout, so no tty) and the command
``agentbox-guest-init agent``. The OCI runtime is crun when it has the krun handler
(+LIBKRUN, with libkrunfw and KVM), else the QEMU-backed ``agentbox-krun-runtime``
(:func:`agentbox_runtime.doctor.krun_podman_runtime`); the fixtures skip (strict: fail)
naming what is missing when neither can run.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, ClassVar

from agentbox_harness.backends import (agent_copy_from, agent_copy_to,
                                       agent_execute, agent_shell, attach_lines, container_processes, note_stop,
                                       published_port)
from agentbox_harness.leftovers import Holdings
from agentbox_harness.machine import Machine, Preserved, Result
from agentbox_guest_init import contract as c
from agentbox_runtime import guest_registry
from agentbox_runtime.channel import AgentClient, ChannelError
from agentbox_runtime.backends import KrunOptions, KrunPodmanMaintenance
from agentbox_runtime.container import podman_api
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.podman import Podman
from agentbox_runtime.processes import start_time
from agentbox_runtime.vmm import shutdown
from agentbox_runtime.state import StateLayout


@dataclass
class KrunPodmanMachine(Machine):
    """A krun-podman task driven through its agent on the container's stdio."""

    ready_gate: ClassVar[bool] = True

    argv: list[str] = field(default_factory=list)
    container: str = ""
    layout: StateLayout | None = None
    krun_options: KrunOptions | None = None
    image: str = ""
    boot_timeout: float = 120.0
    stop_notes: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None
    _agent: AgentClient | None = None

    def _start(self) -> None:
        log = self.artifacts / f"{self.name}-podman.log" if self.artifacts else None
        with open(log if log is not None else os.devnull, "ab") as err:  # the child keeps its copy
            self._proc = Podman().spawn(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        assert self._proc.stdout is not None and self._proc.stdin is not None
        self._agent = AgentClient(self._proc.stdout.fileno(), self._proc.stdin.fileno())
        try:
            self._agent.wait_ready(self.scaled(self.boot_timeout))
        except ChannelError as exc:
            raise AssertionError(f"{self.name}: krun task agent did not answer: {exc}; "
                                 f"noise seen: {self._agent.noise()[-2000:]}") from None
        self._open_attach_channel()

    def _open_attach_channel(self) -> None:
        """The ``agentbox attach`` channel: the agent serves ATTACH_TCP_PORT behind a fresh token, which
        Podman publishes on the host's 127.0.0.1 (not with TSI networking, which cannot publish)."""
        assert self._agent is not None
        record = guest_registry.GuestRecord(guest_registry.new_id("krun-podman"), "krun-podman",
                                            self.test_id or self.name, container=self.container,
                                            containers=[self.container])
        if self.krun_options is not None and not self.krun_options.tsi:
            token = secrets.token_hex(32)
            try:
                bound = podman_api.published_ports(self.container, c.ATTACH_TCP_PORT)
                if not bound:
                    raise ChannelError(f"{self.container} publishes no host port for {c.ATTACH_TCP_PORT}/tcp")
                self._agent.attach_listen(c.ATTACH_TCP_PORT, token)
                record.attach_tcp, record.attach_token = bound[0][1], token
            except (ChannelError, AgentboxError) as exc:  # the task itself works: only `agentbox attach` is lost
                warnings.warn(f"{self.name}: no agentbox attach channel: {exc}", stacklevel=2)
        guest_registry.save(record)
        self.guest_id = record.id

    def preserve_live(self) -> list[str] | None:
        """The task keeps running under conmon: the agent lingers (the end of ``podman run``'s stdin
        no longer ends it), the ``podman run`` client is dropped, and ``agentbox attach`` reaches the
        agent on its published attach port; ``agentbox rm`` removes the container."""
        if self._agent is None or self._proc is None or self.guest_id is None:
            return None
        record = guest_registry.find(self.guest_id)
        if record.attach_tcp is None:
            return None
        try:
            self._agent.linger(10.0)
        except (ChannelError, OSError) as exc:
            self.stop_notes.append(f"the agent did not take 'linger': {exc}")
            return None
        self._agent = None
        proc, self._proc = self._proc, None
        proc.kill()  # the client only: the container stays with conmon
        proc.wait()
        record.state = "preserved"
        guest_registry.save(record)
        self.guest_id = None
        lines = attach_lines(self.name, record.id, None)
        self.preserved.append(Preserved(lines, ()))
        return lines

    def resize_runner(self, extra_env: tuple[str, ...] = ()) -> KrunPodmanMaintenance:
        """A maintenance runner for ``nix_disk.grow``/``containers_disk.grow``: the reference's resize
        VM (``podman run`` with the krun handler, section 6.4) over this task's state and image.
        ``extra_env`` is not supported by that argv and must be empty."""
        if extra_env:
            raise TypeError("the krun-podman resize VM takes no extra guest env")
        assert self.layout is not None and self.krun_options is not None
        runner = KrunPodmanMaintenance(Podman(), self.layout, self.krun_options, self.image)
        runner.image = self.image  # already resolved by the fixture; run() still checks the krun handler
        return runner

    def _execute(self, argv: list[str], *, user: str | None, env: dict[str, str] | None, cwd: str | None,
                 timeout: float, stdin: bytes | None) -> Result:
        if self._agent is None:
            raise AssertionError(f"{self.name} is not running")
        return agent_execute(self, self._agent, argv, user=user, env=env, cwd=cwd, timeout=timeout, stdin=stdin)

    def _shell(self, timeout: float) -> Any:
        """dev's bash on a guest pty relayed through the agent."""
        if self._agent is None:
            raise AssertionError(f"{self.name} is not running")
        return agent_shell(self, self._agent, timeout)

    def _copy_from(self, guest_path: str, host_path: Path, timeout: float) -> None:
        if self._agent is None:
            raise AssertionError(f"{self.name} is not running")
        agent_copy_from(self, self._agent, guest_path, host_path, timeout)

    def _copy_to(self, host_path: Path, guest_path: str, timeout: float) -> None:
        if self._agent is None:
            raise AssertionError(f"{self.name} is not running")
        agent_copy_to(self, self._agent, host_path, guest_path, timeout)

    def holdings(self) -> Holdings:
        """``podman run``, the container's conmon and its process (the VM, or the stand-in's shim),
        and the container."""
        run = (("podman run", self._proc.pid, start_time(self._proc.pid)),) if self._proc is not None else ()
        return Holdings(processes=run + container_processes(self.container), containers=(self.container,))

    def _stop(self, timeout: float) -> None:
        """The one shutdown ladder on the ``podman run`` process, within about ``timeout`` s: the agent's
        ``shutdown`` (the guest syncs and powers off, ending the command and so the VM); then
        ``podman stop`` (SIGTERM to the VM, SIGKILL after half the rung); then SIGKILL to ``podman run``.
        The report joins :attr:`stop_reports`; a forced stop after the poweroff is a warning."""
        if self.guest_id is not None:
            guest_registry.forget(self.guest_id)
            self.guest_id = None
        proc, self._proc = self._proc, None
        agent, self._agent = self._agent, None
        if proc is None:
            return

        def podman_stop(budget: float) -> None:
            grace = max(0, int(budget / 2))
            out = Podman(timeout_s=max(1.0, budget)).capture(["stop", "-t", str(grace), self.container])
            if out.returncode != 0:  # SIGTERM to `podman run` (it forwards it to the container) backs it up
                raise OSError(f"podman stop exited {out.returncode}: {out.stderr.strip()[-200:]}")

        report = shutdown.stop(proc, timeout=timeout, poweroff=agent.shutdown if agent is not None else None,
                               terminate=podman_stop)
        note_stop(self, report, self.stop_notes, "podman run")

    def _forward_port(self, guest_port: int, host_port: int | None) -> int:
        """The host port published for ``guest_port`` at start (the ``publish`` option; needs passt,
        not ``tsi``)."""
        if self._agent is None:
            raise AssertionError(f"{self.name} is not running")
        return published_port(self, self.container, guest_port, host_port)

    def _crash(self) -> None:
        """``podman kill -s KILL`` the task: the VM dies with no sync; the agent is dropped so the
        teardown asks the guest nothing (``podman run`` then exits by itself)."""
        if self._proc is None:
            raise AssertionError(f"{self.name} is not running: nothing to crash")
        try:
            podman_api.kill(self.container, "KILL")
        except AgentboxError as exc:
            raise AssertionError(f"{self.name}: podman kill -s KILL {self.container} failed: {exc}") from None
        self.stop_notes.append(f"crash(): podman kill -s KILL {self.container}")
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()

