"""``container enter``: native container mode (reference 7.13).

The shell drops from root to dev only when asked (``AGENTBOX_KVM_DROP_TO_DEV=1``)
or when the command is the login shell ``fish -l``; with ``--userns keep-id``
the process is already non-root. When ``AGENTBOX_NSS_WRAPPER_LIB`` is set,
dev's passwd/group entries are served through nss_wrapper (harness
deviation: without it the step is skipped instead of failing, since the
Debian image resolves dev from ``/etc/passwd``).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.enter import DEFAULT_PATH, Host, finish, resolve_command
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.home import HOME_DIRS, materialize_home, replace_dev_line
from agentbox_guest_init.identity import Identity, resolve_shell
from agentbox_guest_init.image_user import load
from agentbox_guest_init.profile import Profile
from agentbox_guest_init.proc import under
from agentbox_guest_init.shell_env import shell_env


def wants_drop(genv: GuestEnv, argv: Sequence[str], euid: int) -> bool:
    """Root drops to dev for KVM task mode or the ``fish -l`` login shell."""
    login_shell = [os.path.basename(argv[0]), *argv[1:]] == list(c.DEFAULT_SHELL) if argv else False
    return euid == 0 and (genv.kvm_drop_to_dev or login_shell)


def derive_identity(genv: GuestEnv, argv: Sequence[str], host: Host) -> tuple[Identity, bool]:
    """The dev identity and whether to drop to it."""
    shell = resolve_shell(argv[0])
    drop = wants_drop(genv, argv, host.euid)
    image = load(host.root)
    if host.euid != 0:
        return Identity(host.euid, host.egid, shell, image), False
    if drop and (genv.host_uid is None or genv.host_gid is None):
        raise GuestError("agentbox-guest-init container enter: AGENTBOX_HOST_UID and AGENTBOX_HOST_GID are "
                         "required for KVM task mode")
    if genv.host_uid is not None and genv.host_gid is not None:
        return Identity(genv.host_uid, genv.host_gid, shell, image), drop
    return Identity(image.uid, image.gid, shell, image), drop


def materialize_nss_wrapper(ident: Identity, drop: bool, root: Path, pid: int) -> dict[str, str]:
    """``/tmp/agentbox-nss.<pid>/{passwd,group}`` with the dev entries; the files' paths.

    The container's /tmp is its own tmpfs, but the name is predictable: a directory already there
    is used only when it is a real directory of ours, never through a symlink."""
    d = under(root, f"/tmp/agentbox-nss.{pid}")
    try:
        d.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise GuestError(f"refusing {d} for the nss wrapper files: not a directory of uid {os.geteuid()}") \
                from None
    os.chmod(d, 0o755 if drop else 0o700)
    out: dict[str, str] = {}
    entries = dict(zip(("passwd", "group"), ident.entries(), strict=True))
    for name, entry in entries.items():
        try:
            text = under(root, f"/etc/{name}").read_text()
        except OSError:
            text = ""
        path = d / name
        path.write_text(replace_dev_line(text, entry))
        os.chmod(path, 0o644 if drop else 0o600)
        out[name] = f"/tmp/agentbox-nss.{pid}/{name}"
    return out


def make_home_dirs(ident: Identity, root: Path) -> None:
    """Create the user's home dirs where possible; failures are warnings."""
    for rel in HOME_DIRS:
        try:
            under(root, ident.home).joinpath(rel).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"agentbox-guest-init: warning: cannot create {ident.home}/{rel}: {exc.strerror}",
                  file=sys.stderr)


def container_enter(cmd: Sequence[str], env: Mapping[str, str] | None = None, host: Host | None = None) -> None:
    """The container-mode enter flow; does not return on success (exec)."""
    host = host or Host()
    env_out = dict(os.environ if env is None else env)
    prof = Profile.from_env("container enter", env_out)
    genv = GuestEnv.parse(env_out)
    argv = resolve_command(cmd)
    ident, drop = prof.step("derive-identity", lambda: derive_identity(genv, argv, host))
    shell = prof.step("derive-shell-env", lambda: shell_env(ident, genv, env_out.get("PATH") or DEFAULT_PATH))
    prof.step("export-shell-env", lambda: env_out.update(shell))
    lib = env_out.get(c.ENV_NSS_WRAPPER_LIB, "")
    if lib:
        files = prof.step("materialize-nss-wrapper",
                          lambda: materialize_nss_wrapper(ident, drop, host.root, os.getpid()))
        preload = ":".join(p for p in (lib, env_out.get("LD_PRELOAD", "")) if p)
        prof.step("export-nss-wrapper-env", lambda: env_out.update(
            NSS_WRAPPER_PASSWD=files["passwd"], NSS_WRAPPER_GROUP=files["group"], LD_PRELOAD=preload))
    prof.step("materialize-home-config", lambda: make_home_dirs(ident, host.root))
    if drop:
        prof.step("materialize-dev-identity", lambda: materialize_home(ident, host.root))
    finish(prof, argv, ident, drop, env_out, host)
