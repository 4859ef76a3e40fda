"""The shell environment exported before exec (reference 7.9)."""

from __future__ import annotations

from agentbox_guest_init import contract as c
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.identity import Identity


def shell_env(ident: Identity, genv: GuestEnv, path: str) -> dict[str, str]:
    """``USER``, ``HOME``, ``SHELL``, the XDG dirs and ``TMPDIR`` of dev.

    With container storage also ``XDG_RUNTIME_DIR``, the idmap helper dir in
    front of ``path`` and ``DOCKER_HOST`` (the rootless Podman API socket).
    ``NIX_REMOTE`` is not here: ``export-nix-remote`` is its own step.
    """
    home = ident.home
    env = {"USER": ident.name, "LOGNAME": ident.name, "HOME": home, "SHELL": ident.shell, **c.dev_dirs(home),
           "TMPDIR": f"{home}/.cache/tmp"}
    if genv.containers_storage:
        env["XDG_RUNTIME_DIR"] = f"/run/user/{ident.uid}"
        env["PATH"] = f"{c.IDMAP_BIN_DIR}:{path}"
        env["DOCKER_HOST"] = c.docker_host(ident.uid)
    return env


def nix_remote_env(genv: GuestEnv) -> dict[str, str]:
    """``NIX_REMOTE`` pointing at the daemon socket when the nix overlay flag is set."""
    return {"NIX_REMOTE": c.NIX_REMOTE_VALUE} if genv.nix_overlay else {}
