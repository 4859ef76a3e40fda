"""Who the guest shell runs as (reference 7.3 step 2, 7.13, 7.14)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.proc import ROOT, etc_entries

CONTAINER_DEFAULT_IDS = (c.DEV_UID, c.DEV_GID)


@dataclass(frozen=True)
class Identity:
    """The dev user's ids and login shell."""

    uid: int
    gid: int
    shell: str


def resolve_shell(cmd0: str) -> str:
    """``cmd0`` as is when it holds a ``/``, else its PATH match, else the bare name."""
    if "/" in cmd0:
        return cmd0
    return shutil.which(cmd0) or cmd0


def resolve_identity(genv: GuestEnv, shell: str, *, euid: int | None = None, egid: int | None = None,
                     mode: str = "libkrun") -> Identity:
    """The dev identity for ``libkrun`` or ``microvm`` enter.

    As root the host ids are required and must both be non-zero (they name
    the non-root dev user); not as root, the current ids are the identity.
    """
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    if euid != 0:
        return Identity(euid, egid, shell)
    where = "libkrun guest init" if mode == "libkrun" else f"{mode} enter"
    if genv.host_uid is None:
        raise GuestError(f"{c.ENV_HOST_UID} is required for {where}")
    if genv.host_gid is None:
        raise GuestError(f"{c.ENV_HOST_GID} is required for {where}")
    if genv.host_uid == 0 or genv.host_gid == 0:
        raise GuestError(f"{mode} host UID/GID must identify the non-root dev user, got "
                         f"{genv.host_uid}:{genv.host_gid}")
    return Identity(genv.host_uid, genv.host_gid, shell)


def passwd_dev(root: Path = ROOT) -> Identity | None:
    """The ``dev`` entry of ``<root>/etc/passwd``, if any."""
    for fields in etc_entries(root, "passwd"):
        if len(fields) >= 7 and fields[0] == c.DEV_USER and fields[2].isdigit() and fields[3].isdigit():
            return Identity(int(fields[2]), int(fields[3]), fields[6] or "/bin/sh")
    return None


def dev_identity(genv: GuestEnv, root: Path = ROOT) -> Identity:
    """The dev user for a root process that serves others (the agent, ``service-wait``).

    The contract's host ids when both are set and non-zero, else the ``dev``
    entry of ``/etc/passwd``, else 1000:1000.
    """
    entry = passwd_dev(root)
    shell = entry.shell if entry else "/bin/sh"
    if genv.host_uid and genv.host_gid:
        return Identity(genv.host_uid, genv.host_gid, shell)
    return entry or Identity(*CONTAINER_DEFAULT_IDS, shell)
