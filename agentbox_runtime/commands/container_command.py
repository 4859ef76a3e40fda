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
import sys

from agentbox_runtime.backends.container_backend import CONTAINER
from agentbox_runtime.backends.options import BackendOptions
from agentbox_runtime.container import host_conf
from agentbox_runtime.container.lifecycle import run_task, sidecar_only_message, start_sidecar_only
from agentbox_runtime.podman import Podman
from agentbox_runtime.errors import InputError
from agentbox_runtime.podman import resolve_image
from agentbox_runtime.state import canonical_cwd


def run(args: argparse.Namespace) -> int:
    """Run ``agentbox container`` or ``agentbox container sidecar``; the task is assembled by
    :meth:`agentbox_runtime.backends.container_backend.ContainerBackend.task`."""
    hardened = bool(getattr(args, "hardened", False))
    if hardened and args.root:
        raise InputError("--hardened runs the task as dev with the hardened profile; it cannot be combined "
                         "with --root")
    host_conf.apply_if_needed()  # stock Debian 12: runc and ulimits the host allows, unless CONTAINERS_CONF is set
    podman = Podman(debug=bool(args.debug))
    command = tuple(getattr(args, "command", []) or [])
    if args.container_action == "sidecar" and command:
        raise InputError(f"'agentbox container sidecar' takes no command (got '{' '.join(command)}'); "
                         "use 'agentbox container -- CMD' to run one")
    workspace = canonical_cwd()
    image = resolve_image(podman, args.image, args.pull_latest)
    options = BackendOptions(workspace=workspace, image=image, command=command, root=bool(args.root),
                             hardened=hardened, profile=bool(args.profile), debug=bool(args.debug),
                             interactive=sys.stdin.isatty())
    if args.container_action == "sidecar":
        print(sidecar_only_message(start_sidecar_only(podman, CONTAINER.request(options))))
        return 0
    task = CONTAINER.task(options)
    return run_task(podman, task.request, task.name, task.argv)
