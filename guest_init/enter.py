"""``default|libkrun|microvm|container enter [-- CMD]`` (reference 7.2, 7.3, 7.13, 7.14)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from guest_init import contract as c
from guest_init import prep
from guest_init.env import GuestEnv, GuestError, Identity, resolve_identity, shell_env


class Profile:
    """Step timings; printed on stderr when both profile and debug are set (reference 11)."""

    def __init__(self, section: str, genv: GuestEnv) -> None:
        self.section, self.enabled, self.report = section, genv.profile, genv.profile and genv.debug
        self.rows: list[tuple[str, float]] = []
        self.started = time.perf_counter()

    def step(self, label: str, fn: Callable[[], object]) -> object:
        t = time.perf_counter()
        try:
            return fn()
        finally:
            if self.enabled:
                self.rows.append((label, (time.perf_counter() - t) * 1000))

    def emit(self) -> None:
        if not self.report:
            return
        lines = [f"agentbox-guest-init profile: {self.section}"]
        lines += [f"  {label}: {ms:.3f}ms" for label, ms in self.rows]
        lines.append(f"  total: {(time.perf_counter() - self.started) * 1000:.3f}ms")
        print("\n".join(lines), file=sys.stderr)


def resolve_command(cmd: Sequence[str]) -> list[str]:
    return list(cmd) if cmd else list(c.DEFAULT_SHELL)


def resolve_shell(cmd0: str) -> str:
    if "/" in cmd0:
        return cmd0
    return shutil.which(cmd0) or cmd0


def materialize_home(ident: Identity, etc: Path = Path("/etc"), home: Path = Path(c.DEV_HOME)) -> None:
    """Rewrite the dev entries in passwd/group and create the home dirs (reference 7.10)."""
    for name, entry in (("passwd", f"dev:x:{ident.uid}:{ident.gid}:dev user:{c.DEV_HOME}:{ident.shell}"),
                        ("group", f"dev:x:{ident.gid}:")):
        path = etc / name
        lines = [line for line in path.read_text().splitlines() if not line.startswith("dev:")]
        path.write_text("\n".join(lines + [entry]) + "\n")
        os.chmod(path, 0o644)
    for rel in ("", ".local", ".local/share", ".local/state", ".cache", ".cache/tmp", ".config"):
        d = home / rel
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, ident.uid, ident.gid)
    for rel in (".local/state", ".cache/tmp"):
        os.chmod(home / rel, 0o700)
    nix_cache = home / ".cache/nix"
    if nix_cache.is_dir():
        for root, dirs, files in os.walk(nix_cache):
            for n in dirs + files:
                os.lchown(os.path.join(root, n), ident.uid, ident.gid)
        os.chown(nix_cache, ident.uid, ident.gid)


def fix_passt_dns(path: Path = Path("/etc/resolv.conf")) -> None:
    """Make ``nameserver 169.254.1.1`` the first line (reference 7.8)."""
    first = f"nameserver {c.PASST_DNS}"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    kept = [line for line in lines if line.strip() != first]
    if path.is_symlink():
        path.unlink()
    path.write_text("\n".join([first] + kept) + "\n")


def restrict_dmesg(path: Path = Path("/proc/sys/kernel/dmesg_restrict")) -> None:
    try:
        with open(path, "w") as f:
            f.write("1\n")
    except OSError as exc:
        raise GuestError(f"failed to set {path}=1 for dmesg restriction: {exc}") from None


def open_kvm(path: Path = Path("/dev/kvm")) -> None:
    """Make an exposed /dev/kvm usable by the non-root dev shell."""
    if path.exists():
        os.chmod(path, 0o666)


def nofile_floor(get: Callable[[], tuple[int, int]] = lambda: resource.getrlimit(resource.RLIMIT_NOFILE),
                 set_: Callable[[tuple[int, int]], None] = lambda v: resource.setrlimit(resource.RLIMIT_NOFILE, v),
                 floor: int = c.NOFILE_FLOOR) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE soft and hard to at least ``floor``; higher values are kept."""
    try:
        soft, hard = get()
    except OSError as exc:
        raise GuestError(f"failed to read guest RLIMIT_NOFILE before launching the guest shell: {exc}") from None
    inf = resource.RLIM_INFINITY
    if hard != inf and soft != inf and soft > hard:
        raise GuestError(f"guest RLIMIT_NOFILE is invalid: soft limit {soft} is greater than hard limit {hard}")
    new_hard = hard if hard == inf or hard >= floor else floor
    new_soft = soft if soft == inf or soft >= floor else floor
    if (new_soft, new_hard) != (soft, hard):
        try:
            set_((new_soft, new_hard))
        except (OSError, ValueError) as exc:
            raise GuestError(f"failed to raise guest RLIMIT_NOFILE from soft={soft} hard={hard} to "
                             f"soft={new_soft} hard={new_hard} before launching the guest shell: {exc}") from None
    return new_soft, new_hard


