"""``agentbox [libkrun]``, ``agentbox libkrun resize`` and ``agentbox libkrun reset-nix``."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from guest_init.contract import GUEST_INIT_PATH
from runtime import disks
from runtime.errors import AgentboxError
from runtime.podman import Podman, resolve_image
from runtime.reset import reset_nix
from runtime.resize import ResizePlan, resize
from runtime.sizing import default_cpus, libkrun_ram_mib
from runtime.state import StateLayout, resize_container_name, task_container_name, task_hostname
from runtime.tasks.krun import KrunOptions, guest_init_override, krun_task_argv, resize_task_argv, validate_publish
from runtime.tasks.volumes import task_volumes


def crun_krun_status() -> tuple[bool, str]:
    """Whether ``crun --version`` lists ``+LIBKRUN`` (the krun handler)."""
    try:
        out = subprocess.run(["crun", "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except FileNotFoundError:
        return False, "crun is not installed"
    except subprocess.TimeoutExpired:
        return False, "crun --version timed out"
    if "+LIBKRUN" in out:
        return True, "crun has the krun handler"
    return False, "crun was built without libkrun ('crun --version' does not list +LIBKRUN)"


def require_krun() -> None:
    """Refuse to start libkrun tasks on a host whose crun lacks the krun handler."""
    ok, why = crun_krun_status()
    if not ok:
        raise AgentboxError(f"libkrun mode needs crun built with libkrun and libkrunfw: {why}; "
                            "run 'agentbox doctor' to see what this host can run "
                            "(the microvm --vmm qemu and container modes work without libkrun)")


def exit_status(code: int | None) -> int:
    """A child's status as agentbox's: 0..255 passes through, anything else is 1."""
    return code if code is not None and 0 <= code <= 255 else 1


def _options(args: argparse.Namespace, command: tuple[str, ...]) -> KrunOptions:
    mount = guest_init_override(args.guest_init) if args.guest_init else None
    return KrunOptions(
        ram_mib=libkrun_ram_mib(args.mem), cpus=default_cpus(), tsi=bool(args.tsi),
        publish=validate_publish(args.publish or [], bool(args.tsi)), root=bool(args.root),
        profile=bool(args.profile), debug=bool(args.debug), guest_init_mount=mount,
        command=command or ("fish", "-l"))


class PodmanKrunMaintenance:
    """Runs the resize guest step as a one-shot libkrun container (6.4)."""

    def __init__(self, podman: Podman, layout: StateLayout, image: str, opts: KrunOptions) -> None:
        self.podman, self.layout, self.image, self.opts = podman, layout, image, opts

    def run(self, plan: ResizePlan) -> int:
        name = resize_container_name(task_container_name(self.layout.slug))
        argv = resize_task_argv(name=name, hostname=task_hostname(self.layout.slug),
                                state_root=self.layout.state_root, disk=plan.disk,
                                image=self.image, opts=self.opts,
                                guest_init_path=GUEST_INIT_PATH)
        proc = self.podman.spawn(argv, stdin=subprocess.DEVNULL)
        return exit_status(proc.wait())


def run(args: argparse.Namespace) -> int:
    """Dispatch the libkrun subcommands."""
    if args.libkrun_action == "reset-nix":
        reset_nix(StateLayout.resolve().state_root, bool(args.force))
        return 0
    # Validate every user input before anything is probed or written.
    opts = _options(args, tuple(args.command))
    layout = StateLayout.resolve()
    podman = Podman(debug=bool(args.debug))
    if args.libkrun_action == "resize":
        image = resolve_image(podman, args.image, args.pull_latest)
        runner = PodmanKrunMaintenance(podman, layout, image, opts)
        resize(args.target, args.size, layout.state_root, runner, before_grow=require_krun)
        return 0
    image = resolve_image(podman, args.image, args.pull_latest)
    require_krun()
    layout.ensure()
    disks.prepare_all(disks.LIBKRUN_DISKS, layout.state_root)
    argv = krun_task_argv(name=task_container_name(layout.slug),
                          hostname=task_hostname(layout.slug), state_root=layout.state_root,
                          volumes=task_volumes(layout), uid=os.getuid(), gid=os.getgid(),
                          image=image, opts=opts)
    try:
        return exit_status(podman.spawn(argv).wait())
    except OSError as exc:
        raise AgentboxError(f"failed to start podman libkrun task: {exc}") from None


__all__ = ["run", "crun_krun_status", "exit_status", "PodmanKrunMaintenance", "Path"]
