"""Container-mode task ``podman run`` argv (reference 8.2)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.image_user import DEFAULT_IMAGE_USER, ImageUser
from agentbox_guest_init.hardened_profile import SCRATCH, SCRATCH_OPTIONS
from agentbox_runtime.config import security_exceptions
from agentbox_runtime.errors import InputError
from agentbox_runtime.tasks.krun_podman_argv import TMPFS
from agentbox_runtime.tasks.volumes import Volumes, mount_arg


def hardened_options(user: ImageUser = DEFAULT_IMAGE_USER, exceptions: Collection[str] = ()) -> tuple[str, ...]:
    """The hardened profile's Podman options: the user's home is a tmpfs holding a copy of the image's
    (Podman copies a directory's content up into a tmpfs mounted over it; ``U`` gives it to the task's
    user, which is dev: keep-id's user rootless, the dev ids rootful (:func:`adapt_task_argv`)); the
    size-limited scratch tmpfs of the guest profile (``hardened_profile.SCRATCH``; ``/var/run`` is
    ``/run`` in the image). ``exceptions`` (``[security.exceptions.*]``): ``writable-root`` drops
    ``--read-only``."""
    read_only = () if "writable-root" in exceptions else ("--read-only", "--read-only-tmpfs=true")
    scratch = [arg for path, size in SCRATCH
               for arg in ("--tmpfs", f"{'/run' if path == '/var/run' else path}:rw,size={size},{SCRATCH_OPTIONS}")]
    return (*read_only, "--tmpfs", f"{user.home}:rw,nosuid,nodev,exec,mode=0755,U", *scratch,
            "--cap-drop=all", "--security-opt=no-new-privileges")


def container_argv(*, name: str, hostname: str, volumes: Volumes, merged: Path,
                   sidecar_name: str, image: str, root: bool = False, profile: bool = False,
                   debug: bool = False, run_label: str | None = None, hardened: bool = False,
                   user: ImageUser = DEFAULT_IMAGE_USER, exceptions: Collection[str] | None = None) -> list[str]:
    """The exact ordered argv of a container-mode task (without ``podman``).

    The shell starts in the image user's workdir (``user``, from the image's labels).
    ``hardened`` adds the hardened profile before the image: a read-only root with tmpfs on
    /tmp, /var/tmp, /run and the user's home (:func:`hardened_options`), no capabilities, no new
    privileges, and Podman's default seccomp profile (nothing here turns it off). ``exceptions``
    are the ones granted (default: agentbox.toml's ``[security.exceptions.*]``)."""
    if hardened and root:
        raise InputError("the hardened profile runs the task as dev; it cannot be combined with --root")
    argv = ["run", "--rm", "-it", "--name", name, "--userns", "keep-id"]
    if root:
        argv += ["--user", "0:0", "--env", f"{c.ENV_ENTER_AS_ROOT}=1"]
    argv += ["--workdir", user.workdir, "--hostname", hostname]
    argv += volumes.argv()
    argv += ["--tmpfs", TMPFS, "--volume", mount_arg(merged, "/nix", "ro"),
             "--env", f"NIX_REMOTE={c.NIX_REMOTE_VALUE}",
             "--label", f"{c.LABEL_ROLE}=task", "--label", f"{c.LABEL_SIDECAR}={sidecar_name}"]
    if profile:
        argv += ["--env", f"{c.ENV_GUEST_PROFILE}=1"]
    if debug:
        argv += ["--env", f"{c.ENV_GUEST_DEBUG}=1"]
    if run_label:
        argv += ["--label", f"{c.LABEL_HARNESS_RUN}={run_label}"]
    if hardened:
        granted = security_exceptions() if exceptions is None else exceptions
        argv += [*hardened_options(user, granted), "--env", f"{c.ENV_HARDENED}=1"]
    argv += [image, "fish", "-l"]
    return argv
