"""The guest contract: every name shared between the host runtime and the guest.

This module is the single source of truth for environment variable names,
disk ids and labels, guest paths, status files and the control-channel names.
It runs inside the guest (standard library only) and is imported by the host
``runtime`` package, never the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# --- environment flags (true only for the exact value "1") -----------------
ENV_NIX_OVERLAY: Final = "AGENTBOX_LIBKRUN_NIX_OVERLAY"
ENV_NIX_DISK_ID: Final = "AGENTBOX_LIBKRUN_NIX_DISK_ID"
ENV_NIX_DISK_LABEL: Final = "AGENTBOX_LIBKRUN_NIX_DISK_LABEL"
ENV_CONTAINERS_STORAGE: Final = "AGENTBOX_LIBKRUN_CONTAINERS_STORAGE"
ENV_CONTAINERS_DISK_ID: Final = "AGENTBOX_LIBKRUN_CONTAINERS_DISK_ID"
ENV_CONTAINERS_DISK_LABEL: Final = "AGENTBOX_LIBKRUN_CONTAINERS_DISK_LABEL"
ENV_USE_PASST: Final = "AGENTBOX_LIBKRUN_USE_PASST"
ENV_HOST_UID: Final = "AGENTBOX_HOST_UID"
ENV_HOST_GID: Final = "AGENTBOX_HOST_GID"
ENV_KVM_DROP_TO_DEV: Final = "AGENTBOX_KVM_DROP_TO_DEV"
ENV_ENTER_AS_ROOT: Final = "AGENTBOX_ENTER_AS_ROOT"
ENV_GUEST_PROFILE: Final = "AGENTBOX_GUEST_PROFILE"
ENV_GUEST_DEBUG: Final = "AGENTBOX_GUEST_DEBUG"
ENV_HARDENED: Final = "AGENTBOX_HARDENED"
"""``1``: the guest shell's hardened profile (:mod:`agentbox_guest_init.hardened_profile`)."""
ENV_NO_PROXY: Final = "no_proxy"
ENV_SCCACHE_DIR: Final = "SCCACHE_DIR"
ENV_MICROVM_WORKSPACE_TAG: Final = "AGENTBOX_MICROVM_WORKSPACE_TAG"
ENV_MICROVM_WORKSPACE_TARGET: Final = "AGENTBOX_MICROVM_WORKSPACE_TARGET"
# Harness extension: the filesystem type the workspace tag is mounted with.
# libkrun uses virtiofs (the reference default); the qemu backend uses 9p.
ENV_MICROVM_WORKSPACE_FSTYPE: Final = "AGENTBOX_MICROVM_WORKSPACE_FSTYPE"
ENV_NIX_PREP_WAIT_FOR_STATUS: Final = "AGENTBOX_NIX_PREP_WAIT_FOR_STATUS"
ENV_PODMAN_PREP_WAIT_FOR_STATUS: Final = "AGENTBOX_PODMAN_PREP_WAIT_FOR_STATUS"
ENV_REAL_PODMAN: Final = "AGENTBOX_REAL_PODMAN"
ENV_NSS_WRAPPER_LIB: Final = "AGENTBOX_NSS_WRAPPER_LIB"


@dataclass(frozen=True)
class DiskSpec:
    """One persistent raw btrfs disk as both sides see it."""

    key: str  # "nix" or "containers"
    index: int  # krun.disk.<index>
    block_id: str
    label: str
    preferred_device: str  # first guess inside the guest


NIX_DISK: Final = DiskSpec("nix", 0, "agentbox-nix", "AGENTBOX_NIX", "/dev/vda")
CONTAINERS_DISK: Final = DiskSpec(
    "containers", 1, "agentbox-containers", "AGENTBOX_CONTAINERS", "/dev/vdb"
)
DISKS: Final = (NIX_DISK, CONTAINERS_DISK)

# --- guest paths -----------------------------------------------------------
GUEST_INIT_PATH: Final = "/bin/agentbox-guest-init"
RUN_DIR: Final = "/run/agentbox"
NIX_PREP_STATUS: Final = "/run/agentbox/nix-prep.status"
NIX_PREP_LOG: Final = "/run/agentbox/nix-prep.log"
PODMAN_PREP_STATUS: Final = "/run/agentbox/podman-prep.status"
PODMAN_PREP_LOG: Final = "/run/agentbox/podman-prep.log"
NIX_DISK_MOUNT: Final = "/run/agentbox/nix-disk"
IDMAP_BIN_DIR: Final = "/run/agentbox/idmap-bin"
NIX_DAEMON_SOCKET: Final = "/nix/var/nix/daemon-socket/socket"
NIX_REMOTE_VALUE: Final = "unix:///nix/var/nix/daemon-socket/socket"
# The stock image's user and workdir; an image may name others (agentbox_guest_init.image_user).
WORKSPACE: Final = "/workspace"
DEV_USER: Final = "dev"
DEV_UID: Final = 1000
"""The dev user's uid in the stock image (and the fallback host ids when none fit)."""
DEV_GID: Final = 1000
DEV_HOME: Final = "/home/dev"
PREP_WAIT_TIMEOUT_S: Final = 120
NOFILE_FLOOR: Final = 524288
PASST_DNS: Final = "169.254.1.1"
DEFAULT_SHELL: Final = ("fish", "-l")


