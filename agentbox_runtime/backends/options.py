"""``BackendOptions``: what to run, as one typed record every backend reads.

One unit per quantity: memory is ``memory_mib`` (MiB) for every backend, vCPUs are ``cpus``.
``None`` means the backend's default (qemu and krun-direct: 4096 MiB; krun-podman: 80% of the
host, as ``agentbox libkrun``; vCPUs: :func:`agentbox_runtime.guest_resources.default_cpus`).

Built directly (the CLI commands) or from a mapping with :meth:`BackendOptions.parse` (the pytest
factories' keyword options): an unknown name or a wrong type is one clear error naming what is
accepted, before anything is started.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from agentbox_runtime.state import StateLayout


BOOTS = ("cold", "restore")
"""The values of :attr:`BackendOptions.boot`."""


@dataclass(frozen=True)
class BackendOptions:
    """What to run and how; each backend reads the fields it supports (see its ``accepts``)."""

    workspace: Path
    """The project directory (mounted at the image user's workdir)."""
    state: StateLayout | None = None
    """The workspace's state layout; None: :meth:`StateLayout.resolve` of ``workspace``."""
    image: str | None = None
    """The guest image reference; None: the backend's default (resolved by the caller)."""
    memory_mib: int | None = None
    """Guest memory in MiB (``--mem`` GiB x 1024 on the command line)."""
    cpus: int | None = None
    """Guest vCPUs."""
    command: tuple[str, ...] = ()
    """The guest command; empty: the login shell (``fish -l``)."""
    root: bool = False
    """Enter the guest command as root instead of the image user."""
    hardened: bool = False
    """The hardened profile (read-only root, no capabilities, no new privileges)."""
    profile: bool = False
    """Guest phase timings on stderr."""
    debug: bool = False
    """Guest debug output."""
    interactive: bool = True
    """A terminal on the guest command (``podman run -it``); False: stdin only (``-i``)."""
    extra_env: tuple[str, ...] = ()
    """``K=V`` strings added to the guest's environment."""
    publish: tuple[str, ...] = ()
    """Host ports to publish (``podman run --publish`` specs)."""
    tsi: bool = False
    """krun-podman: TSI networking instead of passt (publishes nothing)."""
    krun_runtime: str | None = None
    """krun-podman: ``crun`` or ``qemu`` (``agentbox-krun-runtime``); None: flag/env/config/crun."""
    guest_init: Path | None = None
    """A host ``agentbox-guest-init`` used instead of the image's."""
    run_label: str | None = None
    """The harness run label put on what the task creates (for the reaper)."""
    preserve_debug: bool = False
    """qemu, krun-direct: keep the task rootfs and state after the guest stopped."""
    storage: str = "auto"
    """qemu, krun-direct: task rootfs storage (auto, btrfs-snapshot, fuse-overlay, reflink)."""
    kernel: Path | None = None
    """qemu, krun-direct: boot this kernel instead of the image's."""
    initrd: Path | None = None
    """qemu, krun-direct: an initrd for ``kernel``."""
    image_cache: Path | None = None
    """qemu, krun-direct: the image cache directory; None: the per-user one."""
    host_home: Path | None = None
    """krun-podman, container: where ``~/.codex`` and ``~/.pi`` come from; None: ``$HOME``."""
    boot: str = "cold"
    """qemu: ``cold``, or ``restore`` from a snapshot template (:mod:`agentbox_runtime.vmm.snapshot`);
    other backends always boot."""
    dev_ids_from_sudo: bool = True
    """container, rootful: the guest user gets ``SUDO_UID``/``SUDO_GID`` when set (the command
    line: files belong to whoever ran sudo); False: always the image user's ids (the harness)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            check_type(f.name, getattr(self, f.name))
        for name in ("memory_mib", "cpus"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"option {name} must be a positive whole number, not {value}")
        if self.boot not in BOOTS:
            raise ValueError(f"option boot must be one of {', '.join(BOOTS)}, not {self.boot!r}")

    @classmethod
    def parse(cls, backend: str, given: Mapping[str, object], accepts: Iterable[str],
              base: BackendOptions) -> BackendOptions:
        """``base`` with the options in ``given`` (names as the fields) set. Names outside
        ``accepts`` are a :class:`TypeError` naming every accepted one; values are converted where
        the meaning is plain (a list of strings to a tuple, a str to a Path) and otherwise must have
        the field's type (:class:`TypeError` naming it)."""
        accepted = sorted(accepts)
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise TypeError(f"unknown {backend} option(s): {', '.join(unknown)}; accepted: {', '.join(accepted)}")
        hints = _hints()
        try:
            values: dict[str, Any] = {k: _convert(v, hints[k]) for k, v in given.items()}
            return replace(base, **values)
        except TypeError as exc:
            raise TypeError(f"{backend} {exc}") from None


@cache
def _hints() -> dict[str, Any]:
    return get_type_hints(BackendOptions, {"StateLayout": StateLayout, "Path": Path})


def _name(hint: Any) -> str:
    return str(getattr(hint, "__name__", hint)).replace("typing.", "")


def _optional(hint: Any) -> tuple[bool, Any]:
    """(None allowed, the type without None)."""
    if get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        return True, rest[0]
    return False, hint


def _convert(value: object, hint: Any) -> object:
    """``value`` converted to ``hint`` where that is plain (str/PathLike -> Path, a list or tuple
    of str -> tuple); anything else is returned as given for :func:`check_type`."""
    _, inner = _optional(hint)
    if inner is Path and isinstance(value, (str, os.PathLike)):
        return Path(value)
    if get_origin(inner) is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _matches(value: object, inner: Any) -> bool:
    if get_origin(inner) is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, inner)


def check_type(name: str, value: object) -> None:
    """Raise :class:`TypeError` unless ``value`` has the type of the option ``name``."""
    optional, inner = _optional(_hints()[name])
    if (value is None and optional) or _matches(value, inner):
        return
    want = "a tuple of strings" if get_origin(inner) is tuple else _name(inner)
    raise TypeError(f"option {name} must be {want}{' or None' if optional else ''}, "
                    f"not {type(value).__name__} {value!r}")
