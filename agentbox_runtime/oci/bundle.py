"""An OCI bundle read as crun's krun handler reads it: what ``config.json`` gives a krun guest.

Used: ``run.oci.handler`` and the other annotations (``krun.cpus``/``krun.ram_mib``:
:mod:`agentbox_runtime.oci.vm_config`; ``krun.disk.*``: :mod:`agentbox_runtime.oci.krun_disks`),
``root.path``, ``process.terminal``, ``mounts`` (built on the host as crun builds them:
:mod:`agentbox_runtime.oci.mount_tree`), ``linux.resources.memory.limit`` and the network
namespace path. The whole file is also what the guest reads its command, environment and
directory from, as ``/.krun_config.json`` (:mod:`agentbox_runtime.oci.krun_config`).
``process.user`` is checked but not used: libkrun's init runs the command as root.

``config.json`` must be a regular file in the bundle directory (not a symlink, FIFO or
device: it is opened ``O_NOFOLLOW|O_NONBLOCK`` after an ``lstat``, so nothing can make the
runtime hang or read elsewhere) of at most :data:`MAX_CONFIG_BYTES`. Every field the runtime
or the guest uses is type-checked, one line naming the field otherwise; ``process.user.uid``/``gid``
are integers in ``0..4294967294``, as crun's parser takes them.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentbox_runtime.private_dir import file_kind
from agentbox_runtime.errors import AgentboxError, one_line

HANDLER_ANNOTATION = "run.oci.handler"
MAX_CONFIG_BYTES = 8 << 20
MAX_ID = (1 << 32) - 2  # uid_t/gid_t; 4294967295 is (uid_t)-1, "no id"
CONFIG = "config.json"


class BundleError(AgentboxError):
    """The bundle cannot be run: one line naming the file, the field and what is accepted."""


@dataclass(frozen=True)
class Mount:
    """One entry of ``mounts``, as given."""

    destination: str
    type: str | None
    source: str | None
    options: tuple[str, ...]


@dataclass
class Bundle:
    """The parts of ``config.json`` a krun guest uses, and the file itself."""

    path: Path
    raw: bytes
    annotations: dict[str, str]
    rootfs: Path
    terminal: bool
    netns: str | None
    memory_limit: int | None = None
    mounts: list[Mount] = field(default_factory=list)

    @property
    def is_krun(self) -> bool:
        """Whether crun would hand this container to libkrun."""
        return self.annotations.get(HANDLER_ANNOTATION) == "krun"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG


def _field(data: Any, path: str, kind: type, where: Path) -> Any:
    cur = data
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise BundleError(f"{where}: missing {path}")
        cur = cur[part]
    if not isinstance(cur, kind):
        raise BundleError(f"{where}: {path} must be a {kind.__name__}, got {type(cur).__name__}")
    return cur


def _shown(value: Any) -> str:
    """``value`` for an error line: one line, at most 60 characters."""
    text = one_line(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


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
            raise BundleError(f"refusing {where}: it is {file_kind(st.st_mode)}; {accepted}")
        try:
            fd = os.open(CONFIG, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            raise BundleError(f"cannot read {where}: {exc.strerror}; {accepted}") from None
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # replaced since the lstat
            raise BundleError(f"refusing {where}: it is {file_kind(st.st_mode)}; {accepted}")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise BundleError(f"refusing {where}: it is over {MAX_CONFIG_BYTES} bytes; {accepted}")
    return data


_JSON_NAMES: dict[type, str] = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer"}


def _optional(data: dict[str, Any], key: str, kind: type, default: Any, where: Path, name: str) -> Any:
    """``data[key]`` when it is a ``kind`` (``default`` when absent or null); BundleError otherwise."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BundleError(f"{where}: {name} {_shown(value)} is not accepted; accepted: a JSON {_JSON_NAMES[kind]}")
    return value


def _strings(data: dict[str, Any], key: str, where: Path, name: str) -> list[str]:
    """``data[key]``: a list of strings (empty when absent or null)."""
    items = _optional(data, key, list, [], where, name)
    for item in items:
        if not isinstance(item, str):
            raise BundleError(f"{where}: {name} item {_shown(item)} is not accepted; accepted: a JSON string")
    return list(items)


def _user_id(user: dict[str, Any], key: str, where: Path) -> int:
    """``process.user.<key>``: an integer in ``0..MAX_ID`` (0 when absent)."""
    value = user.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise BundleError(f"{where}: process.user.{key} {_shown(value)} is not accepted; accepted: an integer "
                          f"from 0 to {MAX_ID}")
    return value


def _check_process(process: dict[str, Any], where: Path) -> None:
    """The process fields the guest's init reads (args, env, cwd) and the user crun would parse."""
    args = _field({"process": process}, "process.args", list, where)
    if not args or not all(isinstance(a, str) for a in args):
        raise BundleError(f"{where}: process.args must be a non-empty list of strings")
    _strings(process, "env", where, "process.env")
    _optional(process, "cwd", str, "", where, "process.cwd")
    user = _optional(process, "user", dict, {}, where, "process.user")
    _user_id(user, "uid", where)
    _user_id(user, "gid", where)


def _memory_limit(linux: dict[str, Any], where: Path) -> int | None:
    resources = _optional(linux, "resources", dict, {}, where, "linux.resources")
    memory = _optional(resources, "memory", dict, {}, where, "linux.resources.memory")
    limit = _optional(memory, "limit", int, None, where, "linux.resources.memory.limit")
    return int(limit) if limit is not None else None


def _mounts(data: dict[str, Any], where: Path) -> list[Mount]:
    mounts = []
    for m in _optional(data, "mounts", list, [], where, "mounts"):
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str):
            raise BundleError(f"{where}: every mount needs a destination string")
        dest = m["destination"]
        mounts.append(Mount(destination=dest,
                            type=_optional(m, "type", str, None, where, f"the type of the mount at {dest}"),
                            source=_optional(m, "source", str, None, where, f"the source of the mount at {dest}"),
                            options=tuple(_strings(m, "options", where, f"options of the mount at {dest}"))))
    return mounts


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
    _check_process(process, where)
    linux = _optional(data, "linux", dict, {}, where, "linux")
    netns = None
    for ns in _optional(linux, "namespaces", list, [], where, "linux.namespaces"):
        if isinstance(ns, dict) and ns.get("type") == "network":
            netns = _optional(ns, "path", str, None, where, "linux.namespaces[network].path") or None
    _optional(data, "hostname", str, None, where, "hostname")
    bundle = Bundle(path=bdir, raw=raw, annotations=dict(annotations), rootfs=rootfs,
                    terminal=_optional(process, "terminal", bool, False, where, "process.terminal"), netns=netns)
    if bundle.is_krun:
        bundle.memory_limit = _memory_limit(linux, where)
        bundle.mounts = _mounts(data, where)
        if not rootfs.is_dir():
            raise BundleError(f"{where}: root.path {rootfs} is not a directory")
    return bundle
