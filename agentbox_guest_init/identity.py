"""Who the guest shell runs as (reference 7.3 step 2, 7.13, 7.14)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.image_user import ImageUser, load
from agentbox_guest_init.proc import ROOT, etc_entries


@dataclass(frozen=True)
class Identity:
    """The dev user as this guest runs it: its ids (the host user's where one is mapped, else the
    image's), its login shell, and the image user it is (name, home, workdir)."""

    uid: int
    gid: int
    shell: str
    image: ImageUser = ImageUser()

    @property
    def name(self) -> str:
        """The user's login name (the image's; ``dev`` by default)."""
        return self.image.user

    @property
    def home(self) -> str:
        """The user's home (``/home/<name>``)."""
        return self.image.home

    def entries(self) -> tuple[str, str]:
        """The user's ``/etc/passwd`` and ``/etc/group`` lines."""
        return (f"{self.name}:x:{self.uid}:{self.gid}:dev user:{self.home}:{self.shell}",
                f"{self.name}:x:{self.gid}:")


def resolve_shell(cmd0: str) -> str:
    """``cmd0`` as is when it holds a ``/``, else its PATH match, else the bare name."""
    if "/" in cmd0:
        return cmd0
    return shutil.which(cmd0) or cmd0


def resolve_identity(genv: GuestEnv, shell: str, *, euid: int | None = None, egid: int | None = None,
                     mode: str = "libkrun", root: Path = ROOT) -> Identity:
    """The dev identity for ``libkrun`` or ``microvm`` enter.

    As root the host ids are required and must both be non-zero (they name
    the non-root dev user); not as root, the current ids are the identity.
    """
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    image = load(root)
    if euid != 0:
        return Identity(euid, egid, shell, image)
    where = "libkrun guest init" if mode == "libkrun" else f"{mode} enter"
    if genv.host_uid is None:
        raise GuestError(f"{c.ENV_HOST_UID} is required for {where}")
    if genv.host_gid is None:
        raise GuestError(f"{c.ENV_HOST_GID} is required for {where}")
    if genv.host_uid == 0 or genv.host_gid == 0:
        raise GuestError(f"{mode} host UID/GID must identify the non-root dev user, got "
                         f"{genv.host_uid}:{genv.host_gid}")
    return Identity(genv.host_uid, genv.host_gid, shell, image)


def passwd_dev(root: Path = ROOT) -> Identity | None:
    """The image user's entry of ``<root>/etc/passwd`` (``dev`` unless the image names another), if any."""
    image = load(root)
    for fields in etc_entries(root, "passwd"):
        if len(fields) >= 7 and fields[0] == image.user and fields[2].isdigit() and fields[3].isdigit():
            return Identity(int(fields[2]), int(fields[3]), fields[6] or "/bin/sh", image)
    return None


def dev_identity(genv: GuestEnv, root: Path = ROOT) -> Identity:
    """The dev user for a root process that serves others (the agent, ``service-wait``).

    The contract's host ids when both are set and non-zero, else the image
    user's entry of ``/etc/passwd``, else the image user's ids (1000:1000).
    """
    image = load(root)
    entry = passwd_dev(root)
    shell = entry.shell if entry else "/bin/sh"
    if genv.host_uid and genv.host_gid:
        return Identity(genv.host_uid, genv.host_gid, shell, image)
    return entry or Identity(image.uid, image.gid, shell, image)
