"""The environment contract the host hands to the guest (reference 7.3, 7.11, 7.14).

Flags are true only for the exact value ``"1"``; ``AGENTBOX_HOST_UID``/``GID``
are optional unsigned 32-bit numbers (empty means unset); the disk ids and
labels default to the contract's values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from agentbox_guest_init import contract as c
from agentbox_guest_init.errors import GuestError

__all__ = ["GuestEnv", "GuestError"]


def _optional_u32(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    if value == "":
        return None
    if not (value.isascii() and value.isdigit()) or int(value) >= 1 << 32:
        raise GuestError(f"invalid numeric value in {name}")
    return int(value)


@dataclass(frozen=True)
class GuestEnv:
    """The parsed contract (``LibkrunEnv`` plus the microvm workspace names)."""

    nix_overlay: bool = False
    containers_storage: bool = False
    use_passt: bool = False
    enter_as_root: bool = False
    kvm_drop_to_dev: bool = False
    host_uid: int | None = None
    host_gid: int | None = None
    nix_disk_id: str = c.NIX_DISK.block_id
    nix_disk_label: str = c.NIX_DISK.label
    containers_disk_id: str = c.CONTAINERS_DISK.block_id
    containers_disk_label: str = c.CONTAINERS_DISK.label
    profile: bool = False
    debug: bool = False
    workspace_tag: str | None = None
    workspace_target: str = c.WORKSPACE
    workspace_fstype: str = ""
    """``9p`` or ``virtiofs``; empty: whichever transport offers the workspace tag."""
    allocator: str = ""
    mimalloc_lib: str = ""
    hardened_malloc_lib: str = ""

    @classmethod
    def parse(cls, env: Mapping[str, str] | None = None) -> GuestEnv:
        """Read the contract from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        return cls(
            nix_overlay=c.flag_is_set(env.get(c.ENV_NIX_OVERLAY)),
            containers_storage=c.flag_is_set(env.get(c.ENV_CONTAINERS_STORAGE)),
            use_passt=c.flag_is_set(env.get(c.ENV_USE_PASST)),
            enter_as_root=c.flag_is_set(env.get(c.ENV_ENTER_AS_ROOT)),
            kvm_drop_to_dev=c.flag_is_set(env.get(c.ENV_KVM_DROP_TO_DEV)),
            host_uid=_optional_u32(env, c.ENV_HOST_UID),
            host_gid=_optional_u32(env, c.ENV_HOST_GID),
            nix_disk_id=env.get(c.ENV_NIX_DISK_ID) or c.NIX_DISK.block_id,
            nix_disk_label=env.get(c.ENV_NIX_DISK_LABEL) or c.NIX_DISK.label,
            containers_disk_id=env.get(c.ENV_CONTAINERS_DISK_ID) or c.CONTAINERS_DISK.block_id,
            containers_disk_label=env.get(c.ENV_CONTAINERS_DISK_LABEL) or c.CONTAINERS_DISK.label,
            profile=c.flag_is_set(env.get(c.ENV_GUEST_PROFILE)),
            debug=c.flag_is_set(env.get(c.ENV_GUEST_DEBUG)),
            workspace_tag=env.get(c.ENV_MICROVM_WORKSPACE_TAG) or None,
            workspace_target=env.get(c.ENV_MICROVM_WORKSPACE_TARGET) or c.WORKSPACE,
            workspace_fstype=env.get(c.ENV_MICROVM_WORKSPACE_FSTYPE) or "",
            allocator=env.get(c.ENV_NIX_ALLOCATOR, ""),
            mimalloc_lib=env.get(c.ENV_MIMALLOC_LIB, ""),
            hardened_malloc_lib=env.get(c.ENV_HARDENED_MALLOC_LIB, ""),
        )

    @property
    def libkrun_disks(self) -> bool:
        """Either persistent-disk flag is set (``default enter`` then dispatches to libkrun)."""
        return self.nix_overlay or self.containers_storage
