"""The container's mount tree, built on the host the way crun builds it before ``pivot_root``.

Under crun the krun guest's root is the container's own ``/`` (``krun_set_root(ctx, "/")`` after
``pivot_root``; crun 1.28+ ``krun_add_virtiofs2(ctx, "/dev/root", "/", ...)``): the rootfs with every
mount of ``config.json`` on it, volumes and bind-mounted files live, tmpfs mounts as crun made them.
:func:`build` makes that tree in a private mount namespace of the calling process (the shim; qemu,
its child, serves the tree as the guest's one root share):

1. ``unshare(CLONE_NEWNS)``, everything made private, so nothing reaches the host's namespace;
2. the rootfs bind-mounted (recursively) on ``tree``;
3. each mount, in order, at its destination resolved beneath the tree as crun's ``safe_openat``
   does (``RESOLVE_IN_ROOT``: a symlink in the image is followed but never out of the tree, ``..``
   stops at its top), missing directories and files created as mount points; a bind mount from
   its source (then remounted with ``ro``/``nosuid``/... when asked); any other type (``tmpfs``)
   mounted by type with its data options; ``tmpcopyup`` copies what the image had there into the
   new tmpfs (crun's ``copy_recursive_fd_to_fd``; extended attributes are not copied).

:func:`submounts` names the directories of the tree that are mounts of their own: libkrun's
virtio-fs announces those to the guest, which mounts them (the guest's ``/proc/mounts`` lists a
volume), so the guest's PID 1 mounts a share of each at its path.

Destinations at or below ``/proc``, ``/sys`` and ``/dev`` are skipped: libkrun's init mounts its own
``proc``, ``sysfs`` and ``devtmpfs`` there, which hide whatever crun put below them. Propagation
options are moot in a private namespace and ignored, as are crun's ``idmap``, ``copy-symlink``,
``src-nofollow`` and ``dest-nofollow`` extensions.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path, PurePosixPath

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.oci.bundle import Mount

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS, MS_REMOUNT = 1, 2, 4, 8, 16, 32
MS_MANDLOCK, MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 64, 128, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME, MS_LAZYTIME = 1 << 18, 1 << 21, 1 << 24, 1 << 25
#: option → (flags, clear): crun's ``propagation_flags`` table, the kinds that matter here
FLAGS: dict[str, tuple[int, bool]] = {
    "defaults": (0, False), "ro": (MS_RDONLY, False), "rw": (MS_RDONLY, True),
    "suid": (MS_NOSUID, True), "nosuid": (MS_NOSUID, False), "dev": (MS_NODEV, True), "nodev": (MS_NODEV, False),
    "exec": (MS_NOEXEC, True), "noexec": (MS_NOEXEC, False), "sync": (MS_SYNCHRONOUS, False),
    "async": (MS_SYNCHRONOUS, True), "dirsync": (MS_DIRSYNC, False), "remount": (MS_REMOUNT, False),
    "mand": (MS_MANDLOCK, False), "nomand": (MS_MANDLOCK, True), "atime": (MS_NOATIME, True),
    "noatime": (MS_NOATIME, False), "diratime": (MS_NODIRATIME, True), "nodiratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, False), "norelatime": (MS_RELATIME, True), "strictatime": (MS_STRICTATIME, False),
    "nostrictatime": (MS_STRICTATIME, True), "lazytime": (MS_LAZYTIME, False), "nolazytime": (MS_LAZYTIME, True),
    "bind": (MS_BIND, False), "rbind": (MS_BIND | MS_REC, False),
}
IGNORED = {"private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable", "runbindable",
           "idmap", "ridmap", "copy-symlink", "src-nofollow", "dest-nofollow", "notmpcopyup"}
TMPCOPYUP = "tmpcopyup"
REMOUNTED = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME | MS_STRICTATIME
GUEST_OWN_TREES = ("/proc", "/sys", "/dev")
MAX_LINKS = 40
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class MountTreeError(AgentboxError):
    """A mount of the container cannot be made; one line."""


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = [None if v is None else os.fsencode(v) for v in (source, target, fstype, data)]
    if _libc().mount(enc[0], enc[1], enc[2], flags, enc[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def parse_options(options: tuple[str, ...]) -> tuple[int, str, bool]:
    """``(mount flags, data, tmpcopyup)`` from a mount's options, as crun's
    ``get_mount_flags_or_option`` splits them: known names are flags, anything else is data."""
    flags, data, copyup = 0, [], False
    for option in options:
        if option in FLAGS:
            bits, clear = FLAGS[option]
            flags = flags & ~bits if clear else flags | bits
        elif option == TMPCOPYUP:
            copyup = True
        elif option not in IGNORED:
            data.append(option)
    return flags, ",".join(data), copyup


def open_in_root(root_fd: int, path: str, create: str | None = None) -> int:
    """An ``O_PATH`` descriptor of ``path`` resolved beneath ``root_fd`` as ``RESOLVE_IN_ROOT``
    resolves it (symlinks followed with the tree as ``/``, ``..`` stopping at it). ``create``
    (``"dir"`` or ``"file"``) makes a missing last component, and missing directories before it
    (mode 0755), as crun makes mount points."""
    pending = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    stack = [os.dup(root_fd)]
    links = 0
    try:
        while pending:
            name = pending.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            fd = _open_or_create(stack[-1], name, create if not pending else "dir" if create else None)
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
                target = os.readlink(name, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                pending = [p for p in PurePosixPath(target).parts if p not in ("/", ".")] + pending
                continue
            if pending and not stat.S_ISDIR(st.st_mode):
                os.close(fd)
                raise OSError(errno.ENOTDIR, "not a directory", path)
            stack.append(fd)
        return os.dup(stack[-1])
    finally:
        for fd in stack:
            os.close(fd)


def _open_or_create(dir_fd: int, name: str, create: str | None) -> int:
    try:
        return os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if create is None:
            raise
    try:
        if create == "dir":
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        else:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o755,
                             dir_fd=dir_fd))
    except FileExistsError:
        pass  # made meanwhile: use what is there
    return os.open(name, _PATH_FLAGS, dir_fd=dir_fd)


def guest_owns(destination: str) -> bool:
    """Whether libkrun's init mounts over ``destination`` (at or below ``/proc``, ``/sys``, ``/dev``)."""
    dest = os.path.normpath("/" + destination.lstrip("/"))
    return any(dest == top or dest.startswith(top + "/") for top in GUEST_OWN_TREES)


