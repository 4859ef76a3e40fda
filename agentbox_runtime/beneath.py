"""Paths resolved beneath a directory descriptor, never through a symlink.

The semantics of ``openat2(dir_fd, path, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``, done the
one way that works everywhere (``openat2`` is missing on older kernels and is made to fail with
``ENOSYS`` under :mod:`agentbox_runtime.vmm.share_filter`): one ``openat(..., O_NOFOLLOW)`` per
component, each relative to the descriptor of the directory before it. A path is relative and
has no ``..``; a symlink anywhere on it (the last component too, unless the caller asks for the
link itself with :func:`open_parent`) fails with ``ELOOP``. Because every step is relative to an
open descriptor, a component swapped for a symlink while the walk runs is refused, not followed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def parts(rel: str) -> list[str]:
    """The components of ``rel``; raises ``OSError(EXDEV)`` for an absolute path or a ``..``."""
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts:
        raise OSError(errno.EXDEV, "path leaves the directory it is resolved beneath", rel)
    return [p for p in path.parts if p != "."]


def _refuse_link(name: str, dir_fd: int, exc: OSError) -> OSError:
    """``ELOOP`` when ``name`` is a symlink (``O_DIRECTORY|O_NOFOLLOW`` reports it as ENOTDIR)."""
    try:
        if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
            return OSError(errno.ELOOP, "a symlink is on the path (symlinks are not followed)", name)
    except OSError:
        pass
    return exc


def _open_dir_walk(dir_fd: int, components: list[str]) -> int:
    """A new ``O_PATH`` descriptor of the directory ``components`` names beneath ``dir_fd``."""
    current = os.open(".", _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for name in components:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=current)
            except OSError as exc:
                raise _refuse_link(name, current, exc) from None
            os.close(current)
            current = nxt
    except BaseException:
        os.close(current)
        raise
    return current


@contextmanager
def open_parent(dir_fd: int, rel: str) -> Iterator[tuple[int, str]]:
    """``(descriptor of rel's directory, rel's last component)``, the directories reached without
    following a symlink; the descriptor (``O_PATH``) is closed on exit. Use it with the ``dir_fd``
    argument of ``os.lstat``/``os.readlink``/``os.open(..., O_NOFOLLOW)``."""
    components = parts(rel)
    if not components:
        raise OSError(errno.EINVAL, "an empty path names no entry", rel)
    parent = _open_dir_walk(dir_fd, components[:-1])
    try:
        yield parent, components[-1]
    finally:
        os.close(parent)


def open_beneath(dir_fd: int, rel: str, flags: int = os.O_RDONLY) -> int:
    """``os.open(rel, flags)`` beneath ``dir_fd`` with no symlink on the path (``ELOOP`` otherwise).
    ``O_NOFOLLOW`` and ``O_CLOEXEC`` are always added."""
    components = parts(rel)
    if not components:
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=dir_fd)
    with open_parent(dir_fd, rel) as (parent, name):
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as exc:
            raise _refuse_link(name, parent, exc) from None


def lstat_beneath(dir_fd: int, rel: str) -> os.stat_result | None:
    """The ``lstat`` of ``rel`` beneath ``dir_fd`` (a symlink as itself), or None when no such entry
    is inside the tree: missing, or reached only through a symlink or a non-directory."""
    try:
        with open_parent(dir_fd, rel) as (parent, name):
            return os.lstat(name, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def walk_beneath(dir_fd: int, rel: str = "") -> Iterator[tuple[str, list[str], list[str], int]]:
    """Top-down ``(rel_dir, dirnames, others, fd)`` for the directory ``rel`` beneath ``dir_fd`` and
    every real directory below it, like :func:`os.fwalk` but never through a symlink: ``dirnames``
    are directories (the caller may prune it), ``others`` everything else, symlinks included.
    ``rel_dir`` is relative to ``dir_fd`` (``""`` for ``dir_fd`` itself); ``fd`` is open only
    during its step. A directory that turns out to be a symlink when it is opened is skipped."""
    top = open_beneath(dir_fd, rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
    yield from _walk(top, "/".join(parts(rel)))


def _walk(fd: int, rel_dir: str) -> Iterator[tuple[str, list[str], list[str], int]]:
    try:
        dirnames: list[str] = []
        others: list[str] = []
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue  # gone since the listing
                (dirnames if is_dir else others).append(entry.name)
        dirnames.sort()
        others.sort()
        yield rel_dir, dirnames, others, fd
        for name in dirnames:
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                dir_fd=fd)
            except OSError:
                continue  # replaced by a symlink or a file, or removed, since the listing
            yield from _walk(child, f"{rel_dir}/{name}" if rel_dir else name)
    finally:
        os.close(fd)
