"""``agentbox microvm [--storage] [--vmm] [--mem] [--cpus] [--guest-init] [--kernel] [--initrd] [--preserve-debug] [-- CMD]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agentbox_runtime.backends.microvm_backend import microvm_backend
from agentbox_runtime.backends.options import BackendOptions
from agentbox_runtime.errors import InputError
from agentbox_runtime.microvm.task_reaper import reap_stale
from agentbox_runtime.microvm.task import run_microvm
from agentbox_runtime.podman import explicit_image
from agentbox_runtime.state import StateLayout, canonical_cwd

PULL_LATEST = ("agentbox --pull-latest microvm is not supported yet; experimental microvm image refresh must "
               "use a future Buildah-backed path, not Podman")


def _file(value: str | None, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise InputError(f"{what} '{value}' is not an existing file")
    return path


def run(args: argparse.Namespace) -> int:
    """Run one microvm task; the exit status is the guest command's."""
    if args.hardened and args.root:
        raise InputError("--hardened runs the shell as dev with the hardened profile; it cannot be combined "
                         "with --root")
    if args.pull_latest:
        raise InputError(PULL_LATEST)
    image = explicit_image(args.image)  # --image, else AGENTBOX_IMAGE; validated before anything is written
    options = BackendOptions(
        workspace=canonical_cwd(), image=image, storage=args.storage,
        memory_mib=args.mem * 1024 if args.mem is not None else None, cpus=args.cpus,
        guest_init=_file(args.guest_init, "--guest-init"), preserve_debug=bool(args.preserve_debug),
        command=tuple(args.command), root=bool(args.root), profile=bool(args.profile), debug=bool(args.debug),
        kernel=_file(args.kernel, "--kernel"), initrd=_file(args.initrd, "--initrd"), interactive=True,
        hardened=bool(args.hardened))
    opts = microvm_backend(args.vmm).task(options)
    reap_stale(StateLayout.resolve().ensure())
    sys.stdout.flush()
    return run_microvm(opts)
