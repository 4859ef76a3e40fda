"""Machine backends: transport and lifecycle only (the verbs live in :mod:`machine`).

- :class:`MicrovmMachine`: a microvm task (qemu here, libkrun where it loads)
  whose guest command is the agent; commands go over the agent port.
- :class:`ContainerMachine`: a container-mode task (native Podman with the
  nix-daemon sidecar); commands go through ``podman exec``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
import warnings
from typing import Any, ClassVar
from dataclasses import dataclass, field, replace
from pathlib import Path

from agentbox_harness.leftovers import Holdings
from agentbox_harness.machine import Machine, MachineError, Preserved, Result
from agentbox_harness.wait import WaitTimeout, retry
from agentbox_guest_init import contract as c
from agentbox_runtime import guest_registry
from agentbox_runtime.disks import MICROVM_NIX
from agentbox_runtime.container import host_conf
from agentbox_runtime.container.machine_transport import ContainerTransport, ExecTimeout, start_task, stop_task
from agentbox_runtime.container import podman_api
from agentbox_runtime.container.sidecar import Sidecar, SidecarRequest
from agentbox_runtime.microvm import task_reaper as vm_reaper
from agentbox_runtime.state import StateLayout
from agentbox_runtime.backends import CONTAINER, BackendOptions
from agentbox_runtime.channel import AgentClient, ChannelError, PtyRelay
from agentbox_runtime.microvm.task import MicrovmOptions, MicrovmTask
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.podman import Podman
from agentbox_runtime.vmm import boot_phases, hostfwd
from agentbox_runtime.vmm.host import tail_bytes
from agentbox_runtime.vmm.shutdown import StopReport
from agentbox_runtime.processes import session_members, start_time
from agentbox_runtime.microvm.maintenance import MicrovmResizeRunner

AGENT_COMMAND = ("agentbox-guest-init", "agent", "--port", c.AGENT_PORT_NAME)
"""The agent on its own virtio-serial port (qemu)."""
AGENT_STDIO_COMMAND = ("agentbox-guest-init", "agent")
"""The agent on the guest command's stdio (libkrun's console, krun-podman's ``podman run -i``)."""
BOOT_TIMEOUT_S = 60.0
ARTIFACT_LOG_MAX = 8 << 20
"""Artifacts keep at most the last 8 MiB of a log."""


def container_processes(name: str) -> tuple[tuple[str, int, str | None], ...]:
    """The conmon and main process of container ``name`` (with start times), for :class:`Holdings`."""
    try:
        state = (podman_api.container_inspect(name) or {}).get("State") or {}
    except AgentboxError:
        state = {}
    pids = [int(p) for p in (state.get("ConmonPid"), state.get("Pid")) if isinstance(p, int) and p > 0]
    return tuple((f"{what} of {name}", pid, start_time(pid))
                 for what, pid in zip(("conmon", "process"), pids, strict=False))


def note_stop(machine: Machine, report: StopReport, notes: list[str], what: str) -> None:
    """Keep a stop's report (:attr:`Machine.stop_reports`, ``notes``); a guest that was asked to power
    off but had to be terminated or killed is a warning, never silent."""
    machine.stop_reports.append(report)
    notes.append(report.describe(what))
    if report.forced and any(step.rung == "poweroff" for step in report.steps):
        warnings.warn(f"{machine.name}: the guest did not power off after the agent's shutdown; "
                      f"{report.describe(f'its {what}')}", stacklevel=3)


def agent_execute(machine: Machine, agent: AgentClient, argv: list[str], *, user: str | None,
                  env: dict[str, str] | None, cwd: str | None, timeout: float, stdin: bytes | None) -> Result:
    """``_execute`` over a guest agent (every agent-driven backend)."""
    try:
        r = agent.run(argv, timeout=timeout, env=env, cwd=cwd, user=user, stdin=stdin)
    except ChannelError as exc:
        raise AssertionError(f"{machine.name}: {exc}\nconsole tail:\n{machine.console_tail()}") from None
    return Result(" ".join(argv), r.exit_status, r.stdout.decode("utf-8", "replace"),
                  r.stderr.decode("utf-8", "replace"), r.duration_s, r.timed_out)


