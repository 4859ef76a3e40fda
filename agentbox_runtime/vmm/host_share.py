"""Host directories exported to a guest: the workspace as the guest's dev user sees it.

When the runtime runs as root, :func:`export` hands the VMM an *id-mapped*,
detached clone of the directory (``open_tree`` + ``mount_setattr``; nothing
appears in any mount table and it vanishes with its last descriptor):

- files of the directory's owner appear owned by the guest's dev user (the ids
  the task's env names, :func:`guest_ids`; 1000:1000 when it names none), so the
  dev user can write a project that root or anyone else owns;
- what the guest's dev user creates lands owned by that owner on the host (the
  VMM creates as root and hands the file to dev, which maps back to the owner);
- root stays root: what the guest's root creates lands owned by root, the
  invoking user. When the owner is root itself, root's id is the owner's, so
  files of the guest's root land as ``nobody`` (the overflow id) instead;
- files of any other host user appear as the overflow id (``nobody``), and
  the mount is ``nosuid,nodev`` (read-only when the share is).

The VMM opens the share as ``/proc/self/fd/N`` with descriptor ``N`` passed to
it (:attr:`ShareExport.pass_fds`). Where the filesystem cannot be id-mapped
(FUSE, NFS), root still shares a detached ``nosuid,nodev`` clone, with host
owners unchanged, and says so on the ``agentbox`` logger; when even that clone is
refused, the share is refused with one line. Without root the directory is
shared as it is (the VMM then has no privilege a guest could borrow), and
:attr:`ShareExport.mapped` says why not. Setuid bits and device nodes are refused separately, by
:mod:`agentbox_runtime.vmm.share_filter`, whichever way the share is exported.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import struct
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agentbox_guest_init import contract
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.retry import retry

SYS_OPEN_TREE: Final = 428  # the generic syscall table: the same number on x86_64 and aarch64
SYS_MOUNT_SETATTR: Final = 442
OPEN_TREE_CLONE: Final = 1
AT_EMPTY_PATH: Final = 0x1000
MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
MOUNT_ATTR_IDMAP: Final = 0x100000
OVERFLOW_ID: Final = 65534
FD_PATH_PREFIX: Final = "/proc/self/fd/"
SYS_MOVE_MOUNT: Final = 429
MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4
CLONE_NEWNS: Final = 0x20000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 1 << 18
AT_FDCWD: Final = -100


@dataclass
class ShareExport:
    """What to give the VMM for one host directory.

    ``path`` is what the VMM opens; ``pass_fds`` the descriptors it must inherit;
    ``mapped`` whether the owner↔dev id map applies, and ``why`` in words."""

    source: Path
    path: str
    pass_fds: tuple[int, ...]
    mapped: bool
    why: str

    def close(self) -> None:
        """Drop this process's descriptors (the VMM keeps its own copies)."""
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = ()


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _id_map(owner: int, guest: int) -> str:
    """``on-disk seen count`` lines: the owner is seen as ``guest``, and root stays root unless the
    owner is root; then what root creates lands as nobody (the VMM creates every file as root and
    hands it to the guest user that asked, so only the guest's own root writes stay there)."""
    spare = 0 if owner != 0 else OVERFLOW_ID
    return f"{owner} {guest} 1\n{spare} 0 1\n"


def _user_namespace(uid_map: str, gid_map: str) -> int:
    """A descriptor of a new user namespace with these maps (a short-lived ``unshare`` child holds it
    while the maps are written)."""
    child = subprocess.Popen(["unshare", "--user", "--", "cat"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ours = os.readlink("/proc/self/ns/user")

        def unshared(last_try: bool) -> bool:
            if child.poll() is not None:
                err = child.stderr.read().decode(errors="replace").strip() if child.stderr else ""
                raise OSError(errno.EPERM, f"unshare --user failed: {err or child.returncode}")
            try:
                return os.readlink(f"/proc/{child.pid}/ns/user") != ours
            except OSError:
                return False

        retry(unshared, timeout=5.0, interval=0.005)
        for name, text in (("uid_map", uid_map), ("setgroups", "deny"), ("gid_map", gid_map)):
            with open(f"/proc/{child.pid}/{name}", "w") as f:
                f.write(text)
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait()
        if child.stderr:
            child.stderr.close()


def _detached_clone(source: Path, userns_fd: int | None, read_only: bool) -> int:
    """A detached clone of ``source``, ``nosuid,nodev`` (read-only when asked), id-mapped through
    ``userns_fd`` when one is given."""
    libc = _libc()
    tree = libc.syscall(SYS_OPEN_TREE, -100, os.fsencode(source), OPEN_TREE_CLONE | os.O_CLOEXEC)
    if tree < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_tree: {os.strerror(err)}")
    flags = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if read_only else 0)
    if userns_fd is not None:
        flags |= MOUNT_ATTR_IDMAP
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", flags, 0, 0, userns_fd or 0))
    if libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, attr, 32) != 0:
        err = ctypes.get_errno()
        os.close(tree)
        what = "MOUNT_ATTR_IDMAP" if userns_fd is not None else "nosuid,nodev"
        raise OSError(err, f"mount_setattr({what}): {os.strerror(err)}")
    return int(tree)