def build(rootfs: Path, tree: Path, mounts: list[Mount], bundle_dir: Path) -> None:
    """Make the container's tree at ``tree`` in a new private mount namespace of this process (see
    the module text); MountTreeError (one line) when a mount cannot be made. Call it before any
    other thread starts."""
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        raise MountTreeError(f"cannot make a mount namespace for the container: {os.strerror(ctypes.get_errno())}")
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
        _mount(str(rootfs), str(tree), None, MS_BIND | MS_REC, None)
    except OSError as exc:
        raise MountTreeError(f"cannot bind the rootfs {rootfs} on {tree}: {exc.strerror}") from None
    root_fd = os.open(tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for mount in mounts:
            if not guest_owns(mount.destination):
                _one(root_fd, mount, bundle_dir)
    finally:
        os.close(root_fd)


def _unescape(field: str) -> str:
    """A mountinfo path field: ``\\ooo`` octal escapes (space, tab, newline, backslash) decoded."""
    out, i = bytearray(), 0
    raw = os.fsencode(field)
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def submounts(tree: Path, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The guest paths of the directories in ``tree`` that are mounts of their own (volumes, tmpfs,
    anything below them), in mount order (parents first): what libkrun's virtio-fs announces to the
    guest as submounts. A file bind is no submount; nothing at or below ``/proc``, ``/sys``, ``/dev``."""
    top = os.path.realpath(tree)  # as mountinfo spells it
    found: list[str] = []
    with open(mountinfo) as f:
        for line in f:
            point = _unescape(line.split()[4])
            if not point.startswith(top + "/"):
                continue
            guest = point[len(top):]
            try:
                is_dir = stat.S_ISDIR(os.lstat(point).st_mode)
            except OSError:
                continue
            if is_dir and not guest_owns(guest) and guest not in found:
                found.append(guest)
    return found


def _one(root_fd: int, mount: Mount, bundle_dir: Path) -> None:
    flags, data, copyup = parse_options(mount.options)
    what = f"the {mount.type or 'bind'} mount at {mount.destination}"
    try:
        if flags & MS_BIND:
            _bind(root_fd, mount, flags, bundle_dir)
        elif mount.type:
            _typed(root_fd, mount, flags, data, copyup)
        else:
            raise MountTreeError(f"invalid mount type for {mount.destination}: neither a type nor bind options")
    except OSError as exc:
        raise MountTreeError(f"cannot make {what}: {exc.strerror or exc}"
                             f"{f' ({exc.filename})' if exc.filename else ''}") from None


def _remount(root_fd: int, mount: Mount, flags: int) -> None:
    fd = open_in_root(root_fd, mount.destination)  # now the new mount's root
    try:
        _mount(None, _fd_path(fd), None, MS_REMOUNT | (flags & (REMOUNTED | MS_BIND)), None)
    finally:
        os.close(fd)


def _bind(root_fd: int, mount: Mount, flags: int, bundle_dir: Path) -> None:
    if not mount.source:
        raise OSError(errno.EINVAL, "a bind mount needs a source")
    source = mount.source if os.path.isabs(mount.source) else str(bundle_dir / mount.source)
    is_dir = stat.S_ISDIR(os.stat(source).st_mode)
    fd = open_in_root(root_fd, mount.destination, "dir" if is_dir else "file")
    try:
        _mount(source, _fd_path(fd), None, flags & (MS_BIND | MS_REC), None)
    finally:
        os.close(fd)
    if flags & REMOUNTED:
        _remount(root_fd, mount, flags | MS_BIND)


def _typed(root_fd: int, mount: Mount, flags: int, data: str, copyup: bool) -> None:
    assert mount.type is not None
    if mount.type == "tmpfs" and "mode=" not in data:
        data = _with_existing_mode(root_fd, mount.destination, data)
    fd = open_in_root(root_fd, mount.destination, "dir")
    copy_from = -1
    try:
        if copyup:
            if mount.type != "tmpfs":
                raise OSError(errno.EINVAL, "tmpcopyup can be used only with tmpfs")
            try:
                copy_from = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except NotADirectoryError:
                copy_from = -1
        _mount(mount.source or mount.type, _fd_path(fd), mount.type, flags & ~(MS_RDONLY | MS_REMOUNT), data or None)
    finally:
        os.close(fd)
    if copy_from >= 0:
        try:
            dest = open_in_root(root_fd, mount.destination)  # the new tmpfs
            try:
                to = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dest)
            finally:
                os.close(dest)
        except OSError:
            os.close(copy_from)
            raise
        copy_tree(copy_from, to)
    if flags & MS_RDONLY:
        _remount(root_fd, mount, flags)


def _with_existing_mode(root_fd: int, destination: str, data: str) -> str:
    """crun's ``append_tmpfs_mode_if_missing``: a tmpfs without ``mode=`` takes the mode of what is there."""
    try:
        fd = open_in_root(root_fd, destination)
    except FileNotFoundError:
        return data
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    return f"{data},mode={mode:o}" if data else f"mode={mode:o}"


def copy_tree(src_fd: int, dst_fd: int) -> None:
    """Copy the directory ``src_fd`` into ``dst_fd`` as crun's ``copy_recursive_fd_to_fd`` does: regular
    files, directories, symlinks and nodes, each with its owner and mode; links never followed.
    Both descriptors are closed."""
    try:
        for entry in sorted(os.listdir(src_fd)):
            st = os.lstat(entry, dir_fd=src_fd)
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFREG:
                _copy_file(src_fd, dst_fd, entry)
            elif kind == stat.S_IFDIR:
                os.mkdir(entry, stat.S_IMODE(st.st_mode), dir_fd=dst_fd)
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                copy_tree(os.open(entry, flags, dir_fd=src_fd), os.open(entry, flags, dir_fd=dst_fd))
            elif kind == stat.S_IFLNK:
                os.symlink(os.readlink(entry, dir_fd=src_fd), entry, dir_fd=dst_fd)
            else:
                os.mknod(entry, st.st_mode, st.st_rdev, dir_fd=dst_fd)
            os.chown(entry, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
            if kind != stat.S_IFLNK:  # made just above by this process: not a symlink
                os.chmod(entry, stat.S_IMODE(st.st_mode), dir_fd=dst_fd)
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def _copy_file(src_dir: int, dst_dir: int, name: str) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        dst = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o777, dir_fd=dst_dir)
        try:
            while chunk := os.read(src, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view):]
        finally:
            os.close(dst)
    finally:
        os.close(src)
