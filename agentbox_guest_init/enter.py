"""``libkrun enter`` and ``microvm enter`` (reference 7.3, 7.14) and ``default enter`` (7.2).

Each flow is a list of named steps run under a :class:`~agentbox_guest_init.profile.Profile`
(the labels are the profile rows and the documented operation order), then
the privilege drop and ``exec``. Everything the flows touch goes through
:class:`Host`, so unit tests run them for real against a tmp root and
record only the final drop and exec.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from agentbox_guest_init import contract as c
from agentbox_guest_init import instance_id, prep
from agentbox_guest_init.dns import fix_passt_dns
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init import hardened_profile
from agentbox_guest_init.hardening import Limits, materialize_allocator_preload, nofile_floor, open_kvm, restrict_dmesg
from agentbox_guest_init.home import materialize_home
from agentbox_guest_init.identity import Identity, dev_identity, resolve_identity, resolve_shell
from agentbox_guest_init.profile import Profile
from agentbox_guest_init.proc import ROOT, Runner, check, run_tool, under
from agentbox_guest_init.shell_env import nix_remote_env, shell_env

NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144,access=client"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def drop_privileges(ident: Identity) -> None:
    """``setgroups([])``, ``setgid``, ``setuid`` with the reference error texts."""
    try:
        os.setgroups([])
    except OSError as exc:
        raise GuestError(f"failed to clear supplementary groups: {exc.strerror}") from None
    try:
        os.setgid(ident.gid)
    except OSError as exc:
        raise GuestError(f"failed to set gid {ident.gid}: {exc.strerror}") from None
    try:
        os.setuid(ident.uid)
    except OSError as exc:
        raise GuestError(f"failed to set uid {ident.uid}: {exc.strerror}") from None


def _exec(cmd0: str, argv: list[str], env: dict[str, str]) -> NoReturn:
    try:
        os.execvpe(cmd0, argv, env)
    except OSError as exc:
        raise GuestError(f"failed to exec {cmd0}: {exc.strerror}") from None


@dataclass
class Host:
    """The boundaries the enter flows cross: the real guest by default."""

    root: Path = ROOT
    euid: int = field(default_factory=os.geteuid)
    egid: int = field(default_factory=os.getegid)
    runner: Runner = run_tool
    getrlimit: Callable[[], Limits] = lambda: resource.getrlimit(resource.RLIMIT_NOFILE)
    setrlimit: Callable[[Limits], None] = lambda v: resource.setrlimit(resource.RLIMIT_NOFILE, v)
    drop: Callable[[Identity], None] = drop_privileges
    execvpe: Callable[[str, list[str], dict[str, str]], None] = _exec
    start_prep: Callable[[prep.PrepKind, Mapping[str, str]], object] | None = None
    serve_agent: Callable[[tuple[str | None, str | None], dict[str, str]], None] | None = None
    cwd: Callable[[], str] = os.getcwd
    chdir: Callable[[str], None] = os.chdir
    harden_before_drop: Callable[[], None] = hardened_profile.drop_bounding_set
    confine: Callable[[], None] = hardened_profile.confine

    def start_background(self, kind: prep.PrepKind, env: Mapping[str, str]) -> object:
        """Start a background prep with ``env`` (the exported shell env plus the contract)."""
        if self.start_prep is not None:
            return self.start_prep(kind, env)
        return prep.start_background(kind, root=self.root, env=env, euid=self.euid)


def resolve_command(cmd: Sequence[str]) -> list[str]:
    """``cmd``, or ``fish -l`` when empty."""
    return list(cmd) if cmd else list(c.DEFAULT_SHELL)


NINEP_TAGS = "/sys/bus/virtio/drivers/9pnet_virtio"


def share_fstype(tag: str, root: Path = ROOT) -> str:
    """``9p`` when a virtio-9p device offers ``tag``, else ``virtiofs`` (libkrun's transport)."""
    base = under(root, NINEP_TAGS)
    try:
        devices = list(base.iterdir())
    except OSError:
        return "virtiofs"
    for dev in devices:
        try:
            if (dev / "mount_tag").read_text().rstrip("\0\n") == tag:
                return "9p"
        except OSError:
            continue
    return "virtiofs"


def mount_workspace(genv: GuestEnv, host: Host) -> bool:
    """Mount the workspace tag at its target; False when it already was (same tag and fstype)."""
    if not genv.workspace_tag:
        raise GuestError(f"{c.ENV_MICROVM_WORKSPACE_TAG} is required for microvm enter")
    target, tag = genv.workspace_target, genv.workspace_tag
    fstype = genv.workspace_fstype or share_fstype(tag, host.root)
    if not target.startswith("/"):
        raise GuestError(f"{c.ENV_MICROVM_WORKSPACE_TARGET} must be an absolute path")
    path = under(host.root, target)
    if path.exists() and not path.is_dir():
        raise GuestError(f"microvm workspace target {target} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    for line in under(host.root, "/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == target:
            if parts[0] == tag and parts[2] == fstype:
                return False
            raise GuestError(f"microvm workspace target {target} is already mounted from {parts[0]} as "
                             f"{parts[2]}, not {fstype} tag {tag}")
    options = ["-o", NINEP_OPTIONS] if fstype == "9p" else []
    check(host.runner, ["mount", "-t", fstype, *options, tag, target],
          f"failed to mount microvm workspace {fstype} tag {tag}")
    try:
        if host.cwd() == target:
            host.chdir(target)  # see the mounted tree, not the dir under it
    except OSError:
        pass
    return True


def finish(prof: Profile, argv: list[str], ident: Identity, drop: bool, env: dict[str, str],
           host: Host) -> None:
    """Clear the profile flags, print the report, drop to dev when asked, exec."""
    for key in (c.ENV_GUEST_PROFILE, c.ENV_GUEST_DEBUG):
        env.pop(key, None)
    prof.emit()
    if not argv:
        raise GuestError("cannot exec an empty command")
    hardened = drop and hardened_profile.enabled(env)
    if hardened:  # the shell's hardened profile: read-only root, no capabilities, confined
        hardened_profile.read_only_root(host.runner, host.root, hardened_profile.exceptions(env))
        host.harden_before_drop()
    if drop:
        host.drop(ident)
    if hardened:
        host.confine()
    agent = own_agent(argv)
    if agent is not None and host.serve_agent is not None:
        host.serve_agent(agent, env)
        return
    host.execvpe(argv[0], argv, env)


def own_agent(argv: list[str]) -> tuple[str | None, str | None] | None:
    """``(device, port)`` when the command is our own ``agentbox-guest-init agent [--port N|--device P]``
    (served in this process: no second interpreter start, about a second under TCG), else None."""
    if len(argv) < 2 or os.path.basename(argv[0]) != "agentbox-guest-init" or argv[1] != "agent":
        return None
    rest = argv[2:]
    if not rest:
        return None, None
    if len(rest) == 2 and rest[0] in ("--port", "--device"):
        return (None, rest[1]) if rest[0] == "--port" else (rest[1], None)
    return None


def _serve_agent(where: tuple[str | None, str | None], env: dict[str, str]) -> NoReturn:
    """Become the agent: the command's environment, then serve until EOF or shutdown."""
    from agentbox_guest_init import agent

    os.environ.clear()
    os.environ.update(env)
    raise SystemExit(agent.main(*where))


def enter(mode: str, cmd: Sequence[str], env: Mapping[str, str] | None = None, host: Host | None = None) -> None:
    """The ``libkrun``/``microvm`` enter flow; does not return on success (exec, or our own agent served
    in this process)."""
    host = host or Host(serve_agent=_serve_agent)
    env_out = dict(os.environ if env is None else env)
    if hardened_profile.enabled(env_out) and c.flag_is_set(env_out.get(c.ENV_CONTAINERS_STORAGE)):
        env_out[c.ENV_CONTAINERS_STORAGE] = "0"  # the hardened profile refuses user namespaces: no nested Podman
    prof = Profile.from_env(f"{mode} enter", env_out)
    genv = prof.step("read-env", lambda: GuestEnv.parse(env_out))
    argv = resolve_command(cmd)
    root_user = host.euid == 0
    microvm = mode == "microvm"
    if microvm:
        prof.step("mount-workspace", lambda: mount_workspace(genv, host))

    def identity() -> Identity:
        shell = resolve_shell(argv[0])
        if microvm and root_user and genv.enter_as_root:
            dev = dev_identity(genv, host.root)  # stays root: dev only names the shell env and home
            return Identity(dev.uid, dev.gid, shell, dev.image)
        return resolve_identity(genv, shell, euid=host.euid, egid=host.egid, mode=mode, root=host.root)

    ident = prof.step("resolve-identity", identity)
    shell = prof.step("derive-shell-env", lambda: shell_env(ident, genv, env_out.get("PATH") or DEFAULT_PATH))
    prof.step("export-shell-env", lambda: env_out.update(shell))
    _prepare_guest(prof, genv, ident, env_out, host, microvm=microvm)
    if not microvm or root_user:
        prof.step("ensure-nofile-floor", lambda: nofile_floor(host.getrlimit, host.setrlimit))
    finish(prof, argv, ident, root_user and not genv.enter_as_root, env_out, host)


def _prepare_guest(prof: Profile, genv: GuestEnv, ident: Identity, env_out: dict[str, str], host: Host, *,
                   microvm: bool) -> None:
    """The guest-side setup steps before the command: as root the home, allocator preload, dmesg
    restriction and /dev/kvm; passt's DNS (not in a microvm); the nix and Podman preps started in the
    background and the nix daemon's environment exported."""
    root_user = host.euid == 0
    if root_user:
        instance_id.write(host.root, replace=False)
        prof.step("materialize-home", lambda: materialize_home(ident, host.root))
    if genv.use_passt and not microvm:
        prof.step("fix-passt-dns", lambda: fix_passt_dns(host.root))
    if root_user:
        prof.step("materialize-allocator-preload", lambda: materialize_allocator_preload(genv, host.root))
        prof.step("restrict-dmesg", lambda: restrict_dmesg(host.root))
        prof.step("expose-kvm", lambda: open_kvm(host.root))
    if genv.nix_overlay:
        prof.step("start-nix-prep", lambda: host.start_background(prep.NIX, env_out))
    if genv.containers_storage:
        prof.step("start-podman-prep", lambda: host.start_background(prep.PODMAN, env_out))
    if genv.nix_overlay:
        prof.step("export-nix-remote", lambda: env_out.update(nix_remote_env(genv)))


def default_enter(cmd: Sequence[str], self_argv: Sequence[str], env: Mapping[str, str] | None = None,
                  execv: Callable[[str, list[str]], object] = os.execv) -> None:
    """Re-exec as ``libkrun enter`` when either disk flag is set, else as ``container enter``."""
    genv = GuestEnv.parse(os.environ if env is None else env)
    mode = "libkrun" if genv.libkrun_disks else "container"
    execv(self_argv[0], [*self_argv, mode, "enter", "--", *resolve_command(cmd)])
