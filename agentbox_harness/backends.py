"""Machine backends: transport and lifecycle only (the verbs live in :mod:`machine`).

- :class:`MicrovmMachine`: a microvm task (qemu here, libkrun where it loads)
  whose guest command is the agent; commands go over the agent port.
- :class:`ContainerMachine`: a container-mode task (native Podman with the
  nix-daemon sidecar); commands go through ``podman exec``.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from agentbox_harness.machine import Machine, Result
from guest_init import contract as c
from runtime.channel import AgentClient, ChannelError
from runtime.microvm.session import MicrovmOptions, MicrovmTask

AGENT_COMMAND = ("agentbox-guest-init", "agent", "--port", c.AGENT_PORT_NAME)
BOOT_TIMEOUT_S = 60.0


@dataclass
class MicrovmMachine(Machine):
    """A microvm guest driven through its agent."""

    options: MicrovmOptions | None = None
    task: MicrovmTask | None = None
    agent: AgentClient | None = None
    boot_timeout: float = BOOT_TIMEOUT_S
    tasks_run: list[str] = field(default_factory=list)

    @property
    def console_log(self) -> Path | None:
        if self.task is not None and self.task.handle is not None:
            return self.task.handle.console_log
        return None

    @property
    def task_dir(self) -> Path | None:
        return self.task.task_dir if self.task else None

    def _start(self) -> None:
        assert self.options is not None
        opts = replace(self.options, command=AGENT_COMMAND, root=True, interactive=False)
        task = MicrovmTask(opts)
        self.task = task
        task.start()
        self.tasks_run.append(task.task_id)
        assert task.handle is not None and task.handle.agent_socket is not None
        deadline = time.monotonic() + self.scaled(self.boot_timeout)
        try:
            self.agent = AgentClient.connect_unix(task.handle.agent_socket, self.scaled(10))
            while True:
                if task.handle.poll() is not None:
                    raise ChannelError("guest stopped before its agent answered")
                try:
                    self.agent.ping(2.0)
                    break
                except ChannelError:
                    if time.monotonic() > deadline:
                        raise
        except ChannelError as exc:
            raise AssertionError(f"{self.name}: guest agent did not come up within "
                                 f"{self.scaled(self.boot_timeout):.0f}s: {exc}\nconsole tail:\n"
                                 f"{self.console_tail()}") from None

    def _execute(self, argv: list[str], *, user: str | None, env: dict[str, str] | None, cwd: str | None,
                 timeout: float, stdin: bytes | None) -> Result:
        if self.agent is None:
            raise AssertionError(f"{self.name} is not running")
        try:
            r = self.agent.run(argv, timeout=timeout, env=env, cwd=cwd, user=user, stdin=stdin)
        except ChannelError as exc:
            raise AssertionError(f"{self.name}: {exc}\nconsole tail:\n{self.console_tail()}") from None
        return Result(" ".join(argv), r.exit_status, r.stdout.decode("utf-8", "replace"),
                      r.stderr.decode("utf-8", "replace"), r.duration_s, r.timed_out)

    def _stop(self, timeout: float) -> None:
        task, self.task = self.task, None
        if task is None:
            return
        try:
            if self.agent is not None:
                try:
                    self.agent.run(["sync"], timeout=min(timeout, 30), user="root")
                    self.agent.shutdown(min(timeout, 10))  # the agent exits; PID 1 powers off
                except (ChannelError, OSError):
                    pass
                self.agent.close()
                self.agent = None
            self._keep_console(task)
        finally:
            if task.handle is not None:
                task.handle.shutdown(timeout)
            task.close()

    def resize_runner(self, extra_env: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
        """A maintenance runner for ``nix_disk.grow``/``containers_disk.grow`` that boots this
        machine's image and disks once with the guest resize step (``extra_env`` adds guest env)."""
        from runtime.microvm.maintenance import MicrovmResizeRunner

        assert self.options is not None
        return MicrovmResizeRunner(self.options, extra_env=extra_env)

    def shell(self, timeout: float = 60) -> "pexpect.spawn":  # type: ignore[name-defined] # noqa: F821
        """An interactive login shell of dev on the guest's command console (a real tty), as a pexpect child.

        The child talks to ``hvc0`` through the console socket; its prompt is set to ``AGENTBOX$ ``."""
        import shutil as _shutil

        import pexpect

        if self.task is None or self.task.handle is None or self.task.handle.console_socket is None:
            raise AssertionError(f"{self.name} has no console to attach a shell to")
        if _shutil.which("socat") is None:
            raise AssertionError("shell() needs socat on the host (apt-get install socat)")
        self.execute("setsid -f sh -c 'exec runuser -u dev -- env PS1=\"AGENTBOX$ \" bash --norc -i "
                     "<>/dev/hvc0 >&0 2>&0'", timeout=30, user="root", check=True)
        child = pexpect.spawn("socat", ["-,raw,echo=0", f"UNIX-CONNECT:{self.task.handle.console_socket}"],
                              timeout=self.scaled(timeout), encoding="utf-8", codec_errors="replace")
        child.sendline("")
        child.expect_exact("AGENTBOX$ ")
        return child

    def _keep_console(self, task: MicrovmTask) -> None:
        if self.artifacts is None or task.handle is None:
            return
        self.artifacts.mkdir(parents=True, exist_ok=True)
        for name in ("console.log", "launch.conf", "qemu.argv", "qemu.log"):
            src = task.task_dir / name
            if src.exists():
                (self.artifacts / f"{self.name}-{task.task_id}-{name}").write_bytes(src.read_bytes())


