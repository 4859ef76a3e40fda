"""The container backend: a rootless Podman container with the workspace's nix-daemon sidecar
(``agentbox container``; reference section 8).

:meth:`ContainerBackend.task` assembles the task once; ``agentbox container`` runs it in the
foreground (:func:`agentbox_runtime.container.lifecycle.run_task`) and the harness detached
(:func:`agentbox_runtime.container.machine_transport.start_task`), both with
:meth:`ContainerTask.argv`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from agentbox_guest_init.image_user import ImageUser
from agentbox_runtime.backend_caps import Capabilities, caps
from agentbox_runtime.backends.options import BackendOptions
from agentbox_runtime.container.lifecycle import adapt_task_argv, rootful_dev_ids
from agentbox_runtime.container.machine_transport import detached_argv
from agentbox_runtime.container.sidecar import Sidecar, SidecarRequest
from agentbox_runtime.disks import RawDisk
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.images.commit import image_user
from agentbox_runtime.state import StateLayout, task_container_name, task_hostname
from agentbox_runtime.tasks.container_argv import container_argv
from agentbox_runtime.tasks.krun_podman_argv import validate_publish
from agentbox_runtime.tasks.volumes import task_volumes


@dataclass(frozen=True)
class ContainerTask:
    """One assembled container task; its argv needs the sidecar it runs against."""

    name: str
    image: str
    user: ImageUser
    layout: StateLayout
    request: SidecarRequest
    options: BackendOptions

    def argv(self, sidecar: Sidecar, detached: bool = False) -> list[str]:
        """The task's ``podman`` arguments against ``sidecar``: the reference argv (8.2) fitted to
        how it runs here (:func:`adapt_task_argv`: ``-i`` without a terminal, rootful ids, the
        command), or with ``detached`` a ``-d`` keep-alive task the harness execs into; each
        ``publish`` spec becomes ``--publish SPEC`` before the image (none in the reference)."""
        o, user, layout = self.options, self.user, self.layout
        reference = container_argv(
            name=self.name, hostname=task_hostname(layout.slug),
            volumes=task_volumes(layout, home=o.host_home, user=user), merged=sidecar.merged,
            sidecar_name=sidecar.name, image=self.image, root=o.root, profile=o.profile, debug=o.debug,
            run_label=o.run_label, hardened=o.hardened, user=user)
        dev_ids = rootful_dev_ids(os.environ, user) if o.dev_ids_from_sudo else (str(user.uid), str(user.gid))
        adapted = adapt_task_argv(reference, self.image, interactive=o.interactive, rootless=os.geteuid() != 0,
                                  command=o.command, dev_ids=dev_ids)
        argv = detached_argv(adapted, self.image) if detached else adapted
        at = len(argv) - 1 - argv[::-1].index(self.image)  # ``--publish SPEC`` each, just before the image
        return [*argv[:at], *(a for spec in o.publish for a in ("--publish", spec)), *argv[at:]]


@dataclass(frozen=True)
class ContainerBackend:
    """container (see the module docstring)."""

    name: str = "container"
    capabilities: Capabilities = caps("container")
    disks: tuple[RawDisk, ...] = ()
    accepts: frozenset[str] = frozenset({"image", "hardened", "publish"})

    def request(self, o: BackendOptions) -> SidecarRequest:
        """The sidecar ``o``'s task runs against (``agentbox container sidecar`` starts only that)."""
        if o.image is None:
            raise AgentboxError(f"{self.name}: no image resolved")
        validate_publish(o.publish, tsi=False)
        layout = o.state if o.state is not None else StateLayout.resolve(o.workspace)
        return SidecarRequest(image=o.image, canonical_cwd=str(layout.workspace), slug=layout.slug,
                              state_root=layout.state_root, run_label=o.run_label)

    def task(self, o: BackendOptions) -> ContainerTask:
        """The task of ``o`` (its ``image`` already resolved); reads the image user from the image's
        labels. Nothing is started or written."""
        request = self.request(o)
        layout = o.state if o.state is not None else StateLayout.resolve(o.workspace)
        return ContainerTask(task_container_name(layout.slug), request.image, image_user(request.image), layout,
                             request, o)

CONTAINER = ContainerBackend()
