"""A seccomp filter for the process that serves host shares to a guest.

The VMM (qemu, or the libkrun helper) writes host files on the guest's behalf
and runs with the invoking user's rights, root included. Whatever the guest
asks for, the filter makes sure that a host share never gains:

- a setuid or setgid bit: ``chmod``/``fchmod``/``fchmodat``/``fchmodat2`` with
  ``S_ISUID`` or ``S_ISGID``, and ``open``/``openat``/``creat`` creating a file
  with either bit, fail with ``EPERM``;
- a device node: ``mknod``/``mknodat`` of a character or block device (or with
  either bit) fail with ``EPERM`` (FIFOs and sockets stay allowed);
- file capabilities or ACLs: every ``setxattr`` call fails with ``EOPNOTSUPP``;
- a setuid or setgid bit *kept* across a write: the process gives up
  ``CAP_FSETID`` (effective, permitted, inheritable and bounding sets), so a
  guest's write or truncate of an existing setuid-root file clears the bits as
  it does for any unprivileged writer;
- a whiteout: ``renameat2`` with ``RENAME_WHITEOUT`` (which creates a 0:0
  character device) fails with ``EPERM``.

``openat2`` and ``io_uring_setup``, whose arguments a filter cannot read, fail
with ``ENOSYS`` so that callers fall back to the calls above. Everything else is
allowed. The filter is built with libseccomp (``libseccomp.so.2``, which
Podman, crun and qemu already depend on) and sets ``no_new_privs``, so it is
inherited by everything the process executes and can never be lifted.

The VMM needs none of these for itself. A guest gets the error for its
request (``chmod u+s`` in ``/workspace`` reports "Operation not permitted").
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from typing import Final

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.vmm.host import die_with_parent

SCMP_ACT_ALLOW: Final = 0x7FFF0000
SCMP_CMP_MASKED_EQ: Final = 7
#: Syscall numbers newer than some libseccomp releases know (the generic table on both arches).
LATE_SYSCALLS: Final = {"fchmodat2": 452, "setxattrat": 463}
LATE_ARCHES: Final = ("x86_64", "aarch64")


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def _masked(arg: int, mask: int, value: int | None = None) -> tuple[int, int, int]:
    return (arg, mask, mask if value is None else value)


#: (syscall, list of alternatives; each alternative is an AND of (arg, mask, value) tests)
S_IFMT: Final = 0o170000
_PRIV_BITS = (stat.S_ISUID, stat.S_ISGID)
_O_TMPFILE_BIT: Final = 0o20000000  # __O_TMPFILE: the mode is read for O_TMPFILE too


def _mode_rules(mode_arg: int) -> list[list[tuple[int, int, int]]]:
    return [[_masked(mode_arg, bit)] for bit in _PRIV_BITS]


def _create_rules(flags_arg: int, mode_arg: int) -> list[list[tuple[int, int, int]]]:
    return [[_masked(flags_arg, flag), _masked(mode_arg, bit)]
            for flag in (os.O_CREAT, _O_TMPFILE_BIT) for bit in _PRIV_BITS]


def _device_rules(mode_arg: int) -> list[list[tuple[int, int, int]]]:
    return ([[_masked(mode_arg, S_IFMT, kind)] for kind in (stat.S_IFCHR, stat.S_IFBLK)]
            + _mode_rules(mode_arg))


RENAME_WHITEOUT: Final = 1 << 2

EPERM_RULES: Final[dict[str, list[list[tuple[int, int, int]]]]] = {
    "chmod": _mode_rules(1), "fchmod": _mode_rules(1), "fchmodat": _mode_rules(2), "fchmodat2": _mode_rules(2),
    "creat": _mode_rules(1), "open": _create_rules(1, 2), "openat": _create_rules(2, 3),
    "mknod": _device_rules(1), "mknodat": _device_rules(2),
    "renameat2": [[_masked(4, RENAME_WHITEOUT)]],
}
UNCONDITIONAL: Final[dict[str, int]] = {
    "setxattr": errno.EOPNOTSUPP, "lsetxattr": errno.EOPNOTSUPP, "fsetxattr": errno.EOPNOTSUPP,
    "setxattrat": errno.EOPNOTSUPP, "openat2": errno.ENOSYS, "io_uring_setup": errno.ENOSYS,
}


class ShareFilterError(AgentboxError):
    """The filter could not be built or loaded."""


def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as exc:
        raise ShareFilterError(f"cannot load libseccomp.so.2 ({exc}); install libseccomp2") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _syscall_number(lib: ctypes.CDLL, name: str) -> int | None:
    number = int(lib.seccomp_syscall_resolve_name(name.encode()))
    if number >= 0:
        return number
    if name in LATE_SYSCALLS and platform.machine() in LATE_ARCHES:
        return LATE_SYSCALLS[name]
    return None  # the arch has no such call (e.g. open/chmod on aarch64)


def _build(lib: ctypes.CDLL) -> int:
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise ShareFilterError("seccomp_init failed")
    try:
        for name, alternatives in EPERM_RULES.items():
            number = _syscall_number(lib, name)
            if number is None:
                continue
            for tests in alternatives:
                cmps = (_ArgCmp * len(tests))(*[_ArgCmp(arg, SCMP_CMP_MASKED_EQ, mask, value)
                                               for arg, mask, value in tests])
                rc = lib.seccomp_rule_add_array(ctx, _errno_action(errno.EPERM), number, len(tests), cmps)
                if rc < 0:
                    raise ShareFilterError(f"seccomp rule for {name} failed: {os.strerror(-rc)}")
        for name, code in UNCONDITIONAL.items():
            number = _syscall_number(lib, name)
            if number is None:
                continue
            rc = lib.seccomp_rule_add_array(ctx, _errno_action(code), number, 0, None)
            if rc < 0:
                raise ShareFilterError(f"seccomp rule for {name} failed: {os.strerror(-rc)}")
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return int(ctx)


CAP_FSETID: Final = 4
PR_CAPBSET_DROP: Final = 24
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_fsetid() -> None:
    """Give up ``CAP_FSETID`` for good: out of the bounding set (so nothing executed regains it,
    root included) and out of the effective, permitted and inheritable sets. Without it the kernel
    clears setuid/setgid on every write or truncate, as for an unprivileged writer. A process that
    cannot change its bounding set (not root) never had the capability to lose."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_FSETID, 0, 0, 0) != 0 and ctypes.get_errno() not in (errno.EPERM,
                                                                                           errno.EINVAL):
        raise ShareFilterError(f"cannot drop CAP_FSETID from the bounding set: {os.strerror(ctypes.get_errno())}")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise ShareFilterError(f"capget failed: {os.strerror(ctypes.get_errno())}")
    bit = ~(1 << CAP_FSETID) & 0xFFFFFFFF
    data[0].effective &= bit
    data[0].permitted &= bit
    data[0].inheritable &= bit
    if libc.capset(ctypes.byref(header), data) != 0:
        raise ShareFilterError(f"cannot drop CAP_FSETID: {os.strerror(ctypes.get_errno())}")


