"""Root hardening steps of enter: dmesg, /dev/kvm, RLIMIT_NOFILE and the allocator preload.

References 7.3 (steps 8 and 12), 7.11 and the README note on nested KVM.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Mapping
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.proc import ROOT, under

DMESG_RESTRICT = "/proc/sys/kernel/dmesg_restrict"
KVM = "/dev/kvm"
ALLOCATOR_SUFFIX = {"mimalloc": "/lib/libmimalloc.so", "hardened": "/lib/libhardened_malloc.so"}
INF = resource.RLIM_INFINITY

Limits = tuple[int, int]


def restrict_dmesg(root: Path = ROOT) -> None:
    """Write ``1`` to ``/proc/sys/kernel/dmesg_restrict`` (truncating)."""
    path = under(root, DMESG_RESTRICT)
    try:
        f = open(path, "w")  # noqa: SIM115 - the with below closes it; open and write errors are told apart
    except OSError as exc:
        raise GuestError(f"failed to open {DMESG_RESTRICT} for dmesg restriction: {exc.strerror}") from None
    try:
        with f:
            f.write("1\n")
    except OSError as exc:
        raise GuestError(f"failed to set {DMESG_RESTRICT}=1 for dmesg restriction: {exc.strerror}") from None


def open_kvm(root: Path = ROOT) -> bool:
    """Make an exposed ``/dev/kvm`` world-accessible (0666) for the non-root dev shell; False when absent."""
    path = under(root, KVM)
    if not path.exists():
        return False
    os.chmod(path, 0o666)
    return True


def _at_least(value: int, floor: int) -> int:
    return value if value == INF or value >= floor else floor


def nofile_floor(get: Callable[[], Limits] = lambda: resource.getrlimit(resource.RLIMIT_NOFILE),
                 set_: Callable[[Limits], None] = lambda v: resource.setrlimit(resource.RLIMIT_NOFILE, v),
                 floor: int = c.NOFILE_FLOOR) -> Limits:
    """Raise RLIMIT_NOFILE soft and hard to at least ``floor``; higher values are kept.

    ``set_`` is not called when nothing changes. Returns the limits now in force.
    """
    try:
        soft, hard = get()
    except OSError as exc:
        raise GuestError(f"failed to read guest RLIMIT_NOFILE before launching the guest shell: "
                         f"{exc.strerror or exc}") from None
    if hard != INF and (soft == INF or soft > hard):
        raise GuestError(f"guest RLIMIT_NOFILE is invalid: soft limit {soft} is greater than hard limit {hard}")
    new = (_at_least(soft, floor), _at_least(hard, floor))
    if new == (soft, hard):
        return new
    try:
        set_(new)
    except (OSError, ValueError) as exc:
        raise GuestError(f"failed to raise guest RLIMIT_NOFILE from soft={soft} hard={hard} to "
                         f"soft={new[0]} hard={new[1]} before launching the guest shell: {exc}") from None
    return new


def _metadata(path: Path) -> Mapping[str, str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.split("#", 1)[0].partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def allocator_library(genv: GuestEnv, root: Path = ROOT) -> tuple[str, str | None]:
    """The chosen allocator and its library (``None`` when none is configured)."""
    allocator = genv.allocator or "mimalloc"
    if allocator not in ALLOCATOR_SUFFIX:
        raise GuestError(f"{c.ENV_NIX_ALLOCATOR} must be 'mimalloc' or 'hardened'")
    fallback = genv.mimalloc_lib if allocator == "mimalloc" else genv.hardened_malloc_lib
    lib = _metadata(under(root, c.NIX_ALLOCATOR_LIBS)).get(allocator) or fallback or None
    if lib is not None and not (lib.startswith("/") and lib.endswith(ALLOCATOR_SUFFIX[allocator])):
        raise GuestError(f"{allocator} allocator library must be an absolute path ending in "
                         f"{ALLOCATOR_SUFFIX[allocator]}, got {lib}")
    return allocator, lib


def materialize_allocator_preload(genv: GuestEnv, root: Path = ROOT) -> str | None:
    """Write ``/etc/ld-nix.so.preload`` naming the allocator library; the library written, if any.

    A missing mimalloc (the default) is a no-op; a missing hardened_malloc is an error.
    """
    allocator, lib = allocator_library(genv, root)
    if lib is None or not under(root, lib).exists():
        if allocator == "hardened":
            raise GuestError(f"{c.ENV_NIX_ALLOCATOR}=hardened requires hardened in {c.NIX_ALLOCATOR_LIBS} "
                             f"or {c.ENV_HARDENED_MALLOC_LIB}")
        return None
    path = under(root, c.NIX_PRELOAD)
    path.write_text(f"{lib}\n")
    os.chmod(path, 0o644)
    return lib