def agent_copy_from(machine: Machine, agent: AgentClient, guest_path: str, host_path: Path, timeout: float) -> None:
    """``_copy_from`` over a guest agent: chunked, size- and sha256-checked."""
    try:
        agent.download(guest_path, host_path, timeout)
    except ChannelError as exc:
        raise AssertionError(f"{machine.name}: cannot copy {guest_path} from the guest: {exc}") from None


def agent_copy_to(machine: Machine, agent: AgentClient, host_path: Path, guest_path: str, timeout: float) -> None:
    """``_copy_to`` over a guest agent: chunked, checked by the guest before it replaces the file."""
    try:
        agent.upload(host_path, guest_path, owner=machine.image_user.user, timeout=timeout)
    except ChannelError as exc:
        raise AssertionError(f"{machine.name}: cannot copy {host_path} to {guest_path}: {exc}") from None


SHELL_PROMPT = "AGENTBOX$ "


def agent_shell(machine: Machine, agent: AgentClient, timeout: float) -> Any:
    """The image user's bash on a fresh pty in the guest (a real tty), relayed through the agent, as a
    pexpect child whose prompt (``AGENTBOX$ ``) was already consumed once. ``child.setwinsize(rows, cols)``
    resizes the guest pty (its foreground programs get SIGWINCH). What is sent before a prompt appears
    waits in the relay's socket, then in the guest pty, and reaches the shell in order."""
    from pexpect import fdpexpect

    try:
        pty = agent.pty_spawn(["bash", "--norc", "-i"], user=None, env={"PS1": SHELL_PROMPT},
                              timeout=machine.scaled(30))
    except ChannelError as exc:
        raise AssertionError(f"{machine.name}: cannot start a shell on a guest pty: {exc}") from None
    relay = PtyRelay(agent, pty)
    child = fdpexpect.fdspawn(relay.local.fileno(), timeout=timeout, encoding="utf-8", codec_errors="replace")
    child.relay = relay  # keeps the relay alive with the child; closing the child ends the guest shell
    child.setwinsize = relay.setwinsize  # fdspawn has none: resize the guest pty instead
    child.sendline("")
    child.expect_exact(SHELL_PROMPT)
    return child


def attach_lines(name: str, guest_id: str, task_dir: Path | None) -> list[str]:
    """The summary lines of a guest kept running for debugging."""
    lines = [f"{name}: guest {guest_id} kept running (--preserve-debug)",
             f"  shell:        agentbox attach {guest_id}",
             f"  as root:      agentbox attach {guest_id} --root",
             "  list:         agentbox ps",
             f"  remove:       agentbox rm {guest_id}"]
    if task_dir is not None:
        lines.insert(4, f"  console log:  less {task_dir / 'console.log'}")
    return lines


