"""Guest disk discovery by label and id, and mount helpers (reference 7.7)."""

from __future__ import annotations

import glob
import shutil
import subprocess
from collections.abc import Callable

from guest_init.env import GuestError

Blkid = Callable[[str], str]
GLOBS = ("/dev/disk/by-id/*{id}*", "/dev/vd?", "/dev/sd?", "/dev/xvd?", "/dev/nvme?n?", "/dev/pmem?")


def blkid_label(device: str) -> str:
    """``blkid -o value -s LABEL <device>`` (empty on failure)."""
    proc = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", device], capture_output=True,
                          text=True, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def blkid_by_label(label: str) -> str:
    proc = subprocess.run(["blkid", "-L", label], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def find_disk(label: str, disk_id: str, preferred: str, *, by_label: Callable[[str], str] = blkid_by_label,
              label_of: Blkid = blkid_label, expand: Callable[[str], list[str]] = glob.glob) -> str:
    """The device holding the btrfs filesystem labelled ``label``."""
    if label_of(preferred) == label:
        return preferred
    found = by_label(label)
    if found:
        return found
    for pattern in GLOBS:
        for dev in sorted(expand(pattern.format(id=disk_id))):
            if label_of(dev) == label:
                return dev
    raise GuestError(f"no btrfs disk with label {label} and id {disk_id}")


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise GuestError(f"required tools missing on PATH: {', '.join(missing)}")


def is_mounted(path: str) -> bool:
    return subprocess.run(["findmnt", "-rn", path], capture_output=True, timeout=30).returncode == 0


def run(argv: list[str], context: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        detail = proc.stderr.strip()
        raise GuestError(f"{context}: {detail}" if detail else context)