def guest_ids(env: Mapping[str, str]) -> tuple[int, int]:
    """The guest dev user's ids a task's environment names (``AGENTBOX_HOST_UID``/``GID``, both
    non-zero numbers), else the stock image's 1000:1000."""
    uid, gid = env.get(contract.ENV_HOST_UID, ""), env.get(contract.ENV_HOST_GID, "")
    if uid.isdigit() and gid.isdigit() and int(uid) and int(gid):
        return int(uid), int(gid)
    return contract.DEV_UID, contract.DEV_GID


def export(source: Path, *, read_only: bool = False, guest_uid: int = contract.DEV_UID,
           guest_gid: int = contract.DEV_GID) -> ShareExport:
    """Prepare ``source`` for a VMM (see the module text). Raises :class:`AgentboxError` (one line)
    when ``source`` is not a directory, or when root can share it neither id-mapped nor as a
    ``nosuid,nodev`` clone; an unmapped share says why in ``why``."""
    try:
        st = os.stat(source)
    except OSError as exc:
        raise AgentboxError(f"cannot share '{source}': {exc.strerror}") from None
    if not os.path.isdir(source):
        raise AgentboxError(f"cannot share '{source}': not a directory")
    plain = ShareExport(source, str(source), (), False, "")
    if os.geteuid() != 0:
        plain.why = "not root: files keep their host owners in the guest"
        return plain
    try:
        userns = _user_namespace(_id_map(st.st_uid, guest_uid), _id_map(st.st_gid, guest_gid))
        try:
            tree = _detached_clone(source, userns, read_only)
        finally:
            os.close(userns)
    except OSError as exc:
        export = _unmapped_clone(source, read_only, f"cannot id-map '{source}' ({exc.strerror or exc})")
        logging.getLogger("agentbox").warning("agentbox: workspace share %s", export.why)
        return export
    os.set_inheritable(tree, True)
    return ShareExport(source, f"{FD_PATH_PREFIX}{tree}", (tree,), True,
                       f"uid {st.st_uid}/gid {st.st_gid} seen as {guest_uid}/{guest_gid}")


def _unmapped_clone(source: Path, read_only: bool, why: str) -> ShareExport:
    """Root's fallback when ``source`` cannot be id-mapped (FUSE, NFS, ...): a detached clone that still
    keeps ``nosuid,nodev``, with host owners unchanged. Never the plain path: a VMM running as root
    must not serve a share without them. Raises :class:`AgentboxError` (one line) when even that
    clone is refused."""
    try:
        tree = _detached_clone(source, None, read_only)
    except OSError as exc:
        raise AgentboxError(
            f"cannot share '{source}' safely as root: {why}, and a nosuid,nodev clone failed too "
            f"({exc.strerror or exc}); move the project to a local filesystem (ext4, btrfs, xfs, tmpfs) "
            f"or run as the project's owner") from None
    os.set_inheritable(tree, True)
    return ShareExport(source, f"{FD_PATH_PREFIX}{tree}", (tree,), False,
                       f"{why}: shared nosuid,nodev with host owners unchanged in the guest")


def attach_privately(share: ShareExport) -> str:
    """The export as a real directory path, for a VMM that opens its share root without following
    links: libkrun's passthrough file server opens it with ``O_PATH|O_NOFOLLOW`` (containers/libkrun
    v1.16-v1.19 ``src/devices/src/virtio/fs/linux/passthrough.rs`` ``PassthroughFs::init``), which
    on ``/proc/self/fd/N`` gives the magic link itself, not the tree.

    The calling process moves into a private mount namespace (nothing propagates back to the host)
    and the detached tree is attached over its own source path there, so that path shows the
    id-mapped (or nosuid,nodev) view to this process and what it starts, and the plain directory to
    everyone else. A plain export (not root) is returned as it is. Call it in a single-threaded
    process, before the VMM starts; raises :class:`AgentboxError` (one line) when the kernel refuses."""
    if not share.pass_fds:
        return share.path
    libc = _libc()
    steps: tuple[tuple[str, Callable[[], int]], ...] = (
        ("unshare(CLONE_NEWNS)", lambda: libc.unshare(CLONE_NEWNS)),
        ("making / private", lambda: libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)),
        (f"attaching the export at {share.source}",
         lambda: libc.syscall(SYS_MOVE_MOUNT, share.pass_fds[0], b"", AT_FDCWD, os.fsencode(share.source),
                              MOVE_MOUNT_F_EMPTY_PATH)))
    for what, call in steps:
        if call() != 0:
            err = ctypes.get_errno()
            raise AgentboxError(f"cannot share '{share.source}' with libkrun: {what} failed ({os.strerror(err)})")
    share.close()
    return str(share.source)


def fds_in(paths: list[str]) -> tuple[int, ...]:
    """The descriptors named by ``/proc/self/fd/N`` paths among ``paths`` (to pass on to a child)."""
    fds = []
    for path in paths:
        if path.startswith(FD_PATH_PREFIX) and path[len(FD_PATH_PREFIX):].isdigit():
            fds.append(int(path[len(FD_PATH_PREFIX):]))
    return tuple(fds)