def kill_vmm(pid: int, proc: subprocess.Popen[bytes] | None, wait_s: float = 30.0) -> None:
    """SIGKILL a VMM at once (its process group when it leads one: the libkrun stand-in's qemu is
    in the helper's group) and reap it when it is our child. No sync, no shutdown request."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait(wait_s)


def published_port(machine: Machine, container: str, guest_port: int, host_port: int | None) -> int:
    """The host port Podman published for ``container``'s TCP ``guest_port`` when it started
    (``podman port``), preferring 127.0.0.1; one clear line when it was not published, or not on
    ``host_port`` when one is asked for."""
    try:
        bound = podman_api.published_ports(container, guest_port)
    except AgentboxError:
        bound = []
    ports = sorted((addr != "127.0.0.1", port) for addr, port in bound)
    if not ports:
        raise MachineError(f"{machine.name}: guest port {guest_port} was not published when this {machine.backend} "
                           f"task started (Podman publishes only at start): start it with "
                           f"publish=('127.0.0.1::{guest_port}',)")
    if host_port is not None and host_port not in {port for _, port in ports}:
        raise MachineError(f"{machine.name}: guest port {guest_port} is published on host port(s) "
                           f"{', '.join(str(port) for _, port in ports)}, not {host_port} (Podman publishes only "
                           f"at start: publish=('127.0.0.1:{host_port}:{guest_port}',))")
    return host_port if host_port is not None else ports[0][1]


@dataclass
class MicrovmMachine(Machine):
    """A microvm guest driven through its agent."""

    ready_gate: ClassVar[bool] = True

    options: MicrovmOptions | None = None
    task: MicrovmTask | None = None
    agent: AgentClient | None = None
    boot_timeout: float = BOOT_TIMEOUT_S
    stop_notes: list[str] = field(default_factory=list)
    """How each stop went (the shutdown ladder's reports, failed graceful requests)."""

    @property
    def console_log(self) -> Path | None:
        if self.task is not None and self.task.handle is not None:
            return self.task.handle.console_log
        return None

    @property
    def task_dir(self) -> Path | None:
        return self.task.task_dir if self.task else None

    @property
    def vmm_pid(self) -> int | None:
        handle = self.task.handle if self.task is not None else None
        try:
            return handle.pid if handle is not None and handle.poll() is None else None
        except RuntimeError:  # stopped without an exit status (a qemu killed by crash())
            return None

    def _start(self) -> None:
        assert self.options is not None
        command = AGENT_STDIO_COMMAND if self.options.vmm == "libkrun" else AGENT_COMMAND
        opts = replace(self.options, command=command, root=True, interactive=False)
        task = MicrovmTask(opts)
        self.task = task
        task.start()
        assert task.handle is not None
        self.image_user = task.user
        handle, limit = task.handle, self.scaled(self.boot_timeout)
        errors: list[str] = []
        ready: list[float] = []

        def answered(_last_try: bool) -> bool:
            try:
                stopped = handle.poll() is not None
            except RuntimeError as exc:  # stopped without an exit status (e.g. PID 1 died)
                raise AssertionError(f"{self.name}: guest stopped before its agent answered: {exc}") from None
            if stopped:
                raise AssertionError(f"{self.name}: guest stopped before its agent answered\nconsole tail:\n"
                                     f"{self.console_tail()}")
            try:
                if self.agent is None:
                    self.agent = handle.agent_client(5.0)
                pong = self.agent.ping(2.0)
                uptime = pong.get("uptime")
                ready[:] = [float(uptime)] if isinstance(uptime, (int, float)) else []
                return True
            except (ChannelError, OSError) as exc:
                errors[:] = [str(exc)]
                return False

        try:
            retry(answered, timeout=limit, interval=0.2)
        except WaitTimeout:
            raise AssertionError(f"{self.name}: guest agent did not come up within {limit:.0f}s "
                                 f"(last error: {errors[0] if errors else 'none'})\nconsole tail:\n"
                                 f"{self.console_tail()}") from None
        console = tail_bytes(handle.console_log, 1 << 16).decode("utf-8", "replace")
        self.boot = handle.boot
        if handle.boot == "cold":  # a restored guest's console holds no boot stamps of its own
            self.timings.update(boot_phases.durations(console, ready[0] if ready else None))
        self.timings.update({f"host_{label}_s": round(ms / 1000, 3) for label, ms in task.phases.rows})
        if handle.attach_socket is not None:  # the guest's second agent channel
            backend = self.backend  # the one name the registry gave it
            record = guest_registry.GuestRecord(guest_registry.new_id(backend), backend, self.test_id or self.name,
                                                pid=handle.pid, attach_socket=str(handle.attach_socket))
            guest_registry.save(record)
            self.guest_id = record.id

    def _execute(self, argv: list[str], *, user: str | None, env: dict[str, str] | None, cwd: str | None,
                 timeout: float, stdin: bytes | None) -> Result:
        return agent_execute(self, self._agent(), argv, user=user, env=env, cwd=cwd, timeout=timeout, stdin=stdin)

    def holdings(self) -> Holdings:
        """The VMM's session (the VMM, and under krun-direct the helper's qemu), the task rootfs
        mount, the task dir and the private socket dirs."""
        task = self.task
        if task is None or task.handle is None:
            return Holdings()
        handle = task.handle
        dirs = [getattr(handle, "sock_dir", None), handle.attach_socket.parent if handle.attach_socket else None]
        return Holdings(processes=tuple(("VMM process", pid, start) for pid, start in session_members(handle.pid)),
                        mounts=(str(task.rootfs.root),) if task.rootfs is not None else (),
                        paths=(str(task.task_dir), *(str(d) for d in dirs if d is not None)))

    def preserve_live(self) -> list[str] | None:
        """The guest stays up (its VMM outlives the harness under --preserve-debug) with its task
        rootfs and state; ``agentbox rm`` removes them. The agent is told to linger: its main
        channel closing (krun-direct: the VMM's stdio) no longer ends it."""
        task = self.task
        if task is None or self.guest_id is None or task.handle is None or self.vmm_pid is None:
            return None  # nothing runs (stopped, or crash(): vmm_pid is None then, poll() may raise)
        record = guest_registry.find(self.guest_id)
        if self.agent is not None:
            try:
                self.agent.linger(10.0)
            except (ChannelError, OSError) as exc:
                self.stop_notes.append(f"the agent did not take 'linger': {exc}")
                return None
            self.agent.close()  # no shutdown: the guest keeps running
            self.agent = None
        self._keep_console(task)
        root = task.rootfs.root if task.rootfs else task.task_dir
        record.state = "preserved"
        record.cleanup = [f"fusermount3 -u {shlex.quote(str(root))} 2>/dev/null || umount -l {shlex.quote(str(root))}"] \
            if task.rootfs is not None and task.rootfs.mode == "fuse-overlay" else []
        record.paths = [str(task.task_dir), *([str(Path(record.attach_socket).parent)] if record.attach_socket else [])]
        guest_registry.save(record)
        if task.layout is not None:
            vm_reaper.forget(task.layout, task.task_dir)  # the guest is the user's now: never reaped
        self.task = None
        self.guest_id = None
        self.preserved.append(Preserved(attach_lines(self.name, record.id, task.task_dir), (str(task.task_dir),)))
        return self.preserved[-1].lines

    def keep_nothing(self) -> None:
        if self.options is not None:
            self.options = replace(self.options, preserve_debug=False)
        if self.task is not None:
            self.task.opts = replace(self.task.opts, preserve_debug=False)

    def _stop(self, timeout: float) -> None:
        """The one shutdown ladder (:meth:`MicrovmTask.stop`) within about ``timeout`` s: the agent's
        ``shutdown`` (the guest syncs and powers off), then QMP ``quit``/SIGTERM, then SIGKILL; the
        report joins :attr:`stop_reports`. The task is then closed (rootfs unmounted, state removed)."""
        if self.guest_id is not None:
            guest_registry.forget(self.guest_id)
            self.guest_id = None
        task, self.task = self.task, None
        if task is None:
            return
        agent, self.agent = self.agent, None
        try:
            report = task.stop(timeout, poweroff=agent.shutdown if agent is not None else None)
            if report is not None:
                note_stop(self, report, self.stop_notes, "VMM")
            self._keep_console(task)
        finally:
            try:
                if agent is not None:
                    agent.close()
            finally:
                task.close()
                if task.notice:
                    self.preserved.append(Preserved(self._debug_lines(task), (str(task.task_dir),)))

    def _debug_lines(self, task: MicrovmTask) -> list[str]:
        """Ready-to-paste commands for a task whose state --preserve-debug kept."""
        d = task.task_dir
        root = task.rootfs.root if task.rootfs else d
        state = task.layout.state_root if task.layout is not None else None
        lines = [f"{self.name}: task {task.task_id} (VM stopped; rootfs, disks and logs kept)",
                 f"  {task.notice}",
                 f"  console log:  less {d / 'console.log'}",
                 f"  launch.conf:  cat {d / 'launch.conf'}",
                 *([f"  qemu argv:    cat {d / 'qemu.argv'}"] if (d / "qemu.argv").exists() else []),
                 f"  rootfs:       ls {root}"]
        if state is not None:
            lines.append(f"  nix disk:     mkdir -p /tmp/nixdisk && mount -o loop,ro {MICROVM_NIX.path(state)} /tmp/nixdisk")
        fuse = task.rootfs is not None and task.rootfs.mode == "fuse-overlay"
        umount = f"fusermount3 -u {root} 2>/dev/null; " if fuse else ""
        lines.append(f"  clean up:     {umount}rm -rf {d}" + (f" {state}" if state is not None else ""))
        return lines

    def resize_runner(self, extra_env: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
        """A maintenance runner for ``nix_disk.grow``/``containers_disk.grow`` that boots this
        machine's image and disks once with the guest resize step (``extra_env`` adds guest env)."""

        assert self.options is not None
        return MicrovmResizeRunner(self.options, extra_env=extra_env)

    def _console_connect(self) -> Any:
        import pexpect

        if self.task is None or self.task.handle is None or self.task.handle.console_socket is None:
            raise AssertionError(f"{self.name} is not running: no console to attach to")
        if shutil.which("socat") is None:
            raise AssertionError("the live console needs socat on the host (apt-get install socat)")
        return pexpect.spawn("socat", ["-,raw,echo=0", f"UNIX-CONNECT:{self.task.handle.console_socket}"],
                             timeout=self.scaled(30), encoding="utf-8", codec_errors="replace")

    def _shell(self, timeout: float) -> Any:
        """dev's bash on a real tty: the command console ``hvc0`` where the VMM exposes it (qemu),
        else a guest pty relayed through the agent (libkrun, whose console carries the agent)."""
        if self.task is None or self.task.handle is None or self.task.handle.console_socket is None:
            return agent_shell(self, self._agent(), timeout)
        self.execute(["setsid", "-f", "sh", "-c", "cd \"$2\" 2>/dev/null; exec runuser -u \"$1\" -- "
                      "env PS1='AGENTBOX$ ' bash --norc -i <>/dev/hvc0 >&0 2>&0", "sh", self.image_user.user,
                      self.image_user.workdir], timeout=30, user="root", check=True)
        child = self._console_connect()
        child.timeout = timeout
        child.sendline("")
        child.expect_exact("AGENTBOX$ ")
        return child

    def _copy_from(self, guest_path: str, host_path: Path, timeout: float) -> None:
        agent_copy_from(self, self._agent(), guest_path, host_path, timeout)

    def _copy_to(self, host_path: Path, guest_path: str, timeout: float) -> None:
        agent_copy_to(self, self._agent(), host_path, guest_path, timeout)

    def _agent(self) -> AgentClient:
        if self.agent is None:
            raise AssertionError(f"{self.name} is not running")
        return self.agent

    def _keep_console(self, task: MicrovmTask) -> None:
        if self.artifacts is None or task.handle is None:
            return
        self.artifacts.mkdir(parents=True, exist_ok=True)
        for name in ("console.log", "launch.conf", "qemu.argv", "qemu.log"):
            src = task.task_dir / name
            if src.exists():
                dest = self.artifacts / f"{self.name}-{task.task_id}-{name}"
                data = tail_bytes(src, ARTIFACT_LOG_MAX)
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:  # 0600 like the originals (launch.conf names host paths)
                    f.write(data)

    def _forward_port(self, guest_port: int, host_port: int | None) -> int:
        """qemu: a ``hostfwd`` rule on the guest's user-mode network, added over QMP (127.0.0.1 only)."""
        handle = self.task.handle if self.task is not None else None
        qmp = getattr(handle, "qmp", None)
        if handle is None or qmp is None:
            raise MachineError(f"{self.name}: forward_port needs a running qemu guest with QMP")
        try:
            return hostfwd.add(qmp, guest_port, host_port)
        except (AgentboxError, OSError) as exc:
            raise MachineError(f"{self.name}: forward_port: {exc}") from None

    def _crash(self) -> None:
        """SIGKILL the VMM; the agent is dropped so the teardown asks the guest nothing."""
        handle = self.task.handle if self.task is not None else None
        if handle is None:
            raise MachineError(f"{self.name} is not running: nothing to crash")
        proc = getattr(handle, "proc", None)
        kill_vmm(handle.pid, proc if isinstance(proc, subprocess.Popen) else None)
        self.stop_notes.append(f"crash(): SIGKILL to VMM pid {handle.pid}")
        agent, self.agent = self.agent, None
        if agent is not None:
            agent.close()




@dataclass
class ContainerMachine(Machine):
    """A container-mode task (not a VM) with the same verbs."""

    ready_gate: ClassVar[bool] = True

    workspace: Path = Path()
    state_root: Path = Path()
    image: str = ""
    run_label: str | None = None
    hardened: bool = False
    """The hardened profile: read-only root, no capabilities, no new privileges (see container_argv)."""
    publish: tuple[str, ...] = ()
    """Podman ``--publish`` specs for the task (``127.0.0.1::8080``): what ``forward_port`` can reach."""
    _transport: ContainerTransport | None = None
    _sidecar: Sidecar | None = None
    _req: SidecarRequest | None = None
    _name: str = ""
    _conf: Any = None

    def _start(self) -> None:
        self._conf = host_conf.applied()
        self._conf.__enter__()  # restored in _stop: the harness conf never outlives the machine
        layout = StateLayout(self.workspace, self.state_root.name, self.state_root.parent, self.state_root)
        podman = Podman()
        task = CONTAINER.task(BackendOptions(  # assembled as `agentbox container` does, detached
            workspace=self.workspace, state=layout, image=self.image, run_label=self.run_label,
            hardened=self.hardened, publish=self.publish, interactive=False, host_home=self.state_root / "home",
            dev_ids_from_sudo=False))
        self._req, self._name, self.image_user = task.request, task.name, task.user
        self._sidecar = start_task(podman, self._req, lambda sidecar: task.argv(sidecar, detached=True))
        self._transport = ContainerTransport(self._name, podman)
        record = guest_registry.GuestRecord(guest_registry.new_id("container"), "container",
                                            self.test_id or self.name, container=self._name)
        guest_registry.save(record)
        self.guest_id = record.id

    def preserve_live(self) -> list[str] | None:
        """The task container and its nix sidecar stay up; ``agentbox attach`` execs into the task."""
        if self._transport is None or self.guest_id is None or self.crashed:
            return None  # after crash() the task is gone: nothing to keep
        record = guest_registry.find(self.guest_id)
        record.state = "preserved"
        sidecar = self._sidecar.name if self._sidecar is not None else None
        record.containers = [self._name, *([str(sidecar)] if sidecar else [])]
        guest_registry.save(record)
        self._transport = None
        self.guest_id = None
        lines = attach_lines(self.name, record.id, None)
        self.preserved.append(Preserved(lines, ()))
        return lines

    def _running(self) -> ContainerTransport:
        if self._transport is None:
            raise AssertionError(f"{self.name} is not running")
        return self._transport

    def holdings(self) -> Holdings:
        """The task container and its conmon."""
        return Holdings(processes=container_processes(self._name), containers=(self._name,))

    def _execute(self, argv: list[str], *, user: str | None, env: dict[str, str] | None, cwd: str | None,
                 timeout: float, stdin: bytes | None) -> Result:
        started = time.monotonic()
        image = self.image_user
        who = None if user in (None, image.user) else ("0" if user == "root" else user)
        if who is None:  # the user's own login environment: nix (through the daemon) writes to its profile
            env = {**image.exec_env(), **(env or {})}
        try:
            r = self._running().execute(argv, user=who if who else f"{image.uid}:{image.gid}", env=env, cwd=cwd,
                                        timeout=timeout, stdin=stdin)
        except ExecTimeout as exc:
            return Result(" ".join(argv), 124, exc.stdout, exc.stderr, time.monotonic() - started, True)
        return Result(" ".join(argv), r.status, r.stdout, r.stderr, time.monotonic() - started)

    def _stop(self, timeout: float) -> None:
        if self.guest_id is not None:
            guest_registry.forget(self.guest_id)
            self.guest_id = None
        if self._transport is None:
            return
        self._transport = None
        try:
            assert self._req is not None and self._sidecar is not None
            stop_task(Podman(), self._req, self._sidecar, self._name)
        finally:
            if self._conf is not None:
                self._conf.__exit__(None, None, None)
                self._conf = None

    def _forward_port(self, guest_port: int, host_port: int | None) -> int:
        """The host port published for ``guest_port`` at start (the ``publish`` option)."""
        self._running()
        return published_port(self, self._name, guest_port, host_port)

    def _crash(self) -> None:
        """``podman kill -s KILL`` the task (its nix sidecar stays for the teardown to clean up)."""
        self._running()
        try:
            podman_api.kill(self._name, "KILL")
        except AgentboxError as exc:
            raise MachineError(f"{self.name}: podman kill -s KILL {self._name} failed: {exc}") from None
