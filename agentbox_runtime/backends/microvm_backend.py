"""The qemu and krun-direct backends: a :class:`~agentbox_runtime.microvm.task.MicrovmTask`
booted by QEMU or by libkrun (``agentbox microvm --vmm qemu|libkrun``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from agentbox_runtime.backend_caps import Capabilities, caps
from agentbox_runtime.config import hardened_env
from agentbox_runtime.backends.options import BackendOptions
from agentbox_runtime.disks import MICROVM_DISKS, RawDisk
from agentbox_runtime.errors import InputError
from agentbox_runtime.microvm.task import MicrovmOptions

MICROVM_ACCEPTS = frozenset({"image", "memory_mib", "cpus", "storage", "workspace", "image_cache", "extra_env",
                             "preserve_debug", "hardened", "boot"})
"""The options a pytest factory may give a qemu or krun-direct machine."""


@dataclass(frozen=True)
class MicrovmBackend:
    """qemu or krun-direct: both boot the image's own kernel with our PID 1; only the VMM differs."""

    name: str
    vmm: str
    """``qemu``, ``libkrun`` or (the command line's ``--vmm auto``) ``auto``."""
    capabilities: Capabilities
    disks: tuple[RawDisk, ...] = MICROVM_DISKS
    accepts: frozenset[str] = MICROVM_ACCEPTS

    def task(self, o: BackendOptions) -> MicrovmOptions:
        """The :class:`MicrovmOptions` of one task (``MicrovmTask(...)`` or ``run_microvm`` runs it).
        The hardened profile is ``AGENTBOX_HARDENED=1`` in the guest's env (with the exceptions
        agentbox.toml grants, :func:`~agentbox_runtime.config.hardened_env`): the agent, run as
        root, confines every command it runs as the image user; ``agentbox microvm`` refuses
        ``--root`` with it."""
        return MicrovmOptions(
            workspace=o.workspace, image=o.image, storage=o.storage, vmm=self.vmm, memory_mib=o.memory_mib,
            cpus=o.cpus, guest_init=o.guest_init, preserve_debug=o.preserve_debug, command=o.command,
            root=o.root, profile=o.profile, debug=o.debug, kernel=o.kernel, initrd=o.initrd,
            interactive=o.interactive, run_label=o.run_label, state=o.state, image_cache=o.image_cache, boot=o.boot,
            extra_env=(*o.extra_env, *(hardened_env() if o.hardened else ())))


QEMU = MicrovmBackend("qemu", "qemu", caps("qemu"))
KRUN_DIRECT = MicrovmBackend("krun-direct", "libkrun", caps("krun-direct"))
AUTO = MicrovmBackend("qemu or krun-direct", "auto", Capabilities(**{
    f.name: getattr(QEMU.capabilities, f.name) and getattr(KRUN_DIRECT.capabilities, f.name)
    for f in fields(Capabilities)}))
"""``agentbox microvm --vmm auto``: krun-direct where libkrun loads and /dev/kvm answers, else qemu
(chosen when the task starts); its capabilities are what both offer."""


def microvm_backend(vmm: str) -> MicrovmBackend:
    """The backend of ``agentbox microvm --vmm <vmm>`` (``qemu``, ``libkrun`` or ``auto``)."""
    by_vmm = {b.vmm: b for b in (QEMU, KRUN_DIRECT, AUTO)}
    if vmm not in by_vmm:
        raise InputError(f"invalid --vmm '{vmm}'; accepted: {', '.join(by_vmm)}")
    return by_vmm[vmm]
