"""launch.conf: the microvm launch configuration (reference 9.7).

One line per field, ``key=<lowercase hex of the UTF-8 value>``, in a fixed
order. The host writes it (mode 0600); the libkrun helper and the qemu
guest's PID 1 read it. Parsing is strict and the round trip is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SCALARS = ("task_rootfs", "workspace_source", "workspace_tag", "workspace_target", "ram_mib",
           "vcpus", "workdir", "exec_path")
DISK_FIELDS = ("id", "path", "read_only")
PREFIX = "microvm launch config"


class LaunchConfigError(ValueError):
    """launch.conf does not parse; the message is the reference's."""


@dataclass(frozen=True)
class LaunchDisk:
    id: str
    path: str
    read_only: bool = False


@dataclass(frozen=True)
class LaunchConfig:
    """Everything needed to boot one microvm task."""

    task_rootfs: str
    workspace_source: str
    workspace_tag: str
    workspace_target: str
    ram_mib: int
    vcpus: int
    workdir: str
    exec_path: str
    disks: tuple[LaunchDisk, ...] = ()
    argv: tuple[str, ...] = ()
    env: tuple[str, ...] = field(default=())

    def env_dict(self) -> dict[str, str]:
        """The ``KEY=VALUE`` entries as a dict (later entries win)."""
        return dict(e.split("=", 1) for e in self.env)


def _hex(value: str) -> str:
    return value.encode("utf-8").hex()


def encode(cfg: LaunchConfig) -> str:
    """Serialize ``cfg`` in the reference order."""
    lines = [f"{k}={_hex(str(getattr(cfg, k)))}" for k in SCALARS]
    for i, d in enumerate(cfg.disks):
        lines += [f"disk.{i}.id={_hex(d.id)}", f"disk.{i}.path={_hex(d.path)}",
                  f"disk.{i}.read_only={_hex('true' if d.read_only else 'false')}"]
    lines += [f"argv.{i}={_hex(a)}" for i, a in enumerate(cfg.argv)]
    lines += [f"env.{i}={_hex(e)}" for i, e in enumerate(cfg.env)]
    return "".join(line + "\n" for line in lines)


def _index(key: str, text: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise LaunchConfigError(f"{PREFIX} index in {key} is invalid")
    return int(text)


def _value(n: int, value: str) -> str:
    """Line ``n``'s hex value decoded (UTF-8)."""
    try:
        if len(value) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", value):
            raise ValueError
        return bytes.fromhex(value).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise LaunchConfigError(f"{PREFIX} line {n} has invalid hex") from None


def _disk_field(disks: dict[int, dict[str, str]], key: str, decoded: str) -> None:
    """Record ``disk.<i>.<field>``."""
    parts = key.split(".")
    if len(parts) < 3:
        raise LaunchConfigError(f"{PREFIX} disk entry {key} is missing field")
    if len(parts) > 3 or parts[2] not in DISK_FIELDS:
        raise LaunchConfigError(f"{PREFIX} contains unknown key {key}")
    entry = disks.setdefault(_index(key, parts[1]), {})
    if parts[2] in entry:
        raise LaunchConfigError(f"{PREFIX} repeats key {key}")
    if parts[2] == "read_only" and decoded not in ("true", "false"):
        raise LaunchConfigError(f"{PREFIX} disk entry {key} has invalid read_only")
    entry[parts[2]] = decoded


def _number(scalars: dict[str, str], key: str, bound: int) -> int:
    """Scalar ``key`` as an unsigned integer below ``bound``."""
    text = scalars[key]
    if not text.isdigit() or not 0 <= int(text) < bound:
        raise LaunchConfigError(f"{PREFIX} {key} is invalid")
    return int(text)


def _disks(disks: dict[int, dict[str, str]]) -> tuple[LaunchDisk, ...]:
    out = []
    for i in sorted(disks):
        for f in DISK_FIELDS:
            if f not in disks[i]:
                raise LaunchConfigError(f"{PREFIX} disk.{i} missing {f}")
        out.append(LaunchDisk(disks[i]["id"], disks[i]["path"], disks[i]["read_only"] == "true"))
    return tuple(out)


def _scalar(scalars: dict[str, str], key: str, value: str) -> None:
    if key in scalars:
        raise LaunchConfigError(f"{PREFIX} repeats key {key}")
    scalars[key] = value


def _list_item(lists: dict[str, dict[int, str]], key: str, value: str) -> None:
    """``argv.N`` or ``env.N`` into its list at index N (each index once; an env entry has '=')."""
    kind, _, idx = key.partition(".")
    i = _index(key, idx)
    if i in lists[kind]:
        raise LaunchConfigError(f"{PREFIX} repeats key {key}")
    if kind == "env" and "=" not in value:
        raise LaunchConfigError(f"{PREFIX} env entry {key} is missing '='")
    lists[kind][i] = value


def _entries(text: str) -> tuple[dict[str, str], dict[int, dict[str, str]], dict[str, dict[int, str]]]:
    """Scalars, disk fields and the argv/env lists of launch.conf text, each key checked."""
    scalars: dict[str, str] = {}
    disks: dict[int, dict[str, str]] = {}
    lists: dict[str, dict[int, str]] = {"argv": {}, "env": {}}
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        key, sep, value = raw.partition("=")
        if not sep:
            raise LaunchConfigError(f"{PREFIX} line {n} is missing '='")
        decoded = _value(n, value)
        if key in SCALARS:
            _scalar(scalars, key, decoded)
        elif key.startswith("disk."):
            _disk_field(disks, key, decoded)
        elif key.startswith(("argv.", "env.")):
            _list_item(lists, key, decoded)
        else:
            raise LaunchConfigError(f"{PREFIX} contains unknown key {key}")
    return scalars, disks, lists


def decode(text: str) -> LaunchConfig:
    """Parse launch.conf text; :class:`LaunchConfigError` says what is wrong."""
    scalars, disks, lists = _entries(text)
    for k in SCALARS:
        if k not in scalars:
            raise LaunchConfigError(f"{PREFIX} missing required key {k}")
    ram, vcpus = _number(scalars, "ram_mib", 1 << 32), _number(scalars, "vcpus", 256)
    argv, env = lists["argv"], lists["env"]
    return LaunchConfig(
        task_rootfs=scalars["task_rootfs"], workspace_source=scalars["workspace_source"],
        workspace_tag=scalars["workspace_tag"], workspace_target=scalars["workspace_target"],
        ram_mib=ram, vcpus=vcpus, workdir=scalars["workdir"], exec_path=scalars["exec_path"],
        disks=_disks(disks), argv=tuple(argv[i] for i in sorted(argv)),
        env=tuple(env[i] for i in sorted(env)))
