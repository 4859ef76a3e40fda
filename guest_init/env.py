"""The environment contract the host hands to the guest (reference 7.3, 7.14)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from guest_init import contract as c


class GuestError(Exception):
    """A guest-init failure: printed as ``agentbox-guest-init: <msg>``, exit 1."""


def _optional_u32(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    if value == "":
        return None
    if not value.isdigit() or int(value) >= 1 << 32:
        raise GuestError(f"invalid numeric value in {name}")
    return int(value)


@dataclass(frozen=True)
class GuestEnv:
    """Parsed contract: flags are true only for exactly ``1``."""

    nix_overlay: bool
    containers_storage: bool
    use_passt: bool
    enter_as_root: bool
    kvm_drop_to_dev: bool
    host_uid: int | None
    host_gid: int | None
    nix_disk_id: str
    nix_disk_label: str
    containers_disk_id: str
    containers_disk_label: str
    profile: bool
    debug: bool
    workspace_tag: str | None
    workspace_target: str
    workspace_fstype: str

    @classmethod
    def parse(cls, env: Mapping[str, str] | None = None) -> GuestEnv:
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
            workspace_fstype=env.get(c.ENV_MICROVM_WORKSPACE_FSTYPE) or "virtiofs",
        )


@dataclass(frozen=True)
class Identity:
    """Who the shell runs as."""

    uid: int
    gid: int
    shell: str


def resolve_identity(genv: GuestEnv, shell: str, *, euid: int | None = None,
                     mode: str = "libkrun") -> Identity:
    """The dev identity: host ids when root (required, non-zero), else the current ids."""
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        if genv.host_uid is None:
            raise GuestError(f"{c.ENV_HOST_UID} is required for {mode} guest init")
        if genv.host_gid is None:
            raise GuestError(f"{c.ENV_HOST_GID} is required for {mode} guest init")
        if genv.host_uid == 0 or genv.host_gid == 0:
            raise GuestError(f"{mode} host UID/GID must identify the non-root dev user, got "
                             f"{genv.host_uid}:{genv.host_gid}")
        return Identity(genv.host_uid, genv.host_gid, shell)
    return Identity(euid, os.getegid(), shell)


def shell_env(ident: Identity, genv: GuestEnv, path: str) -> dict[str, str]:
    """The shell environment exported before exec (reference 7.9)."""
    home = c.DEV_HOME
    env = {"USER": c.DEV_USER, "LOGNAME": c.DEV_USER, "HOME": home, "SHELL": ident.shell,
           "XDG_CONFIG_HOME": f"{home}/.config", "XDG_DATA_HOME": f"{home}/.local/share",
           "XDG_STATE_HOME": f"{home}/.local/state", "XDG_CACHE_HOME": f"{home}/.cache",
           "TMPDIR": f"{home}/.cache/tmp"}
    if genv.containers_storage:
        env["XDG_RUNTIME_DIR"] = f"/run/user/{ident.uid}"
        env["PATH"] = f"{c.IDMAP_BIN_DIR}:{path}"
        env["DOCKER_HOST"] = c.docker_host(ident.uid)
    if genv.nix_overlay:
        env["NIX_REMOTE"] = c.NIX_REMOTE_VALUE
    return env
