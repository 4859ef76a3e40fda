"""Backend registry: backend name -> a builder of (unstarted) :class:`Machine` objects.

``machine_factory`` and the backend-specific factories look the backend up
here, so adding a backend is one entry::

    from agentbox_harness.registry import MACHINE_BACKENDS

    def build_mine(ctx: BackendContext, name: str, options: dict[str, object]) -> Machine: ...
    MACHINE_BACKENDS["mine"] = build_mine

A builder pops the options it understands from ``options``; whatever is left
is reported as unknown. It never starts the machine (the factory does, so a
failed start is still torn down).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_harness.backends import ContainerMachine, MicrovmMachine
from agentbox_harness.krun import build_krun_machine
from agentbox_harness.machine import Machine
from agentbox_harness.context import BackendContext
from agentbox_harness.workspace import Workspace
from agentbox_runtime.microvm.session import MicrovmOptions


MachineBuilder = Callable[[BackendContext, str, dict[str, object]], Machine]


def _microvm(vmm: str) -> MachineBuilder:
    def build(ctx: BackendContext, name: str, options: dict[str, object]) -> Machine:
        ws = options.pop("workspace", ctx.workspace)
        if not isinstance(ws, Workspace):
            raise TypeError(f"microvm option workspace must be a Workspace, not {type(ws).__name__}")
        s = ctx.session
        opts = MicrovmOptions(
            workspace=ws.path, image=str(options.pop("image", None) or ctx.image()),
            storage=str(options.pop("storage", ctx.storage)), vmm=str(options.pop("vmm", vmm)),
            mem_gib=int(options.pop("mem_gib", ctx.memory_gib)),  # type: ignore[call-overload]
            cpus=int(options.pop("cpus", ctx.cpus)),  # type: ignore[call-overload]
            state=ws.state, image_cache=Path(str(options.pop("image_cache", s.image_cache))),
            run_label=s.run_label, preserve_debug=bool(options.pop("preserve_debug", s.preserve_debug)),
            kernel=s.kernel, interactive=False,
            extra_env=(*(str(e) for e in options.pop("extra_env", ())),  # type: ignore[attr-defined]
                       *((f"{c.ENV_HARDENED}=1",) if options.pop("hardened", False) else ())))
        return MicrovmMachine(name=name, timeout_scale=s.timeout_scale, options=opts,
                              backend="qemu" if vmm == "qemu" else "krun-direct")
    return build


def _container(ctx: BackendContext, name: str, options: dict[str, object]) -> Machine:
    ws = ctx.workspace
    return ContainerMachine(name=name, backend="container", timeout_scale=1.0, workspace=ws.path,
                            state_root=ws.state.ensure().state_root, image=str(options.pop("image", None) or ctx.image()),
                            run_label=ctx.session.run_label, hardened=bool(options.pop("hardened", False)))


MACHINE_BACKENDS: dict[str, MachineBuilder] = {
    "qemu": _microvm("qemu"),
    "krun-direct": _microvm("libkrun"),
    "krun-podman": build_krun_machine,
    "container": _container,
}
"""Backend name -> machine builder (see the module docstring)."""
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
