"""The guest shell's opt-in hardened profile (``AGENTBOX_HARDENED=1``), what a hardened agent
container gives, inside the guest:

- :func:`read_only_root`: the root mount becomes read-only (per mount point, so the writable
  places stay writable): ``/tmp`` and ``/var/tmp`` are fresh tmpfs (nosuid, nodev), the scratch
  places a service writes are size-limited tmpfs (:data:`SCRATCH`: ``/var/run``, which is
  ``/run``, 64 MiB; ``/var/log`` 64 MiB; ``/var/log/supervisor`` 16 MiB; nosuid, nodev, noexec),
  dev's home stays writable through a bind mount of itself, and ``/workspace``, ``/nix`` and the
  container storage are their own mounts already;
- :func:`drop_bounding_set` (before the drop to dev): every capability leaves the bounding set,
  so nothing the shell runs can gain one back;
- :func:`confine` (after the drop): ``no_new_privs`` (a setuid or file-capability binary runs
  with the caller's privileges) and a seccomp filter refusing, with EPERM, what the default
  container profile refuses an unprivileged process: mounts and new mount APIs, namespaces
  (``unshare``, ``setns``, ``clone`` with a namespace flag; ``clone3`` is ENOSYS so libc falls
  back to ``clone``), module loading, kexec, reboot, swap, the kernel keyring, BPF, perf,
  ``userfaultfd``, handle-based opens, raw port I/O, clock setting, ``syslog`` and ``acct``.

Exceptions are additive: ``AGENTBOX_HARDENED_EXCEPTIONS`` (a comma list the host writes from
``agentbox.toml``'s ``[security.exceptions.<name>]`` tables) re-allows the named things, one each
(:data:`EXCEPTIONS`); everything else stays refused.

``dmesg`` needs CAP_SYSLOG while ``kernel.dmesg_restrict`` is 1, which ``enter`` sets
(:func:`agentbox_guest_init.hardening.restrict_dmesg`) and :func:`read_only_root` sets again.
The profile trades nested Podman away: rootless Podman needs user namespaces and mounts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Mapping
from pathlib import Path

from agentbox_guest_init import contract as c, image_user
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.hardening import restrict_dmesg
from agentbox_guest_init.proc import ROOT, Runner, check, under

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
"""CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET."""
REFUSED = ("mount", "umount", "umount2", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
           "mount_setattr", "pivot_root", "chroot", "unshare", "setns", "init_module", "finit_module",
           "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "keyctl", "add_key",
           "request_key", "bpf", "perf_event_open", "userfaultfd", "open_by_handle_at", "name_to_handle_at",
           "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog", "acct",
           "quotactl", "lookup_dcookie")
TMPFS = ("/tmp", "/var/tmp")
SCRATCH = (("/var/run", 64 << 20), ("/var/log", 64 << 20), ("/var/log/supervisor", 16 << 20))
"""The size-limited scratch tmpfs (path, bytes), parents first; ``/var/run`` is a symlink to ``/run``
in most images, and then ``/run`` is the one limited."""
SCRATCH_OPTIONS = "mode=0755,nosuid,nodev,noexec"
ENV_EXCEPTIONS = "AGENTBOX_HARDENED_EXCEPTIONS"
EXCEPTIONS = {
    "writable-root": "the root filesystem stays writable (no read-only root; the tmpfs stay)",
}
"""The exceptions ``[security.exceptions.<name>]`` may name, each re-allowing one thing."""


def exceptions(env: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The exceptions ``AGENTBOX_HARDENED_EXCEPTIONS`` grants; an unknown name is a GuestError."""
    names = frozenset(n.strip() for n in env.get(ENV_EXCEPTIONS, "").split(",") if n.strip())
    unknown = sorted(names - EXCEPTIONS.keys())
    if unknown:
        raise GuestError(f"{ENV_EXCEPTIONS}: unknown exception {', '.join(unknown)}; "
                         f"accepted: {', '.join(EXCEPTIONS)}")
    return names


def enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Whether ``AGENTBOX_HARDENED`` is ``1``."""
    return c.flag_is_set(env.get(c.ENV_HARDENED))


def _is_mountpoint(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def _resolved(root: Path, path: str) -> Path:
    """``path`` under ``root`` with a symlink in it resolved inside ``root`` (``/var/run`` -> ``/run``)."""
    target = under(root, path)
    if target.is_symlink():
        link = os.readlink(target)
        return under(root, link) if link.startswith("/") else (target.parent / link).resolve()
    return target


def scratch_mounts(runner: Runner, root: Path = ROOT) -> None:
    """The size-limited scratch tmpfs of :data:`SCRATCH` (an existing mount, such as the guest's
    ``/run``, is remounted with the limit instead)."""
    for path, size in SCRATCH:
        target = _resolved(root, path)
        if _is_mountpoint(target):
            check(runner, ["mount", "-o", f"remount,size={size}", str(target)],
                  f"hardened profile: limit {path} to {size} bytes")
            continue
        target.mkdir(parents=True, exist_ok=True)
        check(runner, ["mount", "-t", "tmpfs", "-o", f"size={size},{SCRATCH_OPTIONS}", "tmpfs", str(target)],
              f"hardened profile: tmpfs of {size} bytes on {path}")


def read_only_root(runner: Runner, root: Path = ROOT, allowed: frozenset[str] = frozenset()) -> None:
    """Make the root mount read-only, keeping the places a shell writes writable (see the module text).

    ``allowed`` (:func:`exceptions`): ``writable-root`` leaves the root writable (the tmpfs stay)."""
    for path in TMPFS:
        target = under(root, path)
        if not _is_mountpoint(target):
            target.mkdir(parents=True, exist_ok=True)
            check(runner, ["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", str(target)],
                  f"hardened profile: tmpfs on {path}")
    scratch_mounts(runner, root)
    if "writable-root" not in allowed:
        home = under(root, image_user.load(root).home)
        if home.is_dir() and not _is_mountpoint(home):
            check(runner, ["mount", "--bind", str(home), str(home)], "hardened profile: keep the home writable")
        check(runner, ["mount", "-o", "remount,bind,ro", str(root)], "hardened profile: read-only root")
    restrict_dmesg(root)


def drop_bounding_set() -> None:
    """Drop every capability from the bounding set (needs CAP_SETPCAP: call before the drop to dev)."""
    libc = ctypes.CDLL(None, use_errno=True)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {cap}")


def _seccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise GuestError(f"hardened profile: libseccomp is needed for the seccomp filter: {exc}") from None


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def confine() -> None:
    """``no_new_privs`` and the seccomp filter, for this process and what it execs (in a preexec_fn,
    after the drop to dev)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    lib = _seccomp()
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_Arg)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init")
    try:
        eperm = 0x00050000 | errno.EPERM  # SCMP_ACT_ERRNO(EPERM)
        for name in REFUSED:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr >= 0:
                _rule(lib, ctx, eperm, nr)
        clone = lib.seccomp_syscall_resolve_name(b"clone")
        for bit in range(32):  # "flags & NS != 0" as one rule per flag: "flags & flag == flag"
            if NAMESPACE_FLAGS & (1 << bit):
                _rule(lib, ctx, eperm, clone, _Arg(0, SCMP_CMP_MASKED_EQ, 1 << bit, 1 << bit))
        clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3 >= 0:
            _rule(lib, ctx, 0x00050000 | errno.ENOSYS, clone3)
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, "seccomp_load")
    finally:
        lib.seccomp_release(ctx)


def _rule(lib: ctypes.CDLL, ctx: int, action: int, nr: int, arg: _Arg | None = None) -> None:
    rc = lib.seccomp_rule_add_array(ctx, action, nr, 0 if arg is None else 1, None if arg is None else ctypes.byref(arg))
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add for syscall {nr}")