def mount_workspace(genv: GuestEnv, mounts: Path = Path("/proc/mounts")) -> None:
    """Mount the workspace tag at the target (idempotent for the same tag and fstype)."""
    if not genv.workspace_tag:
        raise GuestError(f"{c.ENV_MICROVM_WORKSPACE_TAG} is required for microvm enter")
    target = genv.workspace_target
    if not target.startswith("/"):
        raise GuestError(f"{c.ENV_MICROVM_WORKSPACE_TARGET} must be an absolute path")
    t = Path(target)
    if t.exists() and not t.is_dir():
        raise GuestError(f"microvm workspace target {target} exists and is not a directory")
    t.mkdir(parents=True, exist_ok=True)
    for line in mounts.read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == target:
            if parts[0] == genv.workspace_tag and parts[2] == genv.workspace_fstype:
                return
            raise GuestError(f"microvm workspace target {target} is already mounted from {parts[0]} as "
                             f"{parts[2]}, not {genv.workspace_fstype} tag {genv.workspace_tag}")
    argv = ["mount", "-t", genv.workspace_fstype]
    if genv.workspace_fstype == "9p":
        argv += ["-o", "trans=virtio,version=9p2000.L,msize=262144,access=client"]
    proc = subprocess.run(argv + [genv.workspace_tag, target], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise GuestError(f"failed to mount microvm workspace {genv.workspace_fstype} tag {genv.workspace_tag}: "
                         f"{proc.stderr.strip()}")
    if os.getcwd() == target or os.environ.get("PWD") == target:
        os.chdir(target)


def drop_and_exec(cmd: list[str], ident: Identity, genv: GuestEnv, env: dict[str, str]) -> None:
    for k in (c.ENV_GUEST_PROFILE, c.ENV_GUEST_DEBUG):
        env.pop(k, None)
    if not cmd:
        raise GuestError("cannot exec an empty command")
    if os.geteuid() == 0 and not genv.enter_as_root:
        try:
            os.setgroups([])
        except OSError as exc:
            raise GuestError(f"failed to clear supplementary groups: {exc}") from None
        try:
            os.setgid(ident.gid)
        except OSError as exc:
            raise GuestError(f"failed to set gid {ident.gid}: {exc}") from None
        try:
            os.setuid(ident.uid)
        except OSError as exc:
            raise GuestError(f"failed to set uid {ident.uid}: {exc}") from None
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        raise GuestError(f"failed to exec {cmd[0]}: {exc.strerror}") from None


def enter(mode: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
    """The libkrun/microvm enter flow; never returns on success (exec)."""
    env = dict(os.environ if env is None else env)
    genv = GuestEnv.parse(env)
    prof = Profile(f"{mode} enter", genv)
    argv = resolve_command(cmd)
    if mode == "microvm":
        prof.step("mount-workspace", lambda: mount_workspace(genv))
    ident = prof.step("resolve-identity",
                      lambda: resolve_identity(genv, resolve_shell(argv[0]), mode=mode))
    assert isinstance(ident, Identity)
    shell = prof.step("derive-shell-env", lambda: shell_env(ident, genv, env.get("PATH", "/usr/bin:/bin")))
    assert isinstance(shell, dict)
    prof.step("export-shell-env", lambda: env.update(shell))
    root = os.geteuid() == 0
    if root:
        prof.step("materialize-home", lambda: materialize_home(ident))
    if genv.use_passt and mode == "libkrun":
        prof.step("fix-passt-dns", fix_passt_dns)
    if root:
        prof.step("restrict-dmesg", restrict_dmesg)
        prof.step("open-kvm", open_kvm)
        os.environ.update({k: v for k, v in env.items() if k.startswith("AGENTBOX_")})
        if genv.nix_overlay:
            prof.step("start-nix-prep", lambda: prep.start_background(prep.NIX))
        if genv.containers_storage:
            prof.step("start-podman-prep", lambda: prep.start_background(prep.PODMAN))
    if genv.nix_overlay:
        prof.step("export-nix-remote", lambda: env.update(NIX_REMOTE=c.NIX_REMOTE_VALUE))
    if mode == "libkrun":
        prof.step("ensure-nofile-floor", nofile_floor)
    prof.emit()
    drop_and_exec(argv, ident, genv, env)


def default_enter(cmd: Sequence[str], self_argv: list[str]) -> None:
    """Dispatch to ``libkrun enter`` when a libkrun disk flag is set, else ``container enter``."""
    genv = GuestEnv.parse()
    mode = "libkrun" if genv.nix_overlay or genv.containers_storage else "container"
    os.execv(self_argv[0], [*self_argv, mode, "enter", "--", *resolve_command(cmd)])


def container_enter(cmd: Sequence[str]) -> None:
    """Native container mode: drop to dev when root and asked to (reference 7.13, simplified NSS)."""
    env = dict(os.environ)
    genv = GuestEnv.parse(env)
    argv = resolve_command(cmd)
    uid = os.geteuid()
    drop = uid == 0 and not genv.enter_as_root and (
        genv.kvm_drop_to_dev or [os.path.basename(argv[0]), *argv[1:]] == list(c.DEFAULT_SHELL))
    if drop and (genv.host_uid is None or genv.host_gid is None):
        raise GuestError("agentbox-guest-init container enter: AGENTBOX_HOST_UID and AGENTBOX_HOST_GID are "
                         "required for KVM task mode")
    ident = Identity(genv.host_uid or 1000, genv.host_gid or 1000, resolve_shell(argv[0])) if uid == 0 \
        else Identity(uid, os.getegid(), resolve_shell(argv[0]))
    env.update(shell_env(ident, genv, env.get("PATH", "/usr/bin:/bin")))
    if uid == 0 and drop:
        materialize_home(ident)
    if not drop:
        genv = GuestEnv.parse({**env, c.ENV_ENTER_AS_ROOT: "1"})
    drop_and_exec(argv, ident, genv, env)
