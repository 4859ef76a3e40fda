"""``krun.disk.<N>.{path,id,readonly}``: extra raw virtio-blk disks, as the reference's crun fork takes them.

Upstream crun has no such annotation; zeroqn/crun does (``krun.1.md`` at 0e425f40, "DISK
CONFIGURATION"; ``src/libcrun/handlers/krun-disk.c`` ``parse_disk_annotations`` and ``krun.c``
``libkrun_open_disk_config`` at 9f20944b):

- every annotation starting ``krun.disk.`` must be ``krun.disk.N.path``, ``.id`` or ``.readonly``;
  ``N`` is ``0`` or a decimal without sign or leading zeros; any other field is refused;
- the indexes are contiguous from 0; each disk needs a non-empty ``path`` and ``id``; ``readonly``
  is exactly ``true`` or ``false`` (default ``false``);
- the image is opened when the container is created (read-only or read-write, non-blocking; a
  relative path from the bundle directory, crun's working directory) and must be a non-empty
  regular file.

Each refusal is one line; ``create`` fails with it. The disks reach the guest in index order; the
guest sees a serial derived from the image file, never the id
(:func:`agentbox_runtime.vmm.krun_guest.libkrun_disk_serial`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.oci.bundle import Bundle

PREFIX = "krun.disk."
FIELDS = ("path", "id", "readonly")


class DiskError(AgentboxError):
    """A ``krun.disk.*`` annotation the fork refuses; one line."""


@dataclass(frozen=True)
class KrunDisk:
    index: int
    id: str
    path: str
    read_only: bool


def _index(key: str) -> tuple[int, str]:
    """The index of ``krun.disk.<N><rest>`` and ``rest``, or DiskError."""
    suffix = key[len(PREFIX):]
    digits = len(suffix) - len(suffix.lstrip("0123456789"))
    if not suffix:
        raise DiskError(f"invalid krun disk annotation index in {key!r}: empty index; accepted: "
                        "krun.disk.N.path, krun.disk.N.id, krun.disk.N.readonly")
    if suffix[0] == "0" and digits > 1:
        raise DiskError(f"invalid krun disk annotation index in {key!r}: leading zeros are not allowed")
    if digits == 0:
        raise DiskError(f"invalid krun disk annotation index in {key!r}: expected a canonical non-negative decimal")
    return int(suffix[:digits]), suffix[digits:]


def _field(key: str) -> tuple[int, str]:
    """The index and field name of a ``krun.disk.<N>.<field>`` key, or DiskError."""
    index, rest = _index(key)
    if not rest.startswith(".") or len(rest) == 1:
        raise DiskError(f"invalid krun disk annotation {key!r}: expected krun.disk.N.path, krun.disk.N.id or "
                        "krun.disk.N.readonly")
    name = rest[1:]
    if name not in FIELDS:
        raise DiskError(f"unsupported krun disk annotation {key!r}; accepted fields: {', '.join(FIELDS)}")
    return index, name


def _disk(bundle: Bundle, index: int, given: dict[str, str]) -> KrunDisk:
    """Disk ``index`` from its given fields: path and id present and non-empty, readonly true or
    false (default false), a relative path taken from the bundle."""
    for name in ("path", "id"):
        if name not in given:
            raise DiskError(f"missing required krun disk annotation krun.disk.{index}.{name}")
        if not given[name]:
            raise DiskError(f"krun disk annotation krun.disk.{index}.{name} must not be empty")
    readonly = given.get("readonly", "false")
    if readonly not in ("true", "false"):
        raise DiskError(f"invalid krun disk readonly value krun.disk.{index}.readonly={readonly!r}; accepted: "
                        "true, false")
    path = given["path"] if os.path.isabs(given["path"]) else str(bundle.path / given["path"])
    return KrunDisk(index, given["id"], path, readonly == "true")


def parse(bundle: Bundle) -> list[KrunDisk]:
    """The disks the annotations name, in index order; DiskError (one line) for the first refusal."""
    fields: dict[int, dict[str, str]] = {}
    for key, value in bundle.annotations.items():
        if key.startswith(PREFIX):
            index, name = _field(key)
            fields.setdefault(index, {})[name] = value
    disks = []
    for expected, index in enumerate(sorted(fields)):
        if index != expected:
            raise DiskError(f"krun disk annotation indexes must be contiguous from 0: missing index {expected}")
        disks.append(_disk(bundle, index, fields[index]))
    return disks


def check_image(disk: KrunDisk) -> None:
    """Open ``disk``'s image as the fork does: it must open as asked and be a non-empty regular file."""
    mode = "read-only" if disk.read_only else "read-write"
    try:
        fd = os.open(disk.path, (os.O_RDONLY if disk.read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise DiskError(f"cannot open krun disk {disk.id!r} from {disk.path} as {mode}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise DiskError(f"krun disk {disk.id!r} path {disk.path} must be a regular raw disk image")
    if st.st_size == 0:
        raise DiskError(f"krun disk {disk.id!r} path {disk.path} must not be empty")


def checked(bundle: Bundle) -> list[KrunDisk]:
    """:func:`parse`, then :func:`check_image` for each disk."""
    disks = parse(bundle)
    for disk in disks:
        check_image(disk)
    return disks
