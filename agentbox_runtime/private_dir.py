"""Per-user private directories for runtime files (sockets, generated configs).

Never a predictable shared ``/tmp`` path: the base is ``$XDG_RUNTIME_DIR/agentbox``
when that runtime dir is ours and private, else ``<cache home>/agentbox/run``.
Every directory this module creates or reuses is checked after the fact with
``lstat``: it must be a real directory (not a symlink), owned by the effective
user, and neither group- nor world-accessible. Anything else is refused, so
another local user who created the path first cannot plant sockets, configs or
symlinks in it.

:class:`OutputDir` is the same rule for directories a user names for output (evidence
bundles, test artifacts, timings, the Allure dir): the directory is held open with
``O_NOFOLLOW|O_DIRECTORY`` and must be ours, and every entry in it is made relative to
that descriptor (files ``O_CREAT|O_EXCL|O_NOFOLLOW``), so a link planted on the path is
refused, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from agentbox_runtime.errors import AgentboxError, InputError, one_line


class UnsafeDirectory(AgentboxError):
    """A private directory exists but belongs to someone else, is shared, or is a symlink."""


def check_private(path: Path) -> Path:
    """``path`` if it is a real directory owned by us with no group/other access; raises otherwise."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafeDirectory(f"private directory {path} cannot be checked: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"refusing private directory {path}: it is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"refusing private directory {path}: not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(f"refusing private directory {path}: owned by uid {st.st_uid}, not {os.geteuid()}")
    if st.st_mode & 0o077:
        raise UnsafeDirectory(f"refusing private directory {path}: mode {stat.S_IMODE(st.st_mode):o} "
                              "is group- or world-accessible (accepted: 0700)")
    return path