@dataclass
class ContainerMachine(Machine):
    """A container-mode task (not a VM) with the same verbs."""

    workspace: Path = Path()
    state_root: Path = Path()
    image: str = ""
    run_label: str | None = None
    _transport: object | None = None
    _sidecar: object | None = None
    _req: object | None = None
    _name: str = ""

    def _start(self) -> None:
        from runtime.container import host_conf
        from runtime.container.lifecycle import adapt_task_argv
        from runtime.container.machine_transport import ContainerTransport, detached_argv, start_task
        from runtime.container.podman_bridge import CliPodman
        from runtime.container.sidecar import SidecarRequest
        from runtime.state import StateLayout, task_container_name, task_hostname
        from runtime.tasks.container import container_argv
        from runtime.tasks.volumes import task_volumes

        os.environ[host_conf.ENV] = str(host_conf.ensure())
        layout = StateLayout(self.workspace, self.state_root.name, self.state_root.parent, self.state_root)
        podman = CliPodman()
        self._req = SidecarRequest(image=self.image, canonical_cwd=str(self.workspace), slug=layout.slug,
                                   state_root=self.state_root, run_label=self.run_label)
        self._name = task_container_name(layout.slug)

        def build(sidecar) -> list[str]:  # type: ignore[no-untyped-def]
            ref = container_argv(name=self._name, hostname=task_hostname(layout.slug),
                                 volumes=task_volumes(layout, home=self.state_root / "home"), merged=sidecar.merged,
                                 sidecar_name=sidecar.name, image=self.image, run_label=self.run_label)
            adapted = adapt_task_argv(ref, self.image, interactive=False, rootless=os.geteuid() != 0,
                                      dev_ids=("1000", "1000"))
            return detached_argv(adapted, self.image)

        self._sidecar = start_task(podman, self._req, build)  # type: ignore[arg-type]
        self._transport = ContainerTransport(self._name, podman)

    def _execute(self, argv: list[str], *, user: str | None, env: dict[str, str] | None, cwd: str | None,
                 timeout: float, stdin: bytes | None) -> Result:
        from runtime.container.machine_transport import ExecTimeout

        started = time.monotonic()
        who = None if user in (None, "dev") else ("0" if user == "root" else user)
        try:
            r = self._transport.execute(argv, user=who if who else "1000:1000", env=env, cwd=cwd,  # type: ignore[union-attr]
                                        timeout=timeout, stdin=stdin)
        except ExecTimeout as exc:
            return Result(" ".join(argv), 124, exc.stdout, exc.stderr, time.monotonic() - started, True)
        return Result(" ".join(argv), r.status, r.stdout, r.stderr, time.monotonic() - started)

    def _stop(self, timeout: float) -> None:
        if self._transport is None:
            return
        from runtime.container.machine_transport import stop_task
        from runtime.container.podman_bridge import CliPodman

        self._transport = None
        stop_task(CliPodman(), self._req, self._sidecar, self._name)  # type: ignore[arg-type]


def podman_image_exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], capture_output=True, timeout=60).returncode == 0