def install() -> None:
    """Give up ``CAP_FSETID`` (:func:`drop_fsetid`) and load the filter into the calling process
    (and everything it will execute).

    Raises :class:`ShareFilterError` when libseccomp is missing or the kernel refuses
    the filter. Safe to call in a ``preexec_fn``: nothing here takes a lock that a
    thread of the parent could hold, apart from the allocator libseccomp uses."""
    drop_fsetid()
    lib = _library()
    ctx = _build(lib)
    try:
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise ShareFilterError(f"seccomp_load failed: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)


def available() -> tuple[bool, str]:
    """Whether the filter can be built here (for ``agentbox doctor``); loads nothing."""
    try:
        lib = _library()
        lib.seccomp_release(_build(lib))
    except ShareFilterError as exc:
        return False, str(exc)
    return True, "setuid/setgid bits (set or kept), device nodes, whiteouts and xattrs are refused to guests"


def require_filter() -> None:
    """Raise :class:`ShareFilterError` (one line: what is missing) unless :func:`install` will work;
    call it before starting a VMM, whose ``preexec_fn`` could only report a bare failure."""
    ok, why = available()
    if not ok:
        raise ShareFilterError(f"cannot protect host shares from the guest: {why}")


def vmm_preexec() -> None:
    """The ``preexec_fn`` of every VMM process: die with the parent, then the share filter."""
    die_with_parent()
    install()
