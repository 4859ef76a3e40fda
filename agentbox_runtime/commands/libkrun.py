"""``agentbox [libkrun]``, ``agentbox libkrun resize`` and ``agentbox libkrun reset-nix``."""

from __future__ import annotations

import argparse
import subprocess

from agentbox_guest_init.contract import GUEST_INIT_PATH
from agentbox_runtime import disks
from agentbox_runtime.doctor.tools import SELECT_QEMU_RUNTIME, check_crun_krun
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.images.commit import image_user
from agentbox_runtime.microvm.session import host_ids
from agentbox_runtime.podman import Podman, explicit_image, resolve_image
from agentbox_runtime.reset import reset_nix
from agentbox_runtime.resize import ResizePlan, resize
from agentbox_runtime.guest_resources import default_cpus, libkrun_ram_mib
from agentbox_runtime.state import StateLayout, resize_container_name, task_container_name, task_hostname
from agentbox_runtime.tasks.krun import (KrunOptions, guest_init_override, krun_task_argv, oci_runtime, resize_task_argv,
                                select_krun_runtime, validate_publish)
from agentbox_runtime.tasks.volumes import task_volumes


def require_krun() -> None:
    """Refuse to start libkrun tasks with ``--runtime crun`` on a host whose crun lacks the krun
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


def _options(args: argparse.Namespace, command: tuple[str, ...]) -> KrunOptions:
    mount = guest_init_override(args.guest_init) if args.guest_init else None
    publish = validate_publish(args.publish or [], bool(args.tsi))
    runtime = oci_runtime(select_krun_runtime(getattr(args, "krun_runtime", None)))
    return KrunOptions(
        ram_mib=libkrun_ram_mib(args.mem), cpus=default_cpus(), tsi=bool(args.tsi),
        publish=publish, root=bool(args.root),
        profile=bool(args.profile), debug=bool(args.debug), guest_init_mount=mount,
        command=command or ("fish", "-l"), runtime=runtime)


def _require_runtime(opts: KrunOptions) -> None:
    """crun needs its krun handler (:func:`require_krun`); the QEMU-backed runtime does not."""
    if opts.runtime == "crun":
        require_krun()


class PodmanKrunMaintenance:
    """Runs the resize guest step as a one-shot libkrun container (6.4).

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
        _require_runtime(self.opts)
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


def run(args: argparse.Namespace) -> int:
    """Dispatch ``agentbox [libkrun]``, ``libkrun resize`` and ``libkrun reset-nix``.

    Every user input (the krun runtime selection too) is validated before
    anything is probed, pulled or written; a libkrun task with ``--runtime crun``
    on a host whose crun lacks the krun handler stops with one line before
    anything else is done. ``reset-nix`` runs no Podman and ignores the krun
    runtime selection.

    ``AGENTBOX_HOST_UID``/``GID`` are :func:`agentbox_runtime.microvm.session.host_ids`:
    the user's ids, or as root the workspace owner (else the image user's), because the
    guest refuses a root dev user. The workspace is mounted at the image user's workdir
    (the image's labels, :func:`agentbox_runtime.images.commit.image_user`)."""
    if args.libkrun_action == "reset-nix":
        reset_nix(StateLayout.resolve().state_root, bool(args.force))
        return 0
    explicit_image(args.image)  # every input is checked before the state dir or a disk is touched
    opts = _options(args, tuple(args.command))
    layout = StateLayout.resolve()
    podman = Podman(debug=bool(args.debug))
    if args.libkrun_action == "resize":
        runner = PodmanKrunMaintenance(podman, layout, opts, args.image, bool(args.pull_latest))
        resize(args.target, args.size, layout.state_root, runner, before_grow=runner.check)
        return 0
    _require_runtime(opts)
    image = resolve_image(podman, args.image, args.pull_latest)
    user = image_user(image)
    uid, gid = host_ids(layout.workspace, user)
    layout.ensure()
    disks.prepare_all(disks.LIBKRUN_DISKS, layout.state_root)
    argv = krun_task_argv(name=task_container_name(layout.slug),
                          hostname=task_hostname(layout.slug), state_root=layout.state_root,
                          volumes=task_volumes(layout, user=user), uid=uid, gid=gid,
                          image=image, opts=opts, workdir=user.workdir)
    try:
        return exit_status(podman.spawn(argv).wait())
    except OSError as exc:
        raise AgentboxError(f"failed to start podman libkrun task: {exc}") from None
