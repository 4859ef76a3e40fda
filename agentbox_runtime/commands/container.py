"""``agentbox container [sidecar] [-- CMD]``: native Podman task with the nix-daemon sidecar.

``agentbox container`` prepares (or reuses, after a socket health probe) the
workspace's nix-daemon sidecar, runs the task container with stdio
inherited (``-it`` on a terminal, ``-i`` otherwise; ``-- CMD`` replaces the
default ``fish -l``), then removes the sidecar and unmounts the merged
``/nix`` unless other tasks still use them. The exit status is the task's.

``agentbox container sidecar`` starts or reuses only the sidecar, prints
where it listens and leaves it running.

Hosts whose Podman defaults do not run containers (crun refusing the cgroup
layout, default ulimits above the hard limits) get ``CONTAINERS_CONF`` pointed at
a harness containers.conf automatically unless the user set one: see
``agentbox_runtime.container.host_conf``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from agentbox_runtime.container.lifecycle import (
    adapt_task_argv, rootful_dev_ids, run_task, sidecar_only_message, start_sidecar_only,
)
from agentbox_runtime.container import host_conf
from agentbox_runtime.container.podman_bridge import CliPodman
from agentbox_runtime.container.sidecar import Sidecar, SidecarRequest
from agentbox_runtime.errors import InputError, NotAvailableError


def _core(module: str, name: str) -> Any:
    """``module.name`` from the core runtime, or a clear not-available error."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise NotAvailableError(
            f"agentbox container needs {module}.{name}, which this build does not have") from exc


def _workspace(args: argparse.Namespace, podman: CliPodman) -> tuple[Path, str, Path, str]:
    """(canonical cwd, slug, state root, image) for this run."""
    cwd = Path(os.getcwd()).resolve(strict=True)
    slug = _core("agentbox_runtime.state", "workspace_slug")(cwd)
    layout = _core("agentbox_runtime.state", "StateLayout").resolve(cwd)
    image = _core("agentbox_runtime.podman", "resolve_image")(podman, args.image, args.pull_latest)
    return cwd, slug, Path(layout.state_root), image


def run(args: argparse.Namespace) -> int:
    """Run ``agentbox container`` or ``agentbox container sidecar``."""
    if getattr(args, "hardened", False) and args.root:
        raise InputError("--hardened runs the task as dev with the hardened profile; it cannot be combined "
                         "with --root")
    host_conf.apply_if_needed()  # stock Debian 12: runc and ulimits the host allows, unless CONTAINERS_CONF is set
    podman = CliPodman(debug=bool(args.debug))
    command = list(getattr(args, "command", []) or [])
    if args.container_action == "sidecar" and command:
        raise InputError(f"'agentbox container sidecar' takes no command (got '{' '.join(command)}'); "
                         "use 'agentbox container -- CMD' to run one")
    cwd, slug, state_root, image = _workspace(args, podman)
    req = SidecarRequest(image=image, canonical_cwd=str(cwd), slug=slug, state_root=state_root)
    if args.container_action == "sidecar":
        print(sidecar_only_message(start_sidecar_only(podman, req)))
        return 0
    name = _core("agentbox_runtime.state", "task_container_name")(slug)
    build = _core("agentbox_runtime.tasks.container", "container_task_argv")
    rootless = os.geteuid() != 0

    user = _core("agentbox_runtime.images.commit", "image_user")(image)

    def task_argv(sidecar: Sidecar) -> list[str]:
        reference = build(args=args, cwd=cwd, slug=slug, name=name, image=image,
                          sidecar_name=sidecar.name, merged=sidecar.merged, user=user)
        return adapt_task_argv(reference, image, interactive=sys.stdin.isatty(),
                               rootless=rootless, command=command,
                               dev_ids=rootful_dev_ids(os.environ, user))

    return run_task(podman, req, name, task_argv)
