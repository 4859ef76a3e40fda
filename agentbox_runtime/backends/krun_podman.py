"""The krun-podman backend: a microVM booted by ``podman run --runtime crun`` with crun's krun
handler (``agentbox libkrun``; reference section 6), or through the QEMU-backed
``agentbox-krun-runtime`` where crun lacks the handler.

:meth:`KrunPodmanBackend.task` assembles the exact ``podman run`` argv of a task
(:func:`agentbox_runtime.tasks.krun_podman_argv.krun_task_argv`): the image user, the host ids, the state dir
and the two raw disks; :class:`KrunPodmanMaintenance` runs the resize guest step as the reference's
one-shot resize VM (6.4).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from agentbox_guest_init.contract import GUEST_INIT_PATH
from agentbox_guest_init.image_user import ImageUser
from agentbox_runtime import disks as raw_disks
from agentbox_runtime.backend_caps import Capabilities, caps
from agentbox_runtime.backends.options import BackendOptions
from agentbox_runtime.hostcheck.crun import SELECT_QEMU_RUNTIME, check_crun_krun
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.guest_resources import default_cpus, libkrun_ram_mib
from agentbox_runtime.images.commit import image_user
from agentbox_runtime.microvm.task import host_ids
from agentbox_runtime.podman import Podman, resolve_image
from agentbox_runtime.resize import ResizePlan
from agentbox_runtime.state import StateLayout, resize_container_name, task_container_name, task_hostname
from agentbox_runtime.tasks.krun_podman_argv import (KrunOptions, guest_init_override, krun_task_argv, oci_runtime,
                                         resize_task_argv, select_krun_runtime, validate_publish)
from agentbox_runtime.tasks.volumes import task_volumes

DEFAULT_COMMAND = ("fish", "-l")


def require_krun() -> None:
    """Refuse to start krun-podman tasks with ``--runtime crun`` on a host whose crun lacks the krun
    handler; the line also says how to select the QEMU-backed runtime instead.

    Uses the doctor's ``crun-krun`` check, so both say the same thing. Not called when the
    QEMU-backed runtime is selected (it needs no +LIBKRUN)."""
    check = check_crun_krun()
    if not check.ok:
        raise AgentboxError(f"libkrun mode needs crun built with libkrun: {check.detail}; install one "
                            f"or select the QEMU-backed runtime with {SELECT_QEMU_RUNTIME}; "
                            "run 'agentbox doctor' to see what this host can run and how to fix it")


def exit_status(code: int | None) -> int:
    """A child's status as agentbox's: 0..255 passes through, anything else is 1."""
    return code if code is not None and 0 <= code <= 255 else 1


@dataclass(frozen=True)
class KrunPodmanTask:
    """One assembled krun-podman task: run ``podman`` + :attr:`argv`."""

    argv: list[str]
    container: str
    layout: StateLayout
    options: KrunOptions
    image: str
    user: ImageUser


@dataclass(frozen=True)
class KrunPodmanBackend:
    """krun-podman (see the module docstring)."""

    name: str = "krun-podman"
    capabilities: Capabilities = caps("krun-podman")
    disks: tuple[raw_disks.RawDisk, ...] = raw_disks.LIBKRUN_DISKS
    accepts: frozenset[str] = frozenset({"image", "memory_mib", "cpus", "publish", "root", "tsi", "guest_init"})

    def krun_options(self, o: BackendOptions) -> KrunOptions:
        """The task's :class:`KrunOptions`. Every input is checked here (publish specs, the guest-init
        file, the krun runtime and where ``agentbox-krun-runtime`` is) before anything is written.
        ``extra_env`` is refused: the reference argv has no place for it."""
        if o.extra_env:
            raise TypeError(f"{self.name} takes no extra guest env (the reference argv has none)")
        runtime = oci_runtime(o.krun_runtime or select_krun_runtime(None))
        return KrunOptions(
            ram_mib=o.memory_mib if o.memory_mib is not None else libkrun_ram_mib(None),
            cpus=o.cpus if o.cpus is not None else default_cpus(), tsi=o.tsi,
            publish=validate_publish(o.publish, o.tsi), root=o.root, profile=o.profile, debug=o.debug,
            guest_init_mount=guest_init_override(str(o.guest_init)) if o.guest_init else None,
            run_label=o.run_label, command=o.command or DEFAULT_COMMAND, runtime=runtime)

    def task(self, o: BackendOptions, opts: KrunOptions | None = None) -> KrunPodmanTask:
        """The task of ``o`` (its ``image`` already resolved): reads the image user from the image's
        labels, creates the state dir and the two raw disks (validated, never reformatted) and
        returns the exact ``podman run`` argv; ``-it`` becomes ``-i`` unless ``o.interactive``.

        ``AGENTBOX_HOST_UID``/``GID`` are :func:`agentbox_runtime.microvm.task.host_ids`: the
        user's ids, or as root the workspace owner (else the image user's), because the guest
        refuses a root dev user. The workspace is mounted at the image user's workdir."""
        if o.image is None:
            raise AgentboxError(f"{self.name}: no image resolved")
        opts = opts if opts is not None else self.krun_options(o)
        layout = o.state if o.state is not None else StateLayout.resolve(o.workspace)
        user = image_user(o.image)
        uid, gid = host_ids(layout.workspace, user)
        layout.ensure()
        raw_disks.prepare_all(self.disks, layout.state_root)
        container = task_container_name(layout.slug)
        argv = krun_task_argv(name=container, hostname=task_hostname(layout.slug), state_root=layout.state_root,
                              volumes=task_volumes(layout, home=o.host_home, user=user), uid=uid, gid=gid,
                              image=o.image, opts=opts, workdir=user.workdir)
        if not o.interactive:  # the guest command speaks on stdin/stdout without a tty
            argv = ["-i" if a == "-it" else a for a in argv]
        return KrunPodmanTask(argv, container, layout, opts, o.image, user)


KRUN_PODMAN = KrunPodmanBackend()


class KrunPodmanMaintenance:
    """Runs the resize guest step as a one-shot krun-podman container (6.4): a
    :class:`agentbox_runtime.resize.MaintenanceRunner`.

    :meth:`check` runs after the image was validated and before it grows:
    with ``--runtime crun`` it refuses a host whose crun lacks libkrun, then resolves the image
    (which may pull with ``--pull-latest``), so bad input never pulls."""

    def __init__(self, podman: Podman, layout: StateLayout, opts: KrunOptions,
                 image: str | None = None, pull_latest: bool = False) -> None:
        self.podman, self.layout, self.opts = podman, layout, opts
        self.image_arg, self.pull_latest = image, pull_latest
        self.image: str | None = None

    def check(self) -> None:
        """Raise unless the maintenance guest can start on this host."""
        if self.opts.runtime == "crun":
            require_krun()
        self.image = resolve_image(self.podman, self.image_arg, self.pull_latest)

    def argv(self, plan: ResizePlan) -> list[str]:
        """The ``podman run`` argv of the maintenance container for ``plan``."""
        if self.image is None:
            self.check()
        assert self.image is not None
        name = resize_container_name(task_container_name(self.layout.slug))
        return resize_task_argv(name=name, hostname=task_hostname(self.layout.slug),
                                state_root=self.layout.state_root, disk=plan.disk,
                                image=self.image, opts=self.opts, guest_init_path=GUEST_INIT_PATH)

    def run(self, plan: ResizePlan) -> int:
        """Run the guest step with stdin null and stdout/stderr inherited."""
        proc = self.podman.spawn(self.argv(plan), stdin=subprocess.DEVNULL)
        return exit_status(proc.wait())
