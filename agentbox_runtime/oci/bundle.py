"""An OCI bundle read as a libkrun guest: what crun's krun handler takes from ``config.json``.

Honoured (reference 6.3): ``run.oci.handler=krun``; ``krun.ram_mib``; ``krun.cpus``;
``krun.disk.<i>.path`` / ``.id`` / ``.readonly`` (virtio-blk in index order, the id as
the serial); ``krun.use_passt`` and ``krun.nested_virt`` are accepted (networking is
the container's own namespace either way; nested virtualisation is not offered).
From the OCI config: ``root.path``, ``process`` (args, env, cwd, user, terminal),
``hostname``, bind mounts of directories (9p shares mounted at their destination),
bind mounts of small files (written into the guest: ``/etc/resolv.conf``,
``/etc/hosts``), tmpfs mounts, and the network namespace path.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentbox_runtime.errors import AgentboxError

HANDLER_ANNOTATION = "run.oci.handler"
DEFAULT_RAM_MIB = 2048
DEFAULT_CPUS = 1
MAX_FILE_BYTES = 64 << 10
#: Kernel filesystems every guest mounts for itself; the container's entries for them are skipped.
GUEST_OWN = {"/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys/fs/cgroup"}
TMPFS_OPTIONS = re.compile(r"(?:rw|ro|exec|noexec|suid|nosuid|dev|nodev|atime|noatime|strictatime|relatime|"
                           r"(?:size|mode|uid|gid|nr_inodes|nr_blocks)=[0-9A-Za-z%]+)")
DISK_KEY = re.compile(r"krun\.disk\.(\d+)\.(path|id|readonly)")


class BundleError(AgentboxError):
    """The bundle cannot be run: one line naming the file, the field and what is accepted."""


@dataclass(frozen=True)
class BindMount:
    source: str
    destination: str
    read_only: bool


@dataclass(frozen=True)
class KrunDisk:
    index: int
    id: str
    path: str
    read_only: bool


@dataclass
class Bundle:
    """The parts of ``config.json`` a krun guest uses."""

    path: Path
    annotations: dict[str, str]
    rootfs: Path
    args: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    terminal: bool
    hostname: str | None
    netns: str | None
    dirs: list[BindMount] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    tmpfs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def is_krun(self) -> bool:
        """Whether crun would hand this container to libkrun."""
        return self.annotations.get(HANDLER_ANNOTATION) == "krun"

    def ram_mib(self) -> int:
        return _positive(self, "krun.ram_mib", DEFAULT_RAM_MIB)

    def cpus(self) -> int:
        return _positive(self, "krun.cpus", DEFAULT_CPUS)

    def disks(self) -> list[KrunDisk]:
        """The ``krun.disk.<i>.*`` annotations, by index; each needs a path and an id."""
        parts: dict[int, dict[str, str]] = {}
        for key, value in self.annotations.items():
            m = DISK_KEY.fullmatch(key)
            if m:
                parts.setdefault(int(m[1]), {})[m[2]] = value
        disks = []
        for index in sorted(parts):
            p = parts[index]
            if not p.get("path") or not p.get("id"):
                raise BundleError(f"{self.path / 'config.json'}: krun.disk.{index} needs both .path and .id "
                                  f"annotations; got {sorted(p)}")
            readonly = p.get("readonly", "false")
            if readonly not in ("true", "false"):
                raise BundleError(f"{self.path / 'config.json'}: krun.disk.{index}.readonly={readonly!r}; "
                                  "accepted: true, false")
            if not Path(p["path"]).is_absolute():
                raise BundleError(f"{self.path / 'config.json'}: krun.disk.{index}.path {p['path']!r} is not "
                                  "absolute")
            disks.append(KrunDisk(index, p["id"], p["path"], readonly == "true"))
        return disks


def _positive(bundle: Bundle, key: str, default: int) -> int:
    raw = bundle.annotations.get(key)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise BundleError(f"{bundle.path / 'config.json'}: annotation {key}={raw!r}; accepted: a positive integer")
    return int(raw)


def _field(data: Any, path: str, kind: type, where: Path) -> Any:
    cur = data
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise BundleError(f"{where}: missing {path}")
        cur = cur[part]
    if not isinstance(cur, kind):
        raise BundleError(f"{where}: {path} must be a {kind.__name__}, got {type(cur).__name__}")
    return cur


def _read_small(path: str, where: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BundleError(f"{where}: cannot read bind-mounted file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BundleError(f"{where}: bind mount source {path} is neither a directory nor a regular file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise BundleError(f"{where}: bind-mounted file {path} is over {MAX_FILE_BYTES} bytes; a krun guest gets "
                          "files by content (mount its directory instead)")
    return data


def load(bundle_dir: str | Path) -> Bundle:
    """Read ``<bundle>/config.json``; raise :class:`BundleError` (one line) when it is missing or unusable."""
    bdir = Path(bundle_dir).absolute()
    where = bdir / "config.json"
    try:
        with open(where, "rb") as f:
            data = json.loads(f.read(8 << 20))
    except FileNotFoundError:
        raise BundleError(f"bundle {bdir} has no config.json; accepted: an OCI bundle directory") from None
    except OSError as exc:
        raise BundleError(f"cannot read {where}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{where}: the top level must be an object")
    annotations = data.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise BundleError(f"{where}: annotations must map strings to strings")
    root = Path(_field(data, "root.path", str, where))
    rootfs = root if root.is_absolute() else bdir / root
    process = _field(data, "process", dict, where)
    args = _field(data, "process.args", list, where)
    if not args or not all(isinstance(a, str) for a in args):
        raise BundleError(f"{where}: process.args must be a non-empty list of strings")
    env = process.get("env") or []
    user = process.get("user") or {}
    netns = None
    for ns in (data.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            netns = ns.get("path") or None
    bundle = Bundle(path=bdir, annotations=dict(annotations), rootfs=rootfs, args=list(args),
                    env=[e for e in env if isinstance(e, str)], cwd=str(process.get("cwd") or "/"),
                    uid=int(user.get("uid", 0)), gid=int(user.get("gid", 0)),
                    terminal=bool(process.get("terminal", False)), hostname=data.get("hostname") or None,
                    netns=netns)
    if bundle.is_krun:
        _mounts(bundle, data.get("mounts") or [], where)
        if not rootfs.is_dir():
            raise BundleError(f"{where}: root.path {rootfs} is not a directory")
    return bundle


def _mounts(bundle: Bundle, mounts: list[Any], where: Path) -> None:
    for m in mounts:
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str):
            raise BundleError(f"{where}: every mount needs a destination")
        dest = os.path.normpath(m["destination"])
        options = [o for o in m.get("options") or [] if isinstance(o, str)]
        kind = m.get("type") or ("bind" if {"bind", "rbind"} & set(options) else "")
        if dest in GUEST_OWN or kind in ("proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"):
            continue
        if kind == "tmpfs":
            bundle.tmpfs.append((dest, ",".join(o for o in options if TMPFS_OPTIONS.fullmatch(o))))
        elif kind == "bind":
            source = m.get("source")
            if not isinstance(source, str) or not source.startswith("/"):
                raise BundleError(f"{where}: bind mount at {dest} needs an absolute source")
            if os.path.isdir(source):
                bundle.dirs.append(BindMount(source, dest, "ro" in options))
            else:
                bundle.files[dest] = _read_small(source, where)
        else:
            raise BundleError(f"{where}: mount type {kind!r} at {dest} is not supported in a krun guest; "
                              "accepted: bind, tmpfs")
