"""Backend registry: backend name -> a builder of (unstarted) :class:`Machine` objects.

``machine_factory`` and the backend-specific factories look the backend up
here, so adding a backend is one entry::

    from agentbox_harness.registry import MACHINE_BACKENDS

    def build_mine(ctx: BackendContext, name: str, options: dict[str, object]) -> Machine: ...
    MACHINE_BACKENDS["mine"] = build_mine

A builder takes the options it understands from ``options`` (the built-in ones all of them, as
one :class:`~agentbox_runtime.backends.options.BackendOptions` record: an unknown name or a
wrong type is one error naming what the backend accepts); whatever is left is reported as
unknown. It never starts the machine (the factory does, so a failed start is still torn down).

The built-in builders assemble the task through :mod:`agentbox_runtime.backends`, as the CLI
commands do; only the harness's own choices are made here (no terminal, the isolated home and
state, the run label; for krun-podman the agent as the guest command and its attach port; a
microvm machine makes its agent the guest command itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from agentbox_guest_init import contract as c
from agentbox_harness.backends import AGENT_STDIO_COMMAND, ContainerMachine, MicrovmMachine
from agentbox_harness.context import BackendContext
from agentbox_harness.krun_podman_machine import KrunPodmanMachine
from agentbox_harness.machine import Machine
from agentbox_harness.workspace import Workspace
from agentbox_runtime.backends import (BACKENDS, CONTAINER, KRUN_DIRECT, KRUN_PODMAN, QEMU, Backend, BackendOptions,
                                       MicrovmBackend)
from agentbox_runtime.doctor import krun_podman_runtime

MachineBuilder = Callable[[BackendContext, str, dict[str, object]], Machine]


def harness_options(backend: Backend, ctx: BackendContext, options: dict[str, object]) -> BackendOptions:
    """The factory's keyword ``options`` over the test's dimensions (workspace, memory, vCPUs,
    storage) and the session's settings, for ``backend``; ``options`` is emptied (every name is
    checked). ``workspace`` is a :class:`Workspace` (its path and state); ``image`` defaults to the
    test's image, built only when none was given."""
    given, s = dict(options), ctx.session
    options.clear()
    ws = given.get("workspace", ctx.workspace)
    if not isinstance(ws, Workspace):
        raise TypeError(f"{backend.name} option workspace must be a Workspace, not {type(ws).__name__}")
    if "workspace" in given:
        given["workspace"] = ws.path
    base = BackendOptions(workspace=ws.path, state=ws.state, memory_mib=ctx.memory_mib, cpus=ctx.cpus,
                          storage=ctx.storage, interactive=False, run_label=s.run_label,
                          preserve_debug=s.preserve_debug, kernel=s.kernel, image_cache=s.image_cache,
                          host_home=ws.state.state_root / "home", dev_ids_from_sudo=False, boot=ctx.boot)
    opts = BackendOptions.parse(backend.name, given, backend.accepts, base)
    return opts if opts.image else replace(opts, image=ctx.image())


def _microvm(backend: MicrovmBackend) -> MachineBuilder:
    def build(ctx: BackendContext, name: str, options: dict[str, object]) -> Machine:
        opts = backend.task(harness_options(backend, ctx, options))  # the machine makes its agent the command
        return MicrovmMachine(name=name, backend=backend.name, timeout_scale=ctx.session.timeout_scale, options=opts)
    return build


def _krun_podman(ctx: BackendContext, name: str, options: dict[str, object]) -> Machine:
    """Options: ``memory_mib``, ``cpus``, ``publish`` (host:guest port specs), ``tsi`` (TSI networking
    instead of passt), ``guest_init`` (a host file mounted over the image's guest-init), ``image``,
    ``root`` (accepted and ignored: the agent is root and runs each command as the verb asks). The
    OCI runtime is crun when it has the krun handler, else ``agentbox-krun-runtime`` (the doctor's
    verdict); the agent's attach channel is published on 127.0.0.1 (not with TSI)."""
    o = harness_options(KRUN_PODMAN, ctx, options)
    attach = () if o.tsi else (f"127.0.0.1::{c.ATTACH_TCP_PORT}",)
    o = replace(o, root=True, command=AGENT_STDIO_COMMAND, publish=(*o.publish, *attach),
                krun_runtime=krun_podman_runtime(ctx.session.checks) or "crun")
    task = KRUN_PODMAN.task(o)
    return KrunPodmanMachine(name=name, backend=KRUN_PODMAN.name, timeout_scale=ctx.session.timeout_scale,
                             argv=task.argv, container=task.container, layout=task.layout,
                             krun_options=task.options, image=task.image, image_user=task.user)


def _container(ctx: BackendContext, name: str, options: dict[str, object]) -> Machine:
    o = harness_options(CONTAINER, ctx, options)
    assert o.image is not None and o.state is not None
    return ContainerMachine(name=name, backend=CONTAINER.name, timeout_scale=1.0, workspace=o.workspace,
                            state_root=o.state.ensure().state_root, image=o.image, run_label=o.run_label,
                            hardened=o.hardened, publish=o.publish)


MACHINE_BACKENDS: dict[str, MachineBuilder] = {
    QEMU.name: _microvm(QEMU),
    KRUN_DIRECT.name: _microvm(KRUN_DIRECT),
    KRUN_PODMAN.name: _krun_podman,
    CONTAINER.name: _container,
}
"""Backend name -> machine builder (see the module docstring)."""
assert tuple(MACHINE_BACKENDS) == tuple(BACKENDS)
BUILTIN_BACKENDS: tuple[str, ...] = tuple(MACHINE_BACKENDS)
"""The backends this package provides (``MACHINE_BACKENDS`` may gain more at run time)."""


def build(backend: str, ctx: BackendContext, name: str, options: dict[str, object]) -> Machine:
    """An unstarted machine of ``backend``; unknown backends and options are one clear error."""
    builder = MACHINE_BACKENDS.get(backend)
    if builder is None:
        raise ValueError(f"unknown agentbox backend '{backend}'; known: {', '.join(MACHINE_BACKENDS)}")
    left = dict(options)
    machine = builder(ctx, name, left)
    if left:
        raise TypeError(f"unknown {backend} option(s): {', '.join(sorted(left))}")
    return machine