def podman_socket_path(uid: int) -> str:
    """Path of the rootless Podman API socket for ``uid`` inside the guest."""
    return f"/run/user/{uid}/podman/podman.sock"


def dev_dirs(home: str = DEV_HOME) -> dict[str, str]:
    """The user's XDG base directories under ``home`` (reference 7.9)."""
    return {"XDG_CONFIG_HOME": f"{home}/.config", "XDG_DATA_HOME": f"{home}/.local/share",
            "XDG_STATE_HOME": f"{home}/.local/state", "XDG_CACHE_HOME": f"{home}/.cache"}


def docker_host(uid: int) -> str:
    """The ``DOCKER_HOST`` value exported to the guest shell."""
    return f"unix://{podman_socket_path(uid)}"


# --- microvm / qemu guest wiring ------------------------------------------
WORKSPACE_TAG: Final = "agentbox-workspace"
ROOTFS_TAG: Final = "agentbox-root"
AGENT_PORT_NAME: Final = "org.agentbox.agent"
ATTACH_PORT_NAME: Final = "org.agentbox.attach"
"""A second agent channel for ``agentbox attach`` (qemu guests), free while the harness holds the first."""
LAUNCH_PORT_NAME: Final = "org.agentbox.launch"
"""A snapshot template's launch channel (qemu restore): PID 1 writes ``ready`` on it and then reads
one JSON line holding the launch config, a host random seed and the host's clock."""
SNAPSHOT_ROOT_LABEL: Final = "agentbox-root"
"""The filesystem label of a snapshot template's read-only root image (ext4 on virtio-scsi)."""
INSTANCE_ID_PATH: Final = "/run/agentbox/instance-id"
"""A random id PID 1 writes once per guest: cold boot or restore. It tells guests apart where the
kernel's ``boot_id`` cannot (every guest restored from one snapshot shares its ``boot_id``)."""
ATTACH_VSOCK_PORT: Final = 10_250
"""The vsock port the agent serves ``agentbox attach`` on (krun-direct: libkrun listens on a unix
socket in the task's socket dir and bridges each connection to it, ``krun_add_vsock_port2``)."""
ATTACH_TCP_PORT: Final = 10_251
"""The TCP port the agent serves ``agentbox attach`` on when the harness asks it to (krun-podman:
published on the host's 127.0.0.1 only). On every connection the host and the agent first prove to
each other that they hold the token the harness gave the agent over its main channel
(:class:`agentbox_guest_init.protocol.GuestAuth`); the token never crosses the port."""


def vsock_port_name(port: int) -> str:
    """The virtio-serial port name that carries vsock port ``port`` on a VMM without virtio-vsock
    (the QEMU-backed libkrun stand-in); the agent serves it like the vsock port itself."""
    return f"org.agentbox.vsock.{port}"


# --- host-side labels (podman containers the harness creates) --------------
LABEL_ROLE: Final = "io.agentbox.role"
LABEL_SIDECAR: Final = "io.agentbox.sidecar"
LABEL_HARNESS_RUN: Final = "io.agentbox.harness.run"


def flag_is_set(value: str | None) -> bool:
    """Contract flags are true only for exactly ``"1"``."""
    return value == "1"


def gate_says_failed(missing: Sequence[str]) -> bool:
    """The readiness gate's ``missing`` list (``status --json``, under ``gate``) names a prep that
    failed (``nix: failed (...)``): waiting longer cannot make the gate pass. Both the guest's
    ``status --wait gate`` and the host's ``Machine.wait_ready`` stop on it."""
    return any(str(m).split(" ", 1)[-1].startswith("failed") for m in missing)

# --- allocator preload (reference 7.11) and guest-init self path ----------
ENV_NIX_ALLOCATOR: Final = "AGENTBOX_NIX_ALLOCATOR"
ENV_MIMALLOC_LIB: Final = "AGENTBOX_MIMALLOC_LIB"
ENV_HARDENED_MALLOC_LIB: Final = "AGENTBOX_GRAPHENE_HARDENED_MALLOC_LIB"
NIX_ALLOCATOR_LIBS: Final = "/etc/nix-allocator-libs"
NIX_PRELOAD: Final = "/etc/ld-nix.so.preload"
# How background workers re-run guest-init (default: the launcher that ran us).
ENV_GUEST_INIT_SELF: Final = "AGENTBOX_GUEST_INIT_SELF"

# Boot-phase stamps on the kernel console: "agentbox-phase NAME UPTIME_S" (guest monotonic
# seconds since the kernel started). Phases in order: kernel (initramfs running), modules
# (loaded), root (task root mounted), init (PID 1 of the root running), enter (the guest
# command about to exec). agentbox_runtime.vmm.boot_phases turns them into durations.
PHASE_MARK: Final = "agentbox-phase"

# Kernel modules PID 1 loads from the root's /lib/modules in the background (the initramfs loads
# only what mounting the root needs). Anything else is loaded on demand by the kernel's modprobe.
LATE_MODULES: Final = ("crc32c_generic", "btrfs", "overlay", "fuse", "tun", "virtio_rng")
