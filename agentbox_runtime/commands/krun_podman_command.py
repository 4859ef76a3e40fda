"""``agentbox [libkrun]``, ``agentbox libkrun resize`` and ``agentbox libkrun reset-nix``: the
krun-podman backend (:mod:`agentbox_runtime.backends.krun_podman`) on the command line."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from agentbox_runtime.backends.krun_podman import KRUN_PODMAN, KrunPodmanMaintenance, exit_status, require_krun
from agentbox_runtime.backends.options import BackendOptions
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.podman import Podman, explicit_image, resolve_image
from agentbox_runtime.reset import reset_nix
from agentbox_runtime.resize import resize
from agentbox_runtime.state import StateLayout, canonical_cwd
from agentbox_runtime.tasks.krun_podman_argv import KrunOptions, select_krun_runtime

__all__ = ["exit_status", "require_krun", "run"]


def _backend_options(args: argparse.Namespace, command: tuple[str, ...]) -> BackendOptions:
    return BackendOptions(
        workspace=canonical_cwd(), memory_mib=args.mem * 1024 if args.mem is not None else None,
        tsi=bool(args.tsi), publish=tuple(args.publish or ()), root=bool(args.root), profile=bool(args.profile),
        debug=bool(args.debug), guest_init=Path(args.guest_init) if args.guest_init else None,
        command=command, krun_runtime=select_krun_runtime(getattr(args, "krun_runtime", None)))


def _options(args: argparse.Namespace, command: tuple[str, ...]) -> KrunOptions:
    return KRUN_PODMAN.krun_options(_backend_options(args, command))


def _require_runtime(opts: KrunOptions) -> None:
    """crun needs its krun handler (:func:`require_krun`); the QEMU-backed runtime does not."""
    if opts.runtime == "crun":
        require_krun()


def run(args: argparse.Namespace) -> int:
    """Dispatch ``agentbox [libkrun]``, ``libkrun resize`` and ``libkrun reset-nix``.

    Every user input (the krun runtime selection too) is validated before
    anything is probed, pulled or written; a libkrun task with ``--runtime crun``
    on a host whose crun lacks the krun handler stops with one line before
    anything else is done. ``reset-nix`` runs no Podman and ignores the krun
    runtime selection. The task itself is assembled by
    :meth:`agentbox_runtime.backends.krun_podman.KrunPodmanBackend.task`."""
    if args.libkrun_action == "reset-nix":
        reset_nix(StateLayout.resolve().state_root, bool(args.force))
        return 0
    explicit_image(args.image)  # every input is checked before the state dir or a disk is touched
    options = _backend_options(args, tuple(args.command))
    opts = KRUN_PODMAN.krun_options(options)
    layout = StateLayout.resolve()
    podman = Podman(debug=bool(args.debug))
    if args.libkrun_action == "resize":
        runner = KrunPodmanMaintenance(podman, layout, opts, args.image, bool(args.pull_latest))
        resize(args.target, args.size, layout.state_root, runner, before_grow=runner.check)
        return 0
    _require_runtime(opts)
    image = resolve_image(podman, args.image, args.pull_latest)
    task = KRUN_PODMAN.task(replace(options, image=image, state=layout), opts)
    try:
        return exit_status(podman.spawn(task.argv).wait())
    except OSError as exc:
        raise AgentboxError(f"failed to start podman libkrun task: {exc}") from None
