"""What each backend can do, as one record per backend name.

The CLI, the doctor and the pytest fixtures ask these records instead of comparing backend
names: a fixture that needs a raw disk asks ``caps("qemu").raw_disks``, a verb that forwards a
port asks ``.port_forward``. The four backends:

- ``qemu``: a microVM booted by QEMU (KVM where a probe boot proved it, TCG otherwise);
- ``krun-direct``: a microVM booted by libkrun directly (``agentbox microvm``);
- ``krun-podman``: a microVM booted by ``podman run --runtime crun`` with crun's krun handler
  (``agentbox libkrun``);
- ``container``: a rootless Podman container with a nix-daemon sidecar (``agentbox container``).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKEND_NAMES: tuple[str, ...] = ("qemu", "krun-direct", "krun-podman", "container")
"""The backends, best first when they are all usable (``auto`` picks the first usable one)."""


@dataclass(frozen=True)
class Capabilities:
    """What one backend offers a test or a CLI command."""

    vm: bool
    """The guest runs its own kernel (a microVM), not a container on the host kernel."""
    raw_disks: bool
    """The persistent btrfs images attach to the guest as block devices (not as host mounts)."""
    attach: bool
    """``agentbox attach`` can open a shell in a running guest of this backend."""
    publish: bool
    """Host ports can be published when the guest starts (``podman run -p``)."""
    port_forward: bool
    """``Machine.forward_port`` can reach a guest TCP port from the host's 127.0.0.1: a forward added
    while the guest runs (qemu), or a port published at start (krun-podman, container). Not
    krun-direct: libkrun's port map is fixed before the VM starts, and TSI binds the guest's listen
    address on the host (0.0.0.0 for a wildcard server; docs/libkrun-fidelity.md (c))."""
    crash: bool
    """``Machine.crash`` can power the guest off hard (no sync, no shutdown)."""
    console: bool
    """The guest has a kernel console log that ``wait_for_console_text`` can read."""
    hardened: bool
    """The hardened profile (``hardened=True``) is available."""


CAPABILITIES: dict[str, Capabilities] = {
    "qemu": Capabilities(vm=True, raw_disks=True, attach=True, publish=False, port_forward=True,
                         crash=True, console=True, hardened=True),
    "krun-direct": Capabilities(vm=True, raw_disks=True, attach=True, publish=False, port_forward=False,
                                crash=True, console=True, hardened=True),
    "krun-podman": Capabilities(vm=True, raw_disks=True, attach=True, publish=True, port_forward=True,
                                crash=True, console=False, hardened=False),
    "container": Capabilities(vm=False, raw_disks=False, attach=True, publish=True, port_forward=True,
                              crash=True, console=False, hardened=True),
}
"""Backend name -> its capabilities (the backend model may refine these values)."""


def caps(backend: str) -> Capabilities:
    """The capabilities of ``backend``; an unknown name is one clear error naming the known ones."""
    try:
        return CAPABILITIES[backend]
    except KeyError:
        raise ValueError(f"unknown agentbox backend '{backend}'; known: {', '.join(CAPABILITIES)}") from None