def make_dir_0700(path: Path) -> None:
    """Create ``path`` with mode 0700 (parents as needed, with the default mode) unless it exists;
    checks nothing: the caller checks what it found."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def ensure_private(path: Path) -> Path:
    """Create ``path`` (0700, parents as needed) or reuse it if it passes :func:`check_private`."""
    make_dir_0700(path)
    return check_private(path)


def _runtime_base() -> Path | None:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg or not os.path.isabs(xdg):
        return None
    try:
        check_private(Path(xdg))
    except UnsafeDirectory:
        return None
    return Path(xdg)


SOCKET_DIR_MAX = 72
"""Longest dir :func:`runtime_dir` returns for sockets: unix socket paths are limited to 107 bytes."""


def runtime_dir(*parts: str, for_sockets: bool = False) -> Path:
    """``$XDG_RUNTIME_DIR/agentbox/<parts>`` (else ``<cache>/agentbox/run/<parts>``), each level private.

    With ``for_sockets``, a result longer than :data:`SOCKET_DIR_MAX` moves to
    ``/tmp/agentbox-<uid>/<parts>``, which is checked like every other level (a
    dir someone else created there is refused, never used)."""
    base = _runtime_base()
    if base is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        top = cache / "agentbox" / "run"
    else:
        top = base / "agentbox"
    if for_sockets and len(str(top.joinpath(*parts))) > SOCKET_DIR_MAX:
        top = Path("/tmp") / f"agentbox-{os.geteuid()}"
    elif base is None:
        (cache / "agentbox").mkdir(parents=True, exist_ok=True)  # the user's own cache: not checked
    path = ensure_private(top)
    for part in parts:
        path = ensure_private(path / part)
    return path


# -- output directories a user names (evidence bundles, artifacts, timings, the Allure dir) --------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words for a refusal: ``a symlink``, ``a FIFO``, ..."""
    for test, word in ((stat.S_ISLNK, "a symlink"), (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "of an unknown kind"


def _refusal(shown: str, why: str) -> UnsafeDirectory:
    return UnsafeDirectory(f"refusing output directory {one_line(shown)}: {why} (accepted: a real directory "
                           f"owned by uid {os.geteuid()}, or a path that does not exist yet)")


def _open_child(parent_fd: int, name: str, shown: str, *, create: bool, mode: int = 0o700) -> int:
    """``name`` in ``parent_fd`` opened as a directory without following a link, owned by us
    (created with ``mode`` first when ``create``); UnsafeDirectory otherwise."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent_fd)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        try:
            why = f"it is {file_kind(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)}"
        except OSError:
            why = exc.strerror or str(exc)
        raise _refusal(shown, why) from None
    return _owned(fd, shown)


def _owned(fd: int, shown: str) -> int:
    """``fd`` if the directory it holds is ours; closed and refused otherwise."""
    uid = os.fstat(fd).st_uid
    if uid != os.geteuid():
        os.close(fd)
        raise _refusal(shown, f"it is owned by uid {uid}")
    return fd


def _split(rel: str) -> list[str]:
    """The components of a relative name inside a directory; InputError for anything else."""
    parts = rel.split("/")
    if not rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise InputError(f"file name {one_line(repr(rel))} is not accepted; accepted: a relative path "
                         "inside the directory, without '.', '..', empty parts or a leading '/'")
    return parts


def _empty(fd: int) -> None:
    """Remove everything in the directory ``fd`` holds, never following a link (a link goes, its
    target stays)."""
    for name in os.listdir(fd):
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            os.unlink(name, dir_fd=fd)
            continue
        try:
            _empty(child)
        finally:
            os.close(child)
        os.rmdir(name, dir_fd=fd)


class OutputDir:
    """An output directory held open by descriptor: opened with ``O_NOFOLLOW|O_DIRECTORY``, owned
    by the effective user, and everything in it made relative to that descriptor, so a symlink or
    directory another local user planted on the path is refused instead of written through.

    Use as a context manager; :meth:`open` for a path the user named, :meth:`subdir` below it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: Path, *, create: bool = True, mode: int = 0o700) -> OutputDir:
        """``path`` opened (its missing levels created ``mode``, one at a time, each opened without
        following a link and checked like the last). The existing part above the last level is the
        user's own choice and is followed as named. UnsafeDirectory for a symlink, a non-directory,
        a directory owned by another uid, or a missing one without ``create``."""
        path = Path(path)
        missing: list[str] = []
        existing = path
        while not os.path.lexists(existing) and existing.parent != existing:
            missing.append(existing.name)
            existing = existing.parent
        if missing and not create:
            raise _refusal(str(path), "it does not exist")
        if not missing and not existing.name:  # "/" or ".": no last component to be a link
            return cls(_owned(_at_cwd(existing), str(path)), path)
        if not missing:
            parent = _at_cwd(existing.parent)
            try:
                return cls(_open_child(parent, existing.name, str(path), create=False), path)
            finally:
                os.close(parent)
        fd = _at_cwd(existing)
        try:
            shown = existing
            for name in reversed(missing):
                shown = shown / name
                child = _open_child(fd, name, str(shown), create=True, mode=mode)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def subdir(self, name: str, *, create: bool = True, mode: int = 0o700) -> OutputDir:
        """The directory ``name`` (one level) in this one, created ``mode`` when missing and
        ``create``; refused like :meth:`open` when a link, foreign or not a directory."""
        _split(name)
        if "/" in name:
            raise InputError(f"directory name {one_line(repr(name))} is not accepted; accepted: one path component")
        return OutputDir(_open_child(self.fd, name, str(self.path / name), create=create, mode=mode), self.path / name)

    def write_file(self, rel: str, data: bytes, *, replace: bool = False, mode: int = 0o600) -> Path:
        """Write ``data`` to the new file ``rel`` (``a/b`` makes ``a`` as by :meth:`subdir`),
        exclusively (``O_CREAT|O_EXCL|O_NOFOLLOW``). With ``replace`` an existing entry of that
        name is unlinked first (a link itself, never its target). FileExistsError otherwise."""
        parts = _split(rel)
        fd, opened = self.fd, []
        try:
            for i, part in enumerate(parts[:-1]):
                fd = _open_child(fd, part, str(self.path.joinpath(*parts[:i + 1])), create=True)
                opened.append(fd)
            if replace:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(parts[-1], dir_fd=fd)
            out = os.open(parts[-1], _NEW_FILE_FLAGS, mode, dir_fd=fd)
            with os.fdopen(out, "wb") as f:
                f.write(data)
        finally:
            for d in opened:
                os.close(d)
        return self.path / rel

    def empty(self) -> None:
        """Remove everything in this directory without following a link."""
        _empty(self.fd)

    def remove(self, name: str) -> None:
        """Remove the entry ``name`` and, when it is a real directory, everything in it; a
        symlink or other file is unlinked itself. A missing entry is fine."""
        _split(name)
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            os.unlink(name, dir_fd=self.fd)
            return
        try:
            _empty(child)
        finally:
            os.close(child)
        os.rmdir(name, dir_fd=self.fd)

    def is_empty(self) -> bool:
        """Whether the directory has no entries."""
        return not os.listdir(self.fd)

    def close(self) -> None:
        """Close the descriptor (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _at_cwd(path: Path) -> int:
    """A descriptor of the existing directory ``path``, followed as the user named it."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _refusal(str(path), exc.strerror or str(exc)) from None
