"""Guest disk discovery by label and id (reference 7.7).

In order: the preferred device when its LABEL matches, ``blkid -L <label>``,
then the globs below (each checked by LABEL), else an error.
"""

from __future__ import annotations

import glob
from collections.abc import Callable

from agentbox_guest_init import contract as c
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.proc import Runner, run_tool

GLOBS = ("/dev/disk/by-id/*{id}*", "/dev/vd?", "/dev/sd?", "/dev/xvd?", "/dev/nvme?n?", "/dev/pmem?")
Expand = Callable[[str], list[str]]


def label_of(device: str, runner: Runner = run_tool) -> str:
    """``blkid -o value -s LABEL <device>`` (empty when blkid fails)."""
    proc = runner(["blkid", "-o", "value", "-s", "LABEL", device])
    return proc.stdout.strip() if proc.returncode == 0 else ""


def device_by_label(label: str, runner: Runner = run_tool) -> str:
    """``blkid -L <label>`` (empty when blkid fails)."""
    proc = runner(["blkid", "-L", label])
    return proc.stdout.strip() if proc.returncode == 0 else ""


def find_disk(label: str, disk_id: str, preferred: str, *, runner: Runner = run_tool,
              expand: Expand = glob.glob) -> str:
    """The device node holding the filesystem labelled ``label``."""
    if label_of(preferred, runner) == label:
        return preferred
    found = device_by_label(label, runner)
    if found:
        return found
    for pattern in GLOBS:
        for dev in sorted(expand(pattern.format(id=disk_id))):
            if label_of(dev, runner) == label:
                return dev
    raise GuestError(f"no btrfs disk with label {label} and id {disk_id}")


def disk_names(genv: GuestEnv, key: str) -> tuple[str, str, str]:
    """``(label, id, preferred device)`` of the ``nix`` or ``containers`` disk under this contract."""
    if key == c.NIX_DISK.key:
        return genv.nix_disk_label, genv.nix_disk_id, c.NIX_DISK.preferred_device
    return genv.containers_disk_label, genv.containers_disk_id, c.CONTAINERS_DISK.preferred_device


def find_contract_disk(genv: GuestEnv, key: str, not_found: str, *, runner: Runner = run_tool,
                       expand: Expand = glob.glob) -> str:
    """The ``nix``/``containers`` disk; when absent, ``<not_found> (label=… id=…)``."""
    label, disk_id, preferred = disk_names(genv, key)
    try:
        return find_disk(label, disk_id, preferred, runner=runner, expand=expand)
    except GuestError:
        raise GuestError(f"{not_found} (label={label} id={disk_id})") from None
