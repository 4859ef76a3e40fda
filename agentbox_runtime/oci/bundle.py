"""An OCI bundle read as a libkrun guest: what crun's krun handler takes from ``config.json``.

Honoured (reference 6.3): ``run.oci.handler=krun``; ``krun.ram_mib``; ``krun.cpus``;
``krun.disk.<i>.path`` / ``.id`` / ``.readonly`` (virtio-blk in index order, the id as
the serial); ``krun.use_passt`` and ``krun.nested_virt`` are accepted (networking is
the container's own namespace either way; nested virtualisation is not offered).
From the OCI config: ``root.path``, ``process`` (args, env, cwd, user, terminal),
``hostname``, bind mounts of directories (9p shares mounted at their destination),
bind mounts of small files (written into the guest: ``/etc/resolv.conf``,
``/etc/hosts``), tmpfs mounts, and the network namespace path.

``config.json`` must be a regular file in the bundle directory (not a symlink, FIFO or
device: it is opened ``O_NOFOLLOW|O_NONBLOCK`` after an ``lstat``, so nothing can make the
runtime hang or read elsewhere) of at most :data:`MAX_CONFIG_BYTES`. Every field the guest
uses is type-checked; ``process.user.uid``/``gid`` are integers in ``0..4294967294``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentbox_runtime.errors import AgentboxError, one_line

HANDLER_ANNOTATION = "run.oci.handler"
DEFAULT_RAM_MIB = 2048
DEFAULT_CPUS = 1
MAX_FILE_BYTES = 64 << 10
MAX_CONFIG_BYTES = 8 << 20
MAX_ID = (1 << 32) - 2  # uid_t/gid_t; 4294967295 is (uid_t)-1, "no id"
CONFIG = "config.json"
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


def _shown(value: Any) -> str:
    """``value`` for an error line: one line, at most 60 characters."""
    text = one_line(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


def read_config(bdir: Path) -> bytes:
    """The bytes of ``<bdir>/config.json``: a regular file in the bundle directory itself (never
    a symlink, FIFO or device; never opened before ``lstat`` says it is regular, and then
    ``O_NOFOLLOW|O_NONBLOCK``), at most :data:`MAX_CONFIG_BYTES`. One-line BundleError otherwise."""
    where = bdir / CONFIG
    accepted = f"accepted: a regular file {CONFIG} of at most {MAX_CONFIG_BYTES} bytes in the bundle directory"
    try:
        dir_fd = os.open(bdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise BundleError(f"bundle {bdir} has no {CONFIG}; accepted: an OCI bundle directory") from None
    except OSError as exc:
        raise BundleError(f"cannot read bundle {bdir}: {exc.strerror}") from None
    try:
        try:
            st = os.lstat(CONFIG, dir_fd=dir_fd)
        except FileNotFoundError:
            raise BundleError(f"bundle {bdir} has no {CONFIG}; accepted: an OCI bundle directory") from None
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"refusing {where}: it is {_kind(st.st_mode)}; {accepted}")
        try:
            fd = os.open(CONFIG, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            raise BundleError(f"cannot read {where}: {exc.strerror}; {accepted}") from None
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # replaced since the lstat
            raise BundleError(f"refusing {where}: it is {_kind(st.st_mode)}; {accepted}")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise BundleError(f"refusing {where}: it is over {MAX_CONFIG_BYTES} bytes; {accepted}")
    return data


def _optional(data: dict[str, Any], key: str, kind: type, default: Any, where: Path, name: str) -> Any:
    """``data[key]`` when it is a ``kind`` (``default`` when absent or null); BundleError otherwise."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BundleError(f"{where}: {name} {_shown(value)} is not accepted; accepted: a JSON {_JSON_NAMES[kind]}")
    return value


_JSON_NAMES: dict[type, str] = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer"}


def _user_id(user: dict[str, Any], key: str, where: Path) -> int:
    """``process.user.<key>``: an integer in ``0..MAX_ID`` (0 when absent)."""
    value = user.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise BundleError(f"{where}: process.user.{key} {_shown(value)} is not accepted; accepted: an integer "
                          f"from 0 to {MAX_ID}")
    return value


def load(bundle_dir: str | Path) -> Bundle:
    """Read ``<bundle>/config.json``; raise :class:`BundleError` (one line) when it is missing or unusable."""
    bdir = Path(bundle_dir).absolute()
    where = bdir / CONFIG
    raw = read_config(bdir)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{where} is not valid JSON: {one_line(str(exc))}") from None
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
    env = _optional(process, "env", list, [], where, "process.env")
    user = _optional(process, "user", dict, {}, where, "process.user")
    linux = _optional(data, "linux", dict, {}, where, "linux")
    netns = None
    for ns in _optional(linux, "namespaces", list, [], where, "linux.namespaces"):
        if isinstance(ns, dict) and ns.get("type") == "network":
            netns = _optional(ns, "path", str, None, where, "linux.namespaces[network].path") or None
    bundle = Bundle(path=bdir, annotations=dict(annotations), rootfs=rootfs, args=list(args),
                    env=[e for e in env if isinstance(e, str)],
                    cwd=_optional(process, "cwd", str, "", where, "process.cwd") or "/",
                    uid=_user_id(user, "uid", where), gid=_user_id(user, "gid", where),
                    terminal=_optional(process, "terminal", bool, False, where, "process.terminal"),
                    hostname=_optional(data, "hostname", str, None, where, "hostname") or None, netns=netns)
    if bundle.is_krun:
        _mounts(bundle, _optional(data, "mounts", list, [], where, "mounts"), where)
        if not rootfs.is_dir():
            raise BundleError(f"{where}: root.path {rootfs} is not a directory")
    return bundle


def _mounts(bundle: Bundle, mounts: list[Any], where: Path) -> None:
    for m in mounts:
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str):
            raise BundleError(f"{where}: every mount needs a destination")
        dest = os.path.normpath(m["destination"])
        options = [o for o in _optional(m, "options", list, [], where, f"options of the mount at {dest}")
                   if isinstance(o, str)]
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
